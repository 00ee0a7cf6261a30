"""DDPM, rectified flow and EDM at equal budget: each process trained on real Fashion-MNIST with the same backbone
(the default experiment's attention U-Net), the same optimizer steps and batch, then sampled at 10, 20 and 50 network
evaluations (NFE) with each of its candidate samplers, scored by Frechet distance in the project classifier's
features against the test split; the table gives each process's best sampler per NFE, the plot FD against NFE.

    python benchmarks/process_quality.py --classifier CLF.ckpt [--steps 3000] [--batch-size 128]
        [--num-samples 5000] [--nfe 10,20,50] [--processes ddpm,rectified_flow,edm] [--samplers 3] [--threads N]
        [--out benchmarks/out/process_quality]

Each process is its preset (experiment=ddpm_fashion_mnist, rectified_flow_fashion_mnist, edm_fashion_mnist), EMA
weights sampled. A sampler of two evaluations a step (heun, edm) runs (NFE + 1) // 2 steps, so 2 * steps - 1 <= NFE.
Writes `<out>/<process>/results.json` per process (so processes can run as separate jobs), `<out>/table.md` and
`<out>/fd_vs_nfe.png`; a rerun with the same `--out` continues a process's finished training run (ckpt_path=auto).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from common import add_threads_argument, apply_threads, compose_train
from diffusion_lab.generate import generate
from diffusion_lab.metrics.evaluate import data_split
from diffusion_lab.builders import load_model
from diffusion_lab.samplers import Sampler
from diffusion_lab.train import train
from quality_vs_reference import DATA, score

PRESETS = {"ddpm": "ddpm_fashion_mnist", "rectified_flow": "rectified_flow_fashion_mnist", "edm": "edm_fashion_mnist"}
CANDIDATES = {  # (algorithm, spacing, options) per process
    "ddpm": [("dpm_solver_pp", "trailing", {}), ("unipc", "trailing", {}), ("ddim", "trailing", {})],
    "rectified_flow": [("heun", "uniform", {}), ("euler", "uniform", {}), ("unipc", "uniform", {})],
    "edm": [("edm", "karras", {}), ("dpm_solver_pp", "karras", {}), ("unipc", "karras", {})],
}


def sampler_at(algorithm: str, spacing: str, options: dict, nfe: int) -> Sampler:
    steps = (nfe + 1) // 2 if algorithm in ("heun", "edm") else nfe
    return Sampler(algorithm, steps, spacing, **options)


def run_process(name: str, args, test_images: torch.Tensor, out: Path) -> dict:
    run_dir = out / name / "run"
    cfg = compose_train([f"experiment={PRESETS[name]}", f"trainer.max_steps={args.steps}", "trainer.max_epochs=-1",
                         f"data.batch_size={args.batch_size}", "logger=none", f"paths.output_dir={run_dir}",
                         "callbacks.sample_media=null", "callbacks.rich_progress_bar=null", f"seed={args.seed}",
                         "ckpt_path=auto"])  # a rerun reuses a finished training run
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    model = load_model(torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False), "ema",
                       torch.device("cpu"))
    rows = []
    for nfe in args.nfe:
        for algorithm, spacing, options in CANDIDATES[name][: args.samplers]:
            sampler = sampler_at(algorithm, spacing, options, nfe)
            samples = generate(model, sampler, args.num_samples, 250, seed=args.seed).samples
            scores = score(samples, test_images, args.classifier, args.seed)
            rows.append({"nfe": nfe, "sampler": str(sampler), "evaluations": sampler.evaluations_used, "fd": scores["fd"],
                         "precision": scores["precision"], "recall": scores["recall"]})
            print(f"{name} NFE {nfe} {sampler}: FD {scores['fd']:.1f}", flush=True)
    result = {"process": name, "preset": PRESETS[name], "steps": args.steps, "batch_size": args.batch_size,
              "num_samples": args.num_samples, "train_seconds": seconds, "rows": rows}
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "results.json").write_text(json.dumps(result, indent=2))
    return result


def table_and_plot(out: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    nfes = sorted({row["nfe"] for r in results for row in r["rows"]})
    lines = ["| process | budget | " + " | ".join(f"FD @ {n} NFE (best sampler)" for n in nfes) + " |",
             "|---|---|" + "---:|" * len(nfes)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in results:
        best = {n: min((row for row in r["rows"] if row["nfe"] == n), key=lambda row: row["fd"]) for n in nfes}
        cells = [f"{best[n]['fd']:.1f} ({best[n]['sampler']})" for n in nfes]
        lines.append(f"| {r['process']} | {r['steps']} x {r['batch_size']}, {r['num_samples']} samples | " + " | ".join(cells) + " |")
        ax.plot(nfes, [best[n]["fd"] for n in nfes], marker="o", label=r["process"])
    ax.set_xlabel("network evaluations")
    ax.set_ylabel("FD (classifier features)")
    ax.set_xscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fd_vs_nfe.png", dpi=100)
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="a feature_classifier checkpoint (experiment=feature_classifier)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[10, 20, 50])
    parser.add_argument("--processes", type=lambda s: s.split(","), default=list(PRESETS))
    parser.add_argument("--samplers", type=int, default=3, help="how many of each process's candidate samplers, first first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/process_quality"))
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    unknown = [p for p in args.processes if p not in PRESETS]
    if unknown:
        parser.error(f"--processes: unknown {unknown}; choose from {', '.join(PRESETS)}")
    test_images, _ = data_split(DATA, "test")
    for name in args.processes:
        run_process(name, args, test_images, args.out)
    print(table_and_plot(args.out))


if __name__ == "__main__":
    main()
