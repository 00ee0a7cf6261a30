"""`sample(cfg)`: samples from a checkpoint alone: samples.npz, grid.png, trajectory.gif (and figures), on one or
several devices (Lightning Fabric), sample i depending only on (seed, i) (see `generate`), written chunk by chunk
under output_dir/chunks/ so that a restart with the same arguments continues where it stopped. A finished output_dir
keeps the arguments that drew it (run.json): the same arguments find it done, other ones are refused in one line."""

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from diffusion_lab.builders import load_model
from diffusion_lab.config import config_option
from diffusion_lab.diffusion.consistency import Consistency
from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.generate import generate
from diffusion_lab.metrics.evaluate import check_scoring, needs_samples, write_scores
from diffusion_lab.metrics.nll import check_bound
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.utils.checkpoint import load_checkpoint
from diffusion_lab.utils.errors import ConfigError, NonFiniteError
from diffusion_lab.utils.io import atomic_path, check_writable_folder
from diffusion_lab.utils.launch import launch
from diffusion_lab.utils.media import forward_noising_figure, save_gif, save_grid, save_samples

FIGURES = ("forward",)
RECORD = "run.json"  # the arguments that drew the samples: in output_dir/chunks/ while drawing, in output_dir when done


def sampler_config(saved: dict, override: DictConfig) -> DictConfig:
    """The checkpoint's sampler, replaced by a chosen `sampler=NAME`, or with the options given (sampler.steps=N,
    +sampler.eta=X, ...) overriding its own."""
    chosen = OmegaConf.to_container(override, resolve=False)
    if "_target_" in chosen:  # sampler=NAME: a whole sampler config; ${schedule.timesteps} resolves against the checkpoint's
        base = OmegaConf.create({**saved, "sampler": chosen})
    else:
        base = OmegaConf.create(saved)
        for key, value in chosen.items():
            if value is not None:
                base.sampler[key] = value
    return OmegaConf.create(OmegaConf.to_container(base.sampler, resolve=True))


def differences(saved: dict, record: dict) -> str:
    """`key: A there, B here` for each key where two records of arguments differ."""
    keys = sorted(key for key in {*saved, *record} if saved.get(key) != record.get(key))
    return "; ".join(f"{key}: {saved.get(key)} there, {record.get(key)} here" for key in keys)


def chunks_done(chunk_dir: Path, record: dict, num_samples: int, chunk_size: int) -> set[int]:
    """Starts of the finished chunks under `chunk_dir` (each `<start>.npy`, samples start .. start + chunk_size - 1,
    or fewer at the end) of a run with the same `record`; a new chunk dir records it. ConfigError when the dir holds
    chunks of other arguments."""
    record_path = chunk_dir / RECORD
    if not record_path.is_file():
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
        return set()
    saved = json.loads(record_path.read_text())
    if saved != record:
        raise ConfigError(f"{chunk_dir} holds chunks of a run with other arguments ({differences(saved, record)}); "
                          "delete it or choose another output_dir")
    done = set()
    for path in chunk_dir.glob("[0-9]*.npy"):  # not the hidden temporary of a write that was killed
        start = int(path.stem)
        if start % chunk_size == 0 and len(np.load(path, mmap_mode="r")) == min(chunk_size, num_samples - start):
            done.add(start)
    return done


def finished(output_dir: Path, record: dict) -> bool:
    """Whether output_dir holds the finished samples of `record` (its run.json says so); ConfigError when it holds
    samples of other arguments, or a samples.npz with no record of what drew it: they are never replaced."""
    if not (output_dir / "samples.npz").is_file():
        return False
    saved = json.loads((output_dir / RECORD).read_text()) if (output_dir / RECORD).is_file() else None
    if saved is None:
        raise ConfigError(f"output_dir={output_dir} already holds a samples.npz, with no {RECORD} saying what drew it; "
                          "choose another output_dir, or delete it")
    if saved != record:
        raise ConfigError(f"output_dir={output_dir} holds the samples of other arguments ({differences(saved, record)}); "
                          "choose another output_dir, or delete it to draw these")
    return True


