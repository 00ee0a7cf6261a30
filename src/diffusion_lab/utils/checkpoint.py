"""Checkpoints: saved atomically, loaded without running code (`torch.load(weights_only=True)`)."""

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from omegaconf import OmegaConf

from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_path

WEIGHTS = ("ema", "raw")
# What defines a run: a resume must match these (resolved) keys of the checkpoint's config, or name the ones it
# changes in resume.allow_changes. Everything else (trainer.max_steps, trainer hardware, logger, callbacks, paths,
# sampler, compile) changes freely; so do the keys below that say how the run reads its data or runs its network.
RUN_DEFINING_KEYS = ("model", "process", "schedule", "data", "module", "optimizer", "lr_scheduler", "seed", "first_stage",
                     "first_stage_ckpt", "teacher_ckpt", "vae_path", "trainer.accumulate_grad_batches", "representation")
FREE_KEYS = ("model.gradient_checkpointing", "data.num_workers", "data.pin_memory", "data.in_memory_limit_mb",
             "data.cache_dir", "module.pairs_dir", "module.checkpoint_dir")  # the last two: folders under paths.output_dir
FORMAT_VERSION = 2  # of what this project writes into checkpoints; raise it when a reader must change
# 2: the diffusion LightningModule holds one model object: weights under model.net. and model.first_stage.


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary name beside the target, flushed to disk and renamed onto it: an interrupted save
    never leaves a half-written checkpoint in place of a good one. (Lightning's own save stages the file in the
    system temp folder, which may be too small or on another disk.) Stamps `format_version` into every checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        checkpoint["format_version"] = FORMAT_VERSION
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())


def load_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """A project checkpoint as plain containers and tensors; ConfigError if missing, truncated or foreign."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path} does not exist; give the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{key}={path} is not a readable checkpoint (truncated or not saved by torch): {first_line[:200]}") from error
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise ConfigError(f"{key}={path} is not a checkpoint of this project (no saved config); train one with train.py")
    version = checkpoint.get("format_version", 1)  # checkpoints from before the field are version 1
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ConfigError(f"{key}={path} has checkpoint format {version}, newer than this diffusion-lab reads (up to "
                          f"{FORMAT_VERSION}); upgrade diffusion-lab (pip install -e .) to load it")
    return upgrade_checkpoint(checkpoint)


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A diffusion checkpoint of format 1 (weights under net. and first_stage.) brought to the current format, in
    place: the weights move under model. (the model object). The backbone config of a diffusion checkpoint loses
    `channels` / `image_size`, which configs declared as the data's before the builder became their one source (it
    always passed its own: the data's, or under latent diffusion the latents'). Autoencoder and feature-classifier
    checkpoints, whose model config is their whole build, are left as they are."""
    model = checkpoint.get("config", {}).get("model")
    if isinstance(model, dict) and not {"first_stage", "feature_classifier"} & set(checkpoint):
        for key in ("channels", "image_size"):
            model.pop(key, None)
    module = str(checkpoint.get("config", {}).get("module", {}).get("_target_", ""))
    if checkpoint.get("format_version", 1) == 1 and module.endswith(("DiffusionModule", "LatentDiffusionModule")):
        for key in ("state_dict", "current_model_state"):
            if key in checkpoint:
                checkpoint[key] = {
                    f"model.{name}" if name.startswith(("net.", "first_stage.")) else name: value
                    for name, value in checkpoint[key].items()
                }
        checkpoint["format_version"] = FORMAT_VERSION
    return checkpoint


def saved_step(path: str | Path) -> int | None:
    """The global step a checkpoint file holds (memory-mapped: no weights read), None if there is none."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError):
        return None


def model_weights(checkpoint: dict[str, Any], weights: str = "ema") -> dict[str, torch.Tensor]:
    """The LightningModule state dict: the EMA weights ("ema", stored under `state_dict` by Lightning's
    WeightAveraging) or the trained weights ("raw", under `current_model_state` when an EMA ran)."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r}; choose one of {', '.join(WEIGHTS)}")
    if weights == "raw" and "current_model_state" in checkpoint:
        return checkpoint["current_model_state"]
    return checkpoint["state_dict"]


def submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed (and any torch.compile `_orig_mod.` segment)."""
    return {
        name[len(prefix) + 1 :].replace("_orig_mod.", ""): value
        for name, value in state_dict.items()
        if name.startswith(prefix + ".")
    }


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"dim": 28}} -> {"model.dim": 28}: dashboards filter by any hyperparameter; resume compares them."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def under(key: str, prefixes) -> bool:
    """Whether dotted `key` is one of `prefixes` or lies below one."""
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


ABSENT = "(absent)"


def config_differences(saved: Any, current: Any, key: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved, current)} for every value in which two resolved configs differ; nodes of the same class
    (`_target_`) are compared key by key, anything else (another class, a node against a value) as a whole."""
    if isinstance(saved, dict) and isinstance(current, dict) and saved.get("_target_") == current.get("_target_"):
        found = {}
        for name in dict.fromkeys([*saved, *current]):
            found.update(config_differences(saved.get(name, ABSENT), current.get(name, ABSENT), f"{key}{name}."))
        return found
    return {} if saved == current else {key.rstrip("."): (saved, current)}


def described(value: Any) -> str:
    """A config value for one line: a class node by its class, a long node cut short."""
    if isinstance(value, dict) and "_target_" in value:
        return f"{value['_target_']}(...)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_same_run(checkpoint: dict[str, Any], config: dict, ckpt_path: str, allowed: list[str]) -> None:
    """ConfigError naming every run-defining key in which `config` (resolved) differs from the checkpoint's config,
    with both values, unless `allowed` (resume.allow_changes) names it."""
    for key in allowed:
        if not any(under(key, [prefix]) or under(prefix, [key]) for prefix in RUN_DEFINING_KEYS) or under(key, FREE_KEYS):
            raise ConfigError(f"resume.allow_changes names {key}, which is not a key a resume must keep; those are "
                              f"{', '.join(RUN_DEFINING_KEYS)} (less {', '.join(FREE_KEYS)}); the rest changes freely")
    differences = {key: values for key, values in config_differences(checkpoint["config"], config).items()
                   if under(key, RUN_DEFINING_KEYS) and not under(key, FREE_KEYS) and not under(key, allowed)}
    if differences:
        listed = "; ".join(f"{key}: {described(saved)} in the checkpoint, {described(value)} here"
                           for key, (saved, value) in differences.items())
        raise ConfigError(f"ckpt_path={ckpt_path} is another run: {listed}. Resume with its values{started_with(ckpt_path)}, "
                          f"or accept the change with resume.allow_changes=[{','.join(differences)}]")


def started_with(ckpt_path: str) -> str:
    """' (it was started with: OVERRIDES)' from the `.hydra/overrides.yaml` of the checkpoint's run folder, if any."""
    overrides = Path(ckpt_path).resolve().parent.parent / ".hydra" / "overrides.yaml"
    try:
        listed = [str(o) for o in OmegaConf.load(overrides) if not str(o).startswith(("ckpt_path=", "paths."))]
    except (OSError, ValueError, TypeError):
        return ""
    return f" (it was started with: {' '.join(listed)})" if listed else ""
