"""Faster training from the backbone's hidden states (issue 28): the baseline, + the dispersive loss and + REPA, at
equal optimizer steps and batch, on real Fashion-MNIST with `experiment=dit_fashion_mnist` and the default U-Net
(`python train.py`'s ddpm_fashion_mnist recipe). Every `--eval-every` steps the EMA weights draw `--num-samples`
samples, scored by Frechet distance in the shipped classifier's features against the test split; the table gives the
final FD of each variant and the steps it needed to reach the baseline's final FD, the plot FD against steps.

    python benchmarks/faster_training.py [--encoder ENC.ckpt] [--backbones dit,unet] [--variants baseline,dispersive,repa]
        [--steps 20000] [--eval-every 2000] [--batch-size 128] [--num-samples 5000] [--sampler dpm_solver_pp]
        [--sampler-steps 20] [--encoder-steps 2000] [--extra OVERRIDE ...] [--threads N] [--out benchmarks/out/faster_training]

REPA's encoder must not be the network that scores the samples, or the gain would mean nothing: `--encoder` takes a
feature_classifier checkpoint of another architecture and seed, and without it the benchmark trains one first
(experiment=feature_classifier with model.widths=[32,64], model.feature_dim=256, seed + 1; `--encoder-steps`
steps); one whose weights equal the scorer's is refused. Each run trains in segments of `--eval-every` steps, each
resuming the last (exact in this project, so the curve is that of one uninterrupted run); a rerun with the same
`--out` continues where runs stopped. Writes `<out>/<backbone>_<variant>/results.json`, `<out>/table.md` and
`<out>/fd_vs_steps.png`. REPA aligns block `--repa-depth-*` of each backbone (DiT: 2 of 6; U-Net: 4, the second
residual block at 14 x 14); the dispersive loss acts on the last block (the configs' defaults).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from common import add_threads_argument, apply_threads, compose_train, best_device
from diffusion_lab.builders import load_model
from diffusion_lab.generate import generate
from diffusion_lab.metrics.evaluate import data_split
from diffusion_lab.metrics.extractors import SHIPPED_CLASSIFIERS, load_classifier, weights_hash
from diffusion_lab.samplers import Sampler
from diffusion_lab.train import train
from diffusion_lab.utils.checkpoint import load_checkpoint
from quality_vs_reference import DATA, score

BACKBONES = {"dit": ["experiment=dit_fashion_mnist"], "unet": []}  # the default run is the tuned U-Net recipe
QUIET = ["logger=csv", "callbacks.sample_media=null", "callbacks.rich_progress_bar=null", "trainer.max_epochs=-1"]


def variant_overrides(variant: str, backbone: str, args) -> list[str]:
    if variant == "baseline":
        return []
    if variant == "dispersive":
        return ["representation=dispersive"]
    depth = args.repa_depth_dit if backbone == "dit" else args.repa_depth_unet
    return ["representation=repa", f"representation.encoder.path={args.encoder}", f"representation.repa_depth={depth}"]


def train_encoder(args) -> str:
    """A feature classifier of another architecture and seed than the scorer: REPA's encoder."""
    run_dir = args.out / "encoder"
    train(compose_train(["experiment=feature_classifier", "model.widths=[32,64]", "model.feature_dim=256",
                         f"seed={args.seed + 1}", f"trainer.max_steps={args.encoder_steps}", f"paths.output_dir={run_dir}",
                         "ckpt_path=auto", *QUIET]))
    return str(run_dir / "checkpoints" / "last.ckpt")


def check_encoder(encoder: str, scorer: str) -> None:
    encoder_net, accuracy = load_classifier(encoder, "--encoder")
    if weights_hash(encoder_net) == weights_hash(load_classifier(scorer, "--classifier")[0]):
        raise SystemExit(f"--encoder {encoder} is the scoring classifier {scorer}: REPA would align with the scorer")
    print(f"REPA encoder {encoder}: widths {encoder_net.config['widths']}, test accuracy {accuracy}", flush=True)


def fd_at(run_dir: Path, args, test_images: torch.Tensor) -> float:
    model = load_model(load_checkpoint(run_dir / "checkpoints" / "last.ckpt"), "ema", best_device())
    labels = list(range(model.num_classes)) if model.conditional else None
    samples = generate(model, Sampler(args.sampler, args.sampler_steps, "trailing"), args.num_samples, 250,
                       seed=args.seed, class_labels=labels).samples
    return score(samples, test_images, args.classifier, args.seed)["fd"]