def check_options(cfg: DictConfig) -> None:
    """One line for each option of sample.yaml given a value it cannot take, and for a key it does not have."""
    defaults = config_option(None, "sample")
    groups = {key for entry in defaults.defaults if not isinstance(entry, str) for key in entry if " " not in key}
    unknown = sorted(set(cfg) - set(defaults) - groups)
    if unknown:
        raise ConfigError(f"{unknown[0]} is not an option of sample.py; its options are: "
                          f"{', '.join(key for key in defaults if key not in ('defaults', 'hydra'))}")
    for key in ("num_samples", "batch_size", "trajectory_samples", "grid_size", "chunk_size"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be an integer >= 1")
    if cfg.clip_denoised not in (None, True, False):
        raise ConfigError(f"clip_denoised={cfg.clip_denoised} must be true, false or null (the process's default)")
    labels = cfg.class_labels
    if labels is not None and (not OmegaConf.is_list(labels) or not labels
                               or not all(isinstance(label, int) and not isinstance(label, bool) for label in labels)):
        raise ConfigError(f"class_labels={labels} must be a list of class indices, e.g. class_labels=[0,3]")
    bad = [f for f in cfg.figures if f not in FIGURES]
    if bad:
        raise ConfigError(f"figures={list(cfg.figures)}: unknown {bad}; allowed: {', '.join(FIGURES)}")
    check_writable_folder(cfg.output_dir, "output_dir")


def class_labels(cfg: DictConfig, data: dict) -> list[int] | None:
    """The labels cycled over the samples: class_labels, or every class of a class-conditional model."""
    conditional = data.get("conditional", False)
    labels = list(cfg.class_labels) if cfg.class_labels is not None else None
    if labels is not None or (cfg.guidance_scale != 1.0 and cfg.guide_ckpt is None):
        if not conditional:
            raise ConfigError("class_labels and classifier-free guidance need a class-conditional checkpoint "
                              "(data.conditional=true); guide_ckpt=PATH guides an unconditional one (autoguidance)")
        if labels is not None and any(not 0 <= label < data["num_classes"] for label in labels):
            raise ConfigError(f"class_labels={labels}: this model has {data['num_classes']} classes, labels must be in "
                              f"0..{data['num_classes'] - 1}")
    return list(range(data["num_classes"])) if conditional and labels is None else labels


def check_sampler(sampler: Any, model: DiffusionModel) -> None:
    if sampler.algorithm == "consistency" and not isinstance(model.process, Consistency):
        raise ConfigError(f"sampler=consistency samples consistency models (process=consistency); this checkpoint's "
                          f"process is {type(model.process).__name__}: choose another sampler (e.g. sampler=ddim)")
    sampler.check(*model.sampling_grid(sampler))


def guidance_of(cfg: DictConfig, model: DiffusionModel, sampler: Any, device: torch.device) -> Guidance:
    """guidance_scale over guidance_interval, by the model at the null class or by the guide_ckpt model, checked
    against the sampler's grid; one line for a guide or an interval with nothing to guide (guidance_scale=1)."""
    interval = (0.0, math.inf) if cfg.guidance_interval is None else tuple(cfg.guidance_interval)
    if len(interval) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval):
        raise ConfigError(f"guidance_interval={cfg.guidance_interval} must be [s_lo,s_hi], noise levels sigma/alpha")
    if cfg.guidance_scale == 1 and (cfg.guide_ckpt is not None or cfg.guidance_interval is not None):
        raise ConfigError("guide_ckpt and guidance_interval shape guidance, and guidance_scale=1 is none: give "
                          "guidance_scale=W (W > 1 guides)")
    if cfg.guide_ckpt is None:
        guidance = Guidance(cfg.guidance_scale, interval)
    else:
        guide = load_model(load_checkpoint(cfg.guide_ckpt), cfg.weights, device, f"guide_ckpt={cfg.guide_ckpt}")
        guidance = model.autoguidance(guide, cfg.guidance_scale, interval)
    guidance.check_grid(*model.sampling_grid(sampler))
    return guidance


