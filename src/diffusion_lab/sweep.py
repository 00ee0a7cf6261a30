"""After training: `python -m diffusion_lab.sweep RUN out=DIR [key=value ...]` samples a grid of (EMA length x
guidance scale x guidance interval) from one run, scores each point and names the best.

Options (values in YAML: lists as [a,b]):
  emas=[ema,0.05,0.1]        EMA lengths: `ema` (the checkpoint's own EMA), `raw`, or a post-hoc sigma_rel
                             (reconstructed from the run's snapshots, `python -m diffusion_lab.posthoc_ema`)
  guidance_scales=[1]        w of D_g + w (D - D_g); 1 = no guidance
  intervals=[null]           guidance intervals [s_lo,s_hi] in sigma/alpha; null = every level
  guide=cfg                  cfg (the null class; a class-conditional run), a checkpoint path, or step:N[@S]: the
                             run's own post-hoc EMA of length S (default 0.05) at its snapshot step N (autoguidance by
                             an earlier model, Karras et al. 2024)
  num_samples=1000 batch_size=250 seed=0
  sampler=null steps=null    the checkpoint's sampler, or configs/sampler/<name>.yaml; N steps (null: its own)
  extractor=classifier       the features FD is computed in (metrics/common.yaml: classifier | inception | dinov2)
  weights_path=null          the extractor's weights (inception, dinov2)
Writes DIR/results.jsonl (a point per line, as it is scored: a rerun with the same options goes on from there),
DIR/table.md, DIR/heatmap.png (FD over EMA length x guidance scale, a panel per interval) and DIR/best.json.
Samples are seed-exact (sample i depends only on (seed, i)), so every point draws from the same noise.
"""

import json
import math
import sys
from pathlib import Path

import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.builders import load_model
from diffusion_lab.config import compose_config, config_option
from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.ema.snapshots import reconstruct_checkpoint
from diffusion_lab.generate import generate
from diffusion_lab.metrics.evaluate import check_scoring, data_split, score_samples
from diffusion_lab.metrics.extractors import classifier_path_for
from diffusion_lab.utils.checkpoint import load_checkpoint
from diffusion_lab.utils.cli import one_line_errors
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_path

USAGE = "usage: python -m diffusion_lab.sweep RUN out=DIR [emas=[...]] [guidance_scales=[...]] [intervals=[...]] ..."
DEFAULTS = {"out": None, "emas": ["ema"], "guidance_scales": [1.0], "intervals": [None], "guide": "cfg",
            "num_samples": 1000, "batch_size": 250, "seed": 0, "sampler": None, "steps": None, "extractor": "classifier",
            "weights_path": None}


def parse(argv: list[str]) -> tuple[Path, dict]:
    """RUN and the options (DEFAULTS overridden), each value read as YAML; ConfigError naming what is wrong."""
    if not argv or "=" in argv[0]:
        raise ConfigError(USAGE)
    options = dict(DEFAULTS)
    for argument in argv[1:]:
        key, _, value = argument.partition("=")
        if key not in DEFAULTS or not value:
            raise ConfigError(f"{argument!r}: expected one of {', '.join(f'{k}=' for k in DEFAULTS)}; {USAGE}")
        options[key] = yaml.safe_load(value)
    if options["out"] is None:
        raise ConfigError(f"out=DIR missing; {USAGE}")
    for key in ("emas", "guidance_scales", "intervals"):
        if not isinstance(options[key], list) or not options[key]:
            raise ConfigError(f"{key}={options[key]} must be a non-empty list, e.g. {key}=[{DEFAULTS[key][0]}]")
    for ema in options["emas"]:
        if ema not in ("ema", "raw") and (isinstance(ema, bool) or not isinstance(ema, (int, float)) or ema <= 0):
            raise ConfigError(f"emas: {ema!r} is not `ema`, `raw` or a sigma_rel > 0")
    for key in ("num_samples", "batch_size"):
        if isinstance(options[key], bool) or not isinstance(options[key], int) or options[key] < 1:
            raise ConfigError(f"{key}={options[key]} must be an integer >= 1")
    return Path(argv[0]), options


