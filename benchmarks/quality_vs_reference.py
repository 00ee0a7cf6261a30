"""Sample quality at equal budget: this project against denoising-diffusion-pytorch (the reference
implementation of the same U-Net), trained for the same steps and batch on the same images, sampled with
DDIM at 50 steps, scored with the project's own Fashion-MNIST classifier.

    pip install -e ".[bench]"
    python benchmarks/quality_vs_reference.py --classifier CLF.ckpt [--steps 600,3000] [--batch-size 128]
        [--num-samples 5000] [--sides reference,default] [--project NAME=OVERRIDES ...] [--threads N]
        [--out benchmarks/out/quality_vs_reference]

Sides: `reference` is lucidrains' `Unet(dim=28, dim_mults=(1, 2, 4))` under his `GaussianDiffusion` with T=300,
his linear schedule (betas 1e-4..0.02 scaled by 1000/T), his default objective (`--reference-objective`, pred_v),
MSE, Adam 1e-3, no EMA, trained in a plain loop. `default` is `python train.py` as a user types it (EMA weights
sampled; `NAME:raw` rows sample the raw weights); `--project NAME="a=1 b=2"` adds a side with those Hydra
overrides (e.g. `--project tutorial=experiment=ddpm_fashion_mnist_tutorial`, or the reference's network under the
project's training: `--project refnet="model._target_=quality_vs_reference.ReferenceUnet ~model.resnet_block_groups"`). Both sides see the same training
split in the same order with the same flips, and the budgets are reached by continuing one run (the project's
through `ckpt_path=`). Each (side, budget) writes `<out>/<side>_<steps>/grid.png` and `result.json`; the table of
every result in `<out>` is printed and written to `<out>/table.md`, so sides can run as separate processes.

Scores: Frechet distance in the classifier's features against the test split, precision and recall (k = 3), and
the share of the samples that the classifier assigns to each class (largest and smallest shown).
"""

import argparse
import json
import os
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import add_threads_argument, apply_threads, compose_train
from diffusion_lab.generate import generate
from diffusion_lab.metrics.evaluate import data_split, score_samples
from diffusion_lab.metrics.extractors import ClassifierFeatures
from diffusion_lab.builders import load_model
from diffusion_lab.samplers import Sampler
from diffusion_lab.train import train
from diffusion_lab.utils.media import save_grid

DATA = {"_target_": "diffusion_lab.data.image_datamodule.ImageDataModule", "dataset": "fashion_mnist", "root": "data",
        "image_size": 28, "channels": 1, "val_size": 1000}
SAMPLER = Sampler("ddim", 50, "uniform", eta=0.0)  # configs/sampler/ddim.yaml