def run_variant(backbone: str, variant: str, args, test_images: torch.Tensor) -> dict:
    """Trains one variant segment by segment, scoring after each; results.json records every point."""
    name, run_dir = f"{backbone}_{variant}", args.out / f"{backbone}_{variant}" / "run"
    path = args.out / name / "results.json"
    result = json.loads(path.read_text()) if path.is_file() else {"backbone": backbone, "variant": variant,
                                                                    "batch_size": args.batch_size, "points": []}
    done = {point["step"] for point in result["points"]}
    for steps in range(args.eval_every, args.steps + 1, args.eval_every):
        if steps in done:
            continue
        start = time.perf_counter()
        train(compose_train([*BACKBONES[backbone], *variant_overrides(variant, backbone, args), *args.extra, *QUIET,
                             f"trainer.max_steps={steps}", f"data.batch_size={args.batch_size}", f"seed={args.seed}",
                             f"paths.output_dir={run_dir}", "ckpt_path=auto"]))
        seconds = time.perf_counter() - start
        fd = fd_at(run_dir, args, test_images)
        result["points"].append({"step": steps, "fd": fd, "train_seconds": seconds})
        print(f"{name} step {steps}: FD {fd:.2f} ({seconds:.0f} s of training)", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    return result


def steps_to_reach(points: list[dict], target: float) -> int | None:
    """The first evaluated step whose FD is at most `target` (None: never)."""
    return next((point["step"] for point in sorted(points, key=lambda p: p["step"]) if point["fd"] <= target), None)


def table_and_plot(out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    lines = ["| backbone | variant | steps x batch | final FD | steps to the baseline's final FD | speed-up | train s |",
             "|---|---|---|---:|---:|---:|---:|"]
    fig, axes = plt.subplots(1, len({r["backbone"] for r in results}), figsize=(5 * 2, 3.5), squeeze=False)
    for ax, backbone in zip(axes[0], sorted({r["backbone"] for r in results})):
        runs = {r["variant"]: r for r in results if r["backbone"] == backbone}
        baseline = runs.get("baseline")
        target = baseline["points"][-1]["fd"] if baseline else None
        for variant, r in runs.items():
            points = sorted(r["points"], key=lambda p: p["step"])
            reached = steps_to_reach(points, target) if target is not None else None
            speedup = f"{baseline['points'][-1]['step'] / reached:.2f}x" if reached else "-"
            lines.append(f"| {backbone} | {variant} | {points[-1]['step']} x {r['batch_size']} | {points[-1]['fd']:.2f} | "
                         f"{reached or 'not reached'} | {speedup} | {sum(p['train_seconds'] for p in points):.0f} |")
            ax.plot([p["step"] for p in points], [p["fd"] for p in points], marker="o", label=variant)
        ax.set_title(backbone)
        ax.set_xlabel("training steps")
        ax.set_ylabel("FD (shipped classifier)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fd_vs_steps.png", dpi=100)
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=None, help="REPA's encoder: a feature_classifier checkpoint (default: train one)")
    parser.add_argument("--classifier", default=str(SHIPPED_CLASSIFIERS["fashion_mnist"]), help="the scorer")
    parser.add_argument("--backbones", type=lambda s: s.split(","), default=list(BACKBONES))
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["baseline", "dispersive", "repa"])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--eval-every", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--sampler", default="dpm_solver_pp")
    parser.add_argument("--sampler-steps", type=int, default=20)
    parser.add_argument("--encoder-steps", type=int, default=2000)
    parser.add_argument("--repa-depth-dit", type=int, default=2)
    parser.add_argument("--repa-depth-unet", type=int, default=4)
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every diffusion run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/faster_training"))
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    bad = [b for b in args.backbones if b not in BACKBONES] + [v for v in args.variants
                                                               if v not in ("baseline", "dispersive", "repa")]
    if bad or args.steps % args.eval_every:
        parser.error(f"unknown {bad}" if bad else "--steps must be a multiple of --eval-every")
    if "repa" in args.variants:
        args.encoder = args.encoder or train_encoder(args)
        check_encoder(args.encoder, args.classifier)
    test_images, _ = data_split(DATA, "test")
    for backbone in args.backbones:
        for variant in args.variants:
            run_variant(backbone, variant, args, test_images)
    print(table_and_plot(args.out))


if __name__ == "__main__":
    main()