def model_for(run: Path, ema, device: torch.device):
    """The run's model with the EMA `ema`: `ema`/`raw` weights of last.ckpt, or the post-hoc EMA of that sigma_rel."""
    if ema in ("ema", "raw"):
        return load_model(load_checkpoint(run / "checkpoints" / "last.ckpt", key="RUN"), ema, device)
    return load_model(reconstruct_checkpoint(run, float(ema)), "ema", device)


def guide_model(run: Path, guide: str, device: torch.device):
    """The autoguidance guide (None for cfg): a checkpoint, or the run's post-hoc EMA at an earlier step (step:N@S)."""
    if guide == "cfg":
        return None
    if str(guide).startswith("step:"):
        step, _, sigma_rel = str(guide)[5:].partition("@")
        return load_model(reconstruct_checkpoint(run, float(sigma_rel or 0.05), step=int(step)), "ema", device)
    return load_model(load_checkpoint(guide, key="guide"), "ema", device)


def sampler_of(checkpoint_config: dict, name: str | None, steps: int | None):
    """The checkpoint's own sampler, or configs/sampler/<name>.yaml, with `steps` steps when given."""
    config = OmegaConf.create(checkpoint_config)
    if name is not None:
        config.sampler = config_option("sampler", name)
    if steps is not None:
        config.sampler.steps = steps
    return instantiate(OmegaConf.to_container(config.sampler, resolve=True))


def scoring_options(options: dict, data: dict) -> dict:
    """metrics=[fid] of configs/metrics with the chosen extractor, checked before anything is drawn."""
    overrides = ["ckpt_path=unused", "metrics=[fid]", f"metrics.extractor={options['extractor']}"]
    if options["weights_path"]:
        overrides.append(f"metrics.weights_path={options['weights_path']}")
    scoring = OmegaConf.to_container(compose_config("sample", overrides).metrics, resolve=True)
    check_scoring(scoring, data, options["num_samples"])
    return {**scoring, "classifier_path": classifier_path_for(scoring, data)}


def point_key(ema, scale: float, interval) -> str:
    return json.dumps([ema, float(scale), interval])


def score_point(model, guide, sampler, labels, options: dict, scale: float, interval, real, scoring, device) -> dict:
    """FD of one point and the network evaluations per sample it took (guide included)."""
    span = (0.0, math.inf) if interval is None else tuple(interval)
    guidance = model.autoguidance(guide, scale, span) if guide is not None else Guidance(scale, span)
    rows = []
    hooks = [net.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
             for net in {model.net, *([] if guide is None else [guide.net])}]
    try:
        samples = generate(model, sampler, options["num_samples"], options["batch_size"], seed=options["seed"],
                           class_labels=labels, guidance=guidance).samples
    finally:
        for hook in hooks:
            hook.remove()
    scored = score_samples(torch.from_numpy(samples).permute(0, 3, 1, 2), real, scoring, device, options["seed"])
    return {"fd": scored["fid"], "network_evaluations": sum(rows) / options["num_samples"],
            "extractor": scored["protocol"]["extractor"]}