class ReferenceUnet(nn.Module):
    """The reference's `Unet` as a project backbone (`model._target_=quality_vs_reference.ReferenceUnet`): the
    project's process, training loop and EMA over the reference's network, to tell the network's share of a gap
    from the rest. RMSNorm has no groups and there is no class conditioning or gradient checkpointing, so those
    options must stay unset."""

    def __init__(self, dim: int, dim_mults: list[int], channels: int, image_size: int, out_channels: int | None = None,
                 num_classes: int | None = None, self_condition: bool = False, attn_heads: int = 4,
                 attn_dim_head: int = 32, resnet_block_groups: int | None = None, context_encoder=None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        from denoising_diffusion_pytorch import Unet

        if num_classes or context_encoder is not None or resnet_block_groups is not None or gradient_checkpointing:
            raise ValueError("ReferenceUnet: no class conditioning or gradient checkpointing, and set "
                             "~model.resnet_block_groups (RMSNorm has no groups)")
        self.unet = Unet(dim=dim, dim_mults=tuple(dim_mults), channels=channels, out_dim=out_channels,
                         self_condition=self_condition, attn_heads=attn_heads, attn_dim_head=attn_dim_head)
        self.self_condition = self_condition

    def forward(self, x: torch.Tensor, t: torch.Tensor, x_self_cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, x_self_cond)


def score(samples: np.ndarray, test_images: torch.Tensor, classifier_path: str, seed: int) -> dict:
    """Frechet distance, precision, recall and class shares of uint8 samples (N, H, W, C)."""
    images = torch.from_numpy(samples).permute(0, 3, 1, 2)
    options = {"fid": {}, "prec_recall": {"k": 3}, "extractor": "classifier", "classifier_path": classifier_path,
               "real_split": "test", "cache_dir": "~/.cache/diffusion_lab/real_features", "batch_size": 256}
    scores = score_samples(images, test_images, options, torch.device("cpu"), seed)
    classifier = ClassifierFeatures(classifier_path)
    with torch.no_grad():
        labels = torch.cat([classifier.net(batch.float() / 127.5 - 1).argmax(1) for batch in images.split(256)])
    shares = torch.bincount(labels, minlength=10).double() / len(labels)
    return {"fd": scores["fid"], "precision": scores["precision"], "recall": scores["recall"],
            "class_shares": shares.tolist(), "protocol": scores["protocol"]}


def flip_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def reference_runs(budgets: list[int], batch_size: int, num_samples: int, objective: str, seed: int):
    """Yields (steps, uint8 samples (N, H, W, C), images/s) of the reference at each budget, training on."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    torch.manual_seed(seed)
    unet = Unet(dim=28, dim_mults=(1, 2, 4), channels=1)
    diffusion = GaussianDiffusion(unet, image_size=28, timesteps=300, beta_schedule="linear", objective=objective,
                                  sampling_timesteps=50)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-3)
    train_images, _ = data_split(DATA, "train")
    generator = torch.Generator().manual_seed(seed)
    step, epoch_order, position, seconds = 0, torch.randperm(len(train_images), generator=generator), 0, 0.0
    for budget in budgets:
        start = time.perf_counter()
        while step < budget:
            if position + batch_size > len(epoch_order):
                epoch_order, position = torch.randperm(len(train_images), generator=generator), 0
            batch = train_images[epoch_order[position : position + batch_size]].float() / 255
            position += batch_size
            loss = diffusion(flip_batch(batch, generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        seconds += time.perf_counter() - start
        diffusion.eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            samples = torch.cat([diffusion.sample(batch_size=min(256, num_samples - i)) for i in range(0, num_samples, 256)])
        diffusion.train()
        yield budget, (samples.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), step * batch_size / seconds


def project_runs(name: str, overrides: list[str], budgets: list[int], batch_size: int, num_samples: int, weights: list[str], out: Path,
                 seed: int):
    """Yields (steps, {weights: uint8 samples}, images/s) of `python train.py OVERRIDES` at each budget, resuming."""
    run_dir, ckpt, seconds = out / "runs" / name, None, 0.0
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own scratch run: a rerun starts it afresh
    for budget in budgets:
        cfg = compose_train([f"trainer.max_steps={budget}", f"data.batch_size={batch_size}", "logger=none",
                             f"paths.output_dir={run_dir}", "callbacks.sample_media=null",
                             "callbacks.rich_progress_bar=null", f"seed={seed}", *overrides]
                            + ([f"ckpt_path={ckpt}"] if ckpt else []))
        start = time.perf_counter()
        train(cfg)
        seconds += time.perf_counter() - start
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        samples = {}
        for kind in weights:
            model = load_model(checkpoint, kind, torch.device("cpu"))
            samples[kind] = generate(model, SAMPLER, num_samples, 256, seed=seed).samples
        yield budget, samples, budget * batch_size / seconds


def write_result(out: Path, name: str, steps: int, samples: np.ndarray, images_per_second: float, test_images: torch.Tensor,
                 args, extra: dict) -> None:
    folder = out / f"{name}_{steps}"
    folder.mkdir(parents=True, exist_ok=True)
    save_grid(samples[:64], folder / "grid.png")
    result = {"side": name, "steps": steps, "batch_size": args.batch_size, "train_images_per_s": images_per_second,
              **score(samples, test_images, args.classifier, args.seed), **extra}
    temporary = folder / "result.json.tmp"
    temporary.write_text(json.dumps(result, indent=2))
    os.replace(temporary, folder / "result.json")
    print(json.dumps({k: v for k, v in result.items() if k != "protocol"}), flush=True)


def table(out: Path) -> str:
    rows = sorted((json.loads(p.read_text()) for p in out.glob("*/result.json")), key=lambda r: (r["steps"], r["side"]))
    lines = ["| side | steps x batch | Frechet distance (classifier) | precision | recall | largest class share | "
             "smallest class share | samples | train img/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        shares = r["class_shares"]
        lines.append(f"| {r['side']} | {r['steps']} x {r['batch_size']} | {r['fd']:.1f} | {r['precision']:.2f} | "
                     f"{r['recall']:.2f} | {max(shares):.2f} | {min(shares):.3f} | {r['protocol']['num_samples']} | "
                     f"{r['train_images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="feature_classifier checkpoint (experiment=feature_classifier)")
    parser.add_argument("--steps", default="600,3000", help="budgets in optimizer steps, ascending")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--sides", default="reference,default", help="reference and project side names")
    parser.add_argument("--project", action="append", default=[], help="NAME=OVERRIDES: a project side with Hydra overrides")
    parser.add_argument("--reference-objective", default="pred_v", help="pred_v (its default) | pred_noise | pred_x0")
    parser.add_argument("--weights", default="ema,raw", help="project weights sampled: ema (what sample.py uses), raw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/out/quality_vs_reference")
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    out = Path(args.out)
    budgets = sorted(map(int, args.steps.split(",")))
    projects = {"default": []} | {name: shlex.split(o) for name, o in (p.split("=", 1) for p in args.project)}
    test_images = data_split(DATA, "test")[0]
    for side in args.sides.split(","):
        if side == "reference":
            for steps, samples, speed in reference_runs(budgets, args.batch_size, args.num_samples, args.reference_objective, args.seed):
                write_result(out, f"reference_{args.reference_objective}", steps, samples, speed, test_images, args, {})
            continue
        if side not in projects:
            parser.error(f"side {side!r} is neither reference nor a --project name ({', '.join(projects)})")
        for steps, samples, speed in project_runs(side, projects[side], budgets, args.batch_size, args.num_samples, args.weights.split(","), out,
                                                 args.seed):
            for weights, images in samples.items():
                name = side if weights == "ema" else f"{side}:raw"
                write_result(out, name, steps, images, speed, test_images, args, {"overrides": projects[side]})
        print(table(out))
    text = table(out)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
