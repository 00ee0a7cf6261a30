"""Post-hoc EMA snapshots on disk, and the checkpoint reconstructed from them (EDM2's `reconstruct_phema.py`).

A snapshot `phema-<step>-<sigma_rel>.pt` holds one power-function EMA of the LightningModule's weights at one step:
{"posthoc_ema": {"step", "sigma_rel", "gamma"}, "state_dict": {name: tensor}}. The reconstruction is the run's
checkpoint with its EMA weights (`state_dict`, what sample.py reads) replaced and its training state dropped.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_lab.ema.power_ema import (
    combine_state_dicts,
    expressible_sigma_rels,
    sigma_rel_to_gamma,
    solve_posthoc_coefficients,
)
from diffusion_lab.utils.checkpoint import load_checkpoint
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_path

SNAPSHOT_DIR = Path("checkpoints") / "posthoc_ema"  # in a run folder (callbacks.posthoc_ema.dirpath)
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks")  # what only a resume reads


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rel: float
    gamma: float


def write_snapshot(dirpath: str | Path, step: int, sigma_rel: float, gamma: float, state_dict: dict[str, Tensor]) -> Path:
    """Saves one EMA at one step (atomically: a killed write leaves no half file under the snapshot's name)."""
    path = Path(dirpath) / f"phema-{step:07d}-{sigma_rel:.3f}.pt"
    with atomic_path(path) as tmp:
        torch.save({"posthoc_ema": {"step": step, "sigma_rel": sigma_rel, "gamma": gamma}, "state_dict": state_dict}, tmp)
    return path


def list_snapshots(dirpath: str | Path) -> list[Snapshot]:
    """The snapshots in `dirpath`, by step then sigma_rel (their records read memory-mapped: no weights loaded)."""
    snapshots = []
    for path in Path(dirpath).glob("phema-*.pt"):
        try:
            record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["posthoc_ema"]
        except (RuntimeError, KeyError, pickle.UnpicklingError) as error:
            raise ConfigError(f"{path} is not a readable post-hoc EMA snapshot ({type(error).__name__}); delete it") from error
        snapshots.append(Snapshot(path, int(record["step"]), float(record["sigma_rel"]), float(record["gamma"])))
    return sorted(snapshots, key=lambda s: (s.step, s.sigma_rel))


def contiguous_spans(grid_values: list[float], step: float = 0.005) -> list[tuple[float, float]]:
    """The runs of consecutive values of a grid of spacing `step`, as (first, last) pairs."""
    spans: list[list[float]] = []
    for value in grid_values:
        if spans and abs(value - spans[-1][1] - step) < step / 2:
            spans[-1][1] = value
        else:
            spans.append([value, value])
    return [(lo, hi) for lo, hi in spans]


def reconstruct_checkpoint(run: str | Path, sigma_rel: float, step: int | None = None,
                           max_profile_error: float = 0.05) -> dict[str, Any]:
    """The checkpoint `<run>/checkpoints/last.ckpt` holding, as its EMA weights, the power-function EMA of `sigma_rel`
    at `step` (default: the latest snapshot's) fitted by least squares over the snapshots taken up to that step;
    ConfigError when the fit's relative profile error exceeds `max_profile_error`. Its `posthoc_ema` entry records
    sigma_rel, gamma, step, the profile error and the snapshots' coefficients."""
    run = Path(run)
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(f"RUN={run} is not a run folder (no checkpoints/last.ckpt); give the paths.output_dir of a "
                          "train.py run")
    snapshots = list_snapshots(run / SNAPSHOT_DIR)
    if not snapshots:
        raise ConfigError(f"RUN={run} has no post-hoc EMA snapshots in {SNAPSHOT_DIR}; train with "
                          "callbacks=[default,posthoc_ema]")
    taken = sorted({s.step for s in snapshots})
    step = taken[-1] if step is None else step
    if step not in taken:
        raise ConfigError(f"step={step} has no snapshot; choose one of {taken}")
    used = [s for s in snapshots if s.step <= step]
    gamma = sigma_rel_to_gamma(sigma_rel)
    steps, gammas = [s.step for s in used], [s.gamma for s in used]
    coefficients, error = solve_posthoc_coefficients(steps, gammas, step, gamma)
    if error > max_profile_error:
        reach = expressible_sigma_rels(steps, gammas, step, max_profile_error)
        span = ", ".join(f"[{lo}, {hi}]" for lo, hi in contiguous_spans(reach)) or "none"
        raise ConfigError(f"sigma_rel={sigma_rel} is beyond what the {len(used)} snapshots up to step {step} express: "
                          f"its profile is fitted to {error:.1%}, over max_profile_error={max_profile_error}; they "
                          f"express sigma_rel in {span} (more snapshots widen it: callbacks.posthoc_ema.every_n_steps)")
    checkpoint = load_checkpoint(last, key="RUN")
    weights = combine_state_dicts((torch.load(s.path, map_location="cpu", weights_only=True)["state_dict"] for s in used),
                                  coefficients.tolist())
    if weights.keys() != checkpoint["state_dict"].keys():
        raise ConfigError(f"the snapshots in {run / SNAPSHOT_DIR} hold other weights than {last}; they are of another run")
    record = {"sigma_rel": sigma_rel, "gamma": gamma, "step": step, "profile_error": error,
              "snapshots": [s.path.name for s in used], "coefficients": coefficients.tolist()}
    kept = {key: value for key, value in checkpoint.items() if key not in TRAINING_STATE}
    return {**kept, "state_dict": weights, "posthoc_ema": record}
