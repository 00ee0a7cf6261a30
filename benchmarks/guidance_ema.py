"""Post-hoc EMA and guidance after training, on one run: FD against EMA length, and guidance (classifier-free, on an
interval, autoguidance by an earlier model of the same run) at their network evaluations, against the run's own EMA
(today's default, `callbacks.ema`) measured in the same sweep.

    python benchmarks/guidance_ema.py --run RUN_DIR --out DIR [--num-samples 1000] [--steps 50]
    python benchmarks/guidance_ema.py --train --run RUN_DIR ...   # first trains the default recipe with snapshots
        (600 steps x 128, `callbacks=[default,posthoc_ema]`, snapshots every 50 steps; add --conditional for CFG)

Runs `python -m diffusion_lab.sweep` (resumable: a rerun goes on where it stopped) and prints its table with each
point's FD as a ratio to the run's own EMA at w = 1.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(run: Path, steps: int, conditional: bool) -> None:
    """The default recipe with post-hoc EMA snapshots, into run (continued where a stopped run left it)."""
    args = [sys.executable, "train.py", "callbacks=[default,posthoc_ema]", "callbacks.posthoc_ema.every_n_steps=50",
            f"trainer.max_steps={steps}", "logger=csv", f"paths.output_dir={run}"]
    if conditional:
        args.append("data.conditional=true")
    if (run / "checkpoints" / "last.ckpt").is_file():
        args.append("ckpt_path=auto")
    subprocess.run(args, cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/sweep")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--conditional", action="store_true")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--sampler", default="ddim", help="configs/sampler/<name>.yaml (the reference's DDIM)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--emas", default="[ema,0.05,0.08,0.1,0.15]")
    parser.add_argument("--guidance-scales", default="[1]")
    parser.add_argument("--intervals", default="[null]")
    parser.add_argument("--guide", default="cfg", help="cfg | a checkpoint | step:N[@S] (an earlier post-hoc EMA)")
    args = parser.parse_args()
    if args.train:
        train(args.run, args.train_steps, args.conditional)
    out = args.out or args.run / "sweep"
    subprocess.run([sys.executable, "-m", "diffusion_lab.sweep", str(args.run), f"out={out}", f"emas={args.emas}",
                    f"guidance_scales={args.guidance_scales}", f"intervals={args.intervals}", f"guide={args.guide}",
                    f"num_samples={args.num_samples}", f"batch_size={args.batch_size}", f"sampler={args.sampler}",
                    f"steps={args.steps}"],
                   cwd=ROOT, check=True)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    baseline = next((r["fd"] for r in results if r["ema"] == "ema" and r["guidance_scale"] == 1), None)
    print(f"\n{len(results)} points, {args.num_samples} samples each, {args.sampler} {args.steps} steps; ratio: FD / FD of the "
          "run's own EMA at w = 1")
    print(f"{'EMA':>6} {'w':>5} {'interval':>14} {'guide':>10} {'FD':>9} {'ratio':>7} {'NFE':>6}")
    for r in sorted(results, key=lambda r: r["fd"]):
        ratio = f"{r['fd'] / baseline:.3f}" if baseline else "-"
        print(f"{str(r['ema']):>6} {r['guidance_scale']:>5g} {str(r['interval'] or 'all'):>14} {str(r['guide']):>10} "
              f"{r['fd']:>9.3f} {ratio:>7} {r['network_evaluations']:>6.1f}")


if __name__ == "__main__":
    main()
