"""The README's figure of issue 27 from sweep results (`python -m diffusion_lab.sweep`, `benchmarks/guidance_ema.py`):
left, FD against post-hoc EMA length sigma_rel at w = 1, beside the run's own EMA; right, FD against guidance scale
for each guide and interval (classifier-free, on an interval, autoguidance), each line labelled with its network
evaluations per sample, and the unguided sampler as horizontal lines at its evaluation counts.

    python benchmarks/guidance_ema_figure.py --ema SWEEP_DIR [...] --guidance SWEEP_DIR [...] --out FIG.png
"""

import argparse
import json
from pathlib import Path


def read(directories: list[Path]) -> list[dict]:
    """Every point of the sweeps' results.jsonl files."""
    return [json.loads(line) for d in directories for line in (d / "results.jsonl").read_text().splitlines()]


def ema_panel(ax, points: list[dict]) -> None:
    unguided = [p for p in points if p["guidance_scale"] == 1]
    reconstructed = sorted((float(p["ema"]), p["fd"]) for p in unguided if p["ema"] not in ("ema", "raw"))
    if reconstructed:
        ax.plot(*zip(*reconstructed), marker="o", label="post-hoc EMA (reconstructed)")
    for p in unguided:
        if p["ema"] in ("ema", "raw"):
            ax.axhline(p["fd"], linestyle="--", color="gray" if p["ema"] == "ema" else "red",
                       label="the run's own EMA" if p["ema"] == "ema" else "raw weights")
    ax.set_xlabel("EMA length sigma_rel")
    ax.set_ylabel("FD (shipped classifier)")
    ax.set_title("FD against EMA length (w = 1)")
    ax.legend()


def series_label(point: dict) -> str:
    guide = "classifier-free" if point["guide"] == "cfg" else f"autoguidance ({point['guide']})"
    interval = f" on sigma in ({point['interval'][0]:g}, {point['interval'][1]:g}]" if point["interval"] else ""
    return f"{guide}{interval}, {point['network_evaluations']:.0f} NFE"


def guidance_panel(ax, points: list[dict]) -> None:
    own = [p for p in points if p["ema"] == "ema"]
    for p in (p for p in own if p["guidance_scale"] == 1):
        ax.axhline(p["fd"], linestyle=":", color="gray")
        ax.annotate(f"no guidance, {p['network_evaluations']:.0f} NFE", (1, p["fd"]), fontsize=8, va="bottom")
    series: dict[str, list[tuple[float, float]]] = {}
    for p in (p for p in own if p["guidance_scale"] != 1):
        series.setdefault(series_label(p), []).append((p["guidance_scale"], p["fd"]))
    for label, xy in sorted(series.items()):
        ax.plot(*zip(*sorted(xy)), marker="o", label=label)
    ax.set_xlim(left=0.9)
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel("FD (shipped classifier)")
    ax.set_title("FD against guidance scale (the run's EMA)")
    ax.legend(fontsize=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ema", type=Path, nargs="+", required=True, help="sweep outputs with post-hoc EMA lengths")
    parser.add_argument("--guidance", type=Path, nargs="+", required=True, help="sweep outputs with guidance scales")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ema_panel(left, read(args.ema))
    guidance_panel(right, read(args.guidance))
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