def load_for_sampling(cfg: DictConfig) -> tuple[dict, Fabric, DiffusionModel, Any, Guidance]:
    """The checkpoint, the devices, the model, the sampler and the guidance, each checked before anything is
    drawn."""
    check_options(cfg)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    fabric = launch(cfg)
    model = load_model(checkpoint, cfg.weights, fabric.device, f"ckpt_path={cfg.ckpt_path}")
    sampler = instantiate(sampler_config(checkpoint["config"], cfg.sampler))
    check_sampler(sampler, model)
    if "forward" in cfg.figures and model.latent:
        raise ConfigError("figures=[forward] draws the process on images; this model diffuses latents")
    return checkpoint, fabric, model, sampler, guidance_of(cfg, model, sampler, fabric.device)


def checked_on_rank_zero(fabric: Fabric, check: Callable[[], Any], default: Any) -> Any:
    """check() run on global rank 0 and its result broadcast to every rank; its ConfigError raised on every rank."""
    try:
        found = (check(), None) if fabric.global_rank == 0 else None
    except ConfigError as error:
        found = (default, str(error))
    result, problem = fabric.broadcast(found, src=0)
    if problem:
        raise ConfigError(problem)
    return result


def forward_figure(cfg: DictConfig, model: DiffusionModel, data: dict, path: Path) -> Path:
    """forward.png: four test images at the data, then at 5 noise levels of the process."""
    images, _ = instantiate(data).load_split(train=False)
    alphas, sigmas = model.process.sampling_grid(5, model.process.default_spacing)
    forward_noising_figure(alphas.flip(0), sigmas.flip(0), images[:4].float() / 127.5 - 1, path, seed=cfg.seed)
    return path


def sample(cfg: DictConfig) -> dict[str, Path]:
    """Writes the sample files into cfg.output_dir; returns their paths (on global rank 0; other ranks: {})."""
    checkpoint, fabric, model, sampler, guidance = load_for_sampling(cfg)
    data = checkpoint["config"]["data"]
    labels = class_labels(cfg, data)
    options = cfg.get("metrics")  # metrics=[fid,kid,prec_recall,nll]: see diffusion_lab.metrics.evaluate
    if options and "nll" in options:
        check_bound(model)  # before any sampling
    if options:
        check_scoring(options, data, cfg.num_samples)  # extractor, weights and metric choices, before any sampling
    output_dir = Path(cfg.output_dir)
    if options and not needs_samples(options):  # metrics=[nll]: the bound needs no sampling
        if fabric.global_rank:
            return {}
        return {"metrics": write_scores(options, output_dir, model, None, data, sampler, cfg.seed, fabric.device,
                                        cfg.ckpt_path)}

    paths = {"samples": output_dir / "samples.npz", "grid": output_dir / "grid.png", "trajectory": output_dir / "trajectory.gif"}
    record = {"checkpoint": str(Path(cfg.ckpt_path).resolve()), "global_step": checkpoint.get("global_step"),
              "weights": cfg.weights, "sampler": str(sampler), "seed": cfg.seed, "class_labels": labels,
              "guidance_scale": cfg.guidance_scale,
              "guidance_interval": None if cfg.guidance_interval is None else list(cfg.guidance_interval),
              "guide_ckpt": None if cfg.guide_ckpt is None else str(Path(cfg.guide_ckpt).resolve()),
              "clip_denoised": cfg.clip_denoised, "chunk_size": cfg.chunk_size}
    whole = {**record, **{key: cfg[key] for key in ("num_samples", "grid_size", "trajectory_samples")}}
    if checked_on_rank_zero(fabric, lambda: finished(output_dir, whole), False):
        if fabric.global_rank:
            return {}
        print(f"{output_dir} already holds these samples (the same arguments): not drawn again")
        samples = np.load(paths["samples"])["arr_0"]
    else:
        samples = draw(cfg, fabric, model, sampler, labels, guidance, record, image_shape=(data["image_size"], data["image_size"],
                                                                                 data["channels"]))
        if fabric.global_rank:
            return {}
        with atomic_path(output_dir / RECORD) as tmp:  # before samples.npz: never a samples.npz without its record
            tmp.write_text(json.dumps(whole, indent=2) + "\n")
        save_samples(samples, paths["samples"])
        save_grid(samples[: cfg.grid_size], paths["grid"])
        shutil.rmtree(output_dir / "chunks")
    if "forward" in cfg.figures:
        paths["forward"] = forward_figure(cfg, model, data, output_dir / "forward.png")
    if options:
        paths["metrics"] = write_scores(options, output_dir, model, samples, data, sampler, cfg.seed, fabric.device,
                                        cfg.ckpt_path)
    return paths


