"""Sample quality against network evaluations (NFE) for several samplers on one checkpoint.

    python benchmarks/sampler_quality.py --ckpt PATH [--samplers ddpm,ddim,dpm_solver_pp,unipc,heun]
        [--nfe 5,10,20,50] [--num-samples 256] [--batch-size 128] [--out benchmarks/out/sampler_quality]
        [--classifier PATH | --inception [--inception-weights FILE]]

Every sampler starts from the same noise. Quality is the Frechet distance of the project's metric
(`diffusion_lab.metrics`) when a feature extractor is given (`--classifier` checkpoint of the feature_classifier
experiment, or `--inception`), against the checkpoint's test split; the full chain (ddpm, steps = T) is the
baseline row. Without an extractor it is the mean squared distance to the reference: the deterministic full
chain (ddim, steps = T, the probability-flow discretization) from the same noise. Each sampler uses its
`configs/sampler/<name>.yaml` (spacing, options); heun and edm spend 2 steps - 1 evaluations, so they run
(NFE + 1) // 2 steps. The baselines need a DDPM-family checkpoint (a process of T timesteps). Writes
`<out>/table.md`, `<out>/results.json` and `<out>/quality_vs_nfe.png`.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffusion_lab.metrics.evaluate import data_split, score_samples
from diffusion_lab.builders import load_model
from diffusion_lab.samplers import Sampler
from diffusion_lab.config import config_option
from diffusion_lab.utils.checkpoint import load_checkpoint
from diffusion_lab.utils.media import to_uint8



def configured_sampler(name: str, nfe: int) -> Sampler:
    """The sampler of configs/sampler/<name>.yaml with as many steps as fit in `nfe` evaluations."""
    config = OmegaConf.to_container(config_option("sampler", name), resolve=False)
    options = {k: v for k, v in config.items() if k not in ("_target_", "algorithm", "steps", "spacing")}
    steps = (nfe + 1) // 2 if config["algorithm"] in ("heun", "edm") else nfe
    return Sampler(config["algorithm"], steps, config["spacing"], **options)


def draw(model, sampler, noise, batch_size, seed):
    """Images in [-1, 1] (decoded, for latent diffusion) from the given noise, batch by batch, noise of stochastic
    samplers seeded."""
    generator = torch.Generator(noise.device).manual_seed(seed)
    return torch.cat([model.decode(model.sample(batch, sampler, generator=generator))
                      for batch in noise.split(batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--samplers", default="ddpm,ddim,dpm_solver_pp,unipc,heun")
    parser.add_argument("--nfe", default="5,10,20,50")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default="ema", help="ema | raw")
    parser.add_argument("--classifier", help="feature-classifier checkpoint: Frechet distance in its features")
    parser.add_argument("--inception", action="store_true", help="Frechet Inception distance")
    parser.add_argument("--inception-weights", help="FID Inception weights file (else torchmetrics' download)")
    parser.add_argument("--out", default="benchmarks/out/sampler_quality")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    checkpoint = load_checkpoint(args.ckpt, key="--ckpt")
    model = load_model(checkpoint, args.weights, device)
    if not hasattr(model.process, "num_timesteps"):
        parser.error(f"--ckpt is a {model.process.name} checkpoint; the full-chain baselines need a DDPM-family "
                     "process (T timesteps)")
    data = checkpoint["config"]["data"]
    shape = model.sample_shape
    noise = torch.randn((args.num_samples, *shape), generator=torch.Generator().manual_seed(args.seed)).to(device)
    T = model.process.num_timesteps

    if args.classifier or args.inception:
        options = {"fid": {}, "extractor": "classifier" if args.classifier else "inception",
                   "classifier_path": args.classifier, "weights_path": args.inception_weights,
                   "real_split": "test", "cache_dir": "~/.cache/diffusion_lab/real_features", "batch_size": 256}
        real_images, _ = data_split(data, "test")
        metric = "Frechet distance"

        def quality(x):
            return score_samples(torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2), real_images, options, device, args.seed)["fid"]

        baseline_sampler = Sampler("ddpm", T, "uniform")
    else:
        metric = f"MSE to the {T}-step ddim reference"
        baseline_sampler = Sampler("ddim", T, "uniform")
        reference = None

        def quality(x):
            return ((x - reference) ** 2).mean().item()

    start = time.perf_counter()
    baseline = draw(model, baseline_sampler, noise, args.batch_size, args.seed)
    if not (args.classifier or args.inception):
        reference = baseline
    rows = [{"sampler": str(baseline_sampler), "name": "full chain", "nfe": baseline_sampler.evaluations_used,
             "quality": quality(baseline), "seconds": time.perf_counter() - start}]
    print(rows[-1], flush=True)
    for name in args.samplers.split(","):
        for nfe in map(int, args.nfe.split(",")):
            sampler = configured_sampler(name, nfe)
            start = time.perf_counter()
            x = draw(model, sampler, noise, args.batch_size, args.seed)
            rows.append({"sampler": str(sampler), "name": name, "budget": nfe, "nfe": sampler.evaluations_used, "quality": quality(x),
                         "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nfes = sorted({row["budget"] for row in rows[1:]})
    names = args.samplers.split(",")
    lines = [f"Quality ({metric}; lower is better) of {args.num_samples} samples from {args.ckpt}; full chain "
             f"{rows[0]['sampler']}: {rows[0]['quality']:.4g}", "",
             "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for name in names:  # columns: the NFE budget (heun uses 2 steps - 1 <= budget)
        by_nfe = {row["budget"]: row["quality"] for row in rows if row["name"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{by_nfe[n]:.4g}" if n in by_nfe else "" for n in nfes) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    for path, text in ((out / "table.md", table), (out / "results.json", json.dumps(rows, indent=2))):
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(text)
        os.replace(temporary, path)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        points = [(row["nfe"], row["quality"]) for row in rows if row["name"] == name]
        ax.plot(*zip(*points), marker="o", label=name)
    if args.classifier or args.inception:
        ax.axhline(rows[0]["quality"], color="gray", linestyle="--", label=f"full chain ({rows[0]['nfe']} NFE)")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel=metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "quality_vs_nfe.png", dpi=120)


if __name__ == "__main__":
    main()