def write_table(out: Path, results: list[dict]) -> Path:
    """table.md: one row per point, FD ascending."""
    lines = ["| EMA | guidance scale | interval | guide | FD | network evaluations / sample |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["fd"]):
        lines.append(f"| {r['ema']} | {r['guidance_scale']:g} | {r['interval'] or 'all'} | {r['guide']} | "
                     f"{r['fd']:.3f} | {r['network_evaluations']:.1f} |")
    path = out / "table.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def write_heatmap(out: Path, results: list[dict], emas: list, scales: list, intervals: list) -> Path:
    """heatmap.png: FD over EMA length (rows) x guidance scale (columns), one panel per interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(intervals), figsize=(1.2 + 1.1 * len(scales) * len(intervals), 1 + 0.5 * len(emas)),
                             squeeze=False)
    by_key = {point_key(r["ema"], r["guidance_scale"], r["interval"]): r["fd"] for r in results}
    for ax, interval in zip(axes[0], intervals):
        grid = np.array([[by_key.get(point_key(e, s, interval), np.nan) for s in scales] for e in emas])
        ax.imshow(grid, cmap="viridis_r", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(scales)), [f"{s:g}" for s in scales])
        ax.set_yticks(range(len(emas)), [str(e) for e in emas])
        ax.set_xlabel("guidance scale")
        ax.set_title(f"interval {interval or 'all'}", fontsize=8)
    axes[0][0].set_ylabel("EMA (sigma_rel)")
    fig.tight_layout()
    path = out / "heatmap.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def read_results(out: Path, header: dict) -> list[dict]:
    """The points scored by an earlier run of the same sweep (sweep.json holds its options); a new out records them.
    ConfigError when out holds a sweep of other options."""
    out.mkdir(parents=True, exist_ok=True)
    record = out / "sweep.json"
    if not record.is_file():
        with atomic_path(record) as tmp:
            tmp.write_text(json.dumps(header, indent=2) + "\n")
        return []
    saved = json.loads(record.read_text())
    if saved != header:
        different = sorted(k for k in {*saved, *header} if saved.get(k) != header.get(k))
        raise ConfigError(f"out={out} holds a sweep with other {', '.join(different)}; choose another out")
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@one_line_errors
def main(argv: list[str]) -> None:
    run, options = parse(argv)
    out = Path(options["out"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    last = load_checkpoint(run / "checkpoints" / "last.ckpt", key="RUN")
    data = last["config"]["data"]
    scoring = scoring_options(options, data)
    sampler = sampler_of(last["config"], options["sampler"], options["steps"])
    guide = guide_model(run, options["guide"], device)
    header = {"run": str(run.resolve()), **{k: v for k, v in options.items() if k not in ("out", "emas",
              "guidance_scales", "intervals")}, "sampler": str(sampler)}
    results = read_results(out, header)
    done = {point_key(r["ema"], r["guidance_scale"], r["interval"]) for r in results}
    real, _ = data_split(data, scoring["real_split"])
    labels = list(range(data["num_classes"])) if data.get("conditional") else None
    models = {json.dumps(ema): model_for(run, ema, device) for ema in options["emas"]}  # every length checked first
    for ema in options["emas"]:
        model = models[json.dumps(ema)]
        for scale in options["guidance_scales"]:
            for interval in options["intervals"]:
                if point_key(ema, scale, interval) in done or (interval is not None and scale == 1):
                    continue
                scored = score_point(model, guide, sampler, labels, options, scale, interval, real, scoring, device)
                result = {"ema": ema, "guidance_scale": float(scale), "interval": interval,
                          "guide": options["guide"] if scale != 1 else None, **scored}
                results.append(result)
                with open(out / "results.jsonl", "a") as log:
                    log.write(json.dumps(result) + "\n")
                print(f"EMA {ema}, w={scale:g}, interval {interval or 'all'}: FD {scored['fd']:.3f} "
                      f"({scored['network_evaluations']:.0f} network evaluations / sample)", flush=True)
    best = min(results, key=lambda r: r["fd"])
    write_table(out, results)
    write_heatmap(out, results, options["emas"], options["guidance_scales"], options["intervals"])
    with atomic_path(out / "best.json") as tmp:
        tmp.write_text(json.dumps(best, indent=2) + "\n")
    print(f"best: EMA {best['ema']}, guidance scale {best['guidance_scale']:g}, interval {best['interval'] or 'all'}: "
          f"FD {best['fd']:.3f}; table {out / 'table.md'}, heat-map {out / 'heatmap.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