def draw(cfg: DictConfig, fabric: Fabric, model: DiffusionModel, sampler: Any, labels: list[int] | None,
         guidance: Guidance, record: dict, image_shape: tuple[int, int, int]) -> np.ndarray | None:
    """The samples, drawn chunk by chunk into output_dir/chunks/ (going on from the chunks a stopped run of the same
    `record` left) over the ranks; on rank 0 all of them, on the others None."""
    output_dir, device = Path(cfg.output_dir), fabric.device
    kwargs: dict[str, Any] = {"clip_denoised": cfg.clip_denoised, "guidance": guidance}
    chunk_dir = output_dir / "chunks"
    done = checked_on_rank_zero(
        fabric, lambda: chunks_done(chunk_dir, record, cfg.num_samples, cfg.chunk_size), default=set())
    starts = range(0, cfg.num_samples, cfg.chunk_size)
    with Progress(disable=fabric.global_rank != 0) as progress:
        task = progress.add_task(f"sampling {cfg.num_samples} with {sampler} on {fabric.world_size} process(es)",
                                 total=cfg.num_samples, completed=sum(min(cfg.chunk_size, cfg.num_samples - s) for s in done))
        for start in (s for s in starts if s not in done):
            size = min(cfg.chunk_size, cfg.num_samples - start)
            share = -(-size // fabric.world_size)  # rank r draws start + r * share .., the last rank maybe fewer
            first = start + fabric.global_rank * share
            count = max(0, min(share, start + size - first))
            images, failure, out = np.zeros((share, *image_shape), np.uint8), None, None
            try:
                if count:
                    out = generate(model, sampler, count, cfg.batch_size, seed=cfg.seed, class_labels=labels,
                                   trajectory_samples=cfg.trajectory_samples if first == 0 else 0, first=first, **kwargs)
                    images[:count] = out.samples
            except NonFiniteError as error:
                failure = str(error)
            if fabric.all_gather(torch.tensor(failure is not None, device=device)).any():
                if fabric.global_rank == 0 and not any(chunk_dir.glob("[0-9]*.npy")):
                    shutil.rmtree(chunk_dir)  # only its run.json: nothing was drawn, so nothing is left behind
                raise NonFiniteError(failure or "another rank's samples were NaN or inf; no samples written")
            chunk = fabric.all_gather(torch.from_numpy(images).to(device)).reshape(-1, *image_shape)[:size].cpu().numpy()
            if fabric.global_rank == 0:
                with atomic_path(chunk_dir / f"{start:08d}.npy") as tmp:
                    np.save(tmp, chunk)
                if first == 0:
                    save_gif(out.trajectory, output_dir / "trajectory.gif")
            progress.advance(task, size)
    if fabric.global_rank:
        return None
    return np.concatenate([np.load(chunk_dir / f"{start:08d}.npy") for start in starts])
