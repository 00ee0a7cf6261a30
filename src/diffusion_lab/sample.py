"""`sample(cfg)`: samples from a checkpoint alone: samples.npz, grid.png, trajectory.gif (and figures)."""

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.builders import build_model
from diffusion_lab.generate import generate
from diffusion_lab.metrics.evaluate import needs_samples, write_scores
from diffusion_lab.metrics.nll import check_bound
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.utils.checkpoint import load_checkpoint, model_weights, submodule_state
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.media import forward_noising_figure, save_gif, save_grid, save_samples

FIGURES = ("forward",)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def sampler_config(saved: dict, override: DictConfig) -> DictConfig:
    """The checkpoint's sampler, replaced by a chosen `sampler=NAME`, or with steps / spacing overridden."""
    chosen = OmegaConf.to_container(override, resolve=False)
    if "_target_" in chosen:  # sampler=NAME: a whole sampler config; ${schedule.timesteps} resolves against the checkpoint's
        base = OmegaConf.create({**saved, "sampler": chosen})
    else:
        base = OmegaConf.create(saved)
        for key in ("steps", "spacing"):
            if chosen.get(key) is not None:
                base.sampler[key] = chosen[key]
    return OmegaConf.create(OmegaConf.to_container(base.sampler, resolve=True))


def load_model(checkpoint: dict, weights: str, device: torch.device) -> DiffusionModel:
    """The model object of a checkpoint (its saved config), with the chosen weights, in eval mode on `device`."""
    model = build_model(checkpoint["config"], trained_first_stage=False)
    try:
        model.load_state_dict(submodule_state(model_weights(checkpoint, weights), "model"))
    except RuntimeError as error:
        raise ConfigError(f"the checkpoint's weights do not fit its saved model config: {str(error).splitlines()[0]}") from error
    return model.to(device).eval()


def sample(cfg: DictConfig) -> dict[str, Path]:
    """Writes the sample files into cfg.output_dir; returns their paths."""
    for key in ("num_samples", "batch_size", "trajectory_samples", "grid_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be an integer >= 1")
    bad = [f for f in cfg.figures if f not in FIGURES]
    if bad:
        raise ConfigError(f"figures={list(cfg.figures)}: unknown {bad}; allowed: {', '.join(FIGURES)}")
    checkpoint = load_checkpoint(cfg.ckpt_path)
    config = checkpoint["config"]
    device = resolve_device(cfg.device)
    model = load_model(checkpoint, cfg.weights, device)
    sampler = instantiate(sampler_config(config, cfg.sampler))
    sampler.check(*model.sampling_grid(sampler))
    if "forward" in cfg.figures and model.latent:
        raise ConfigError("figures=[forward] draws the process on images; this model diffuses latents")

    data = config["data"]
    conditional = data.get("conditional", False)
    kwargs: dict[str, Any] = {"clip_denoised": cfg.clip_denoised}
    labels = list(cfg.class_labels) if cfg.class_labels is not None else None
    if labels is not None or cfg.guidance_scale != 1.0:
        if not conditional:
            raise ConfigError("class_labels and guidance_scale need a class-conditional checkpoint (data.conditional=true)")
        if labels is not None and any(not 0 <= label < data["num_classes"] for label in labels):
            raise ConfigError(f"class_labels={labels}: labels must be in 0..{data['num_classes'] - 1}")
        kwargs["guidance_scale"] = cfg.guidance_scale
    if conditional and labels is None:
        labels = list(range(data["num_classes"]))

    options = cfg.get("metrics")  # metrics=[fid,kid,prec_recall,nll]: see diffusion_lab.metrics.evaluate
    if options and "nll" in options:
        check_bound(model)  # before any sampling
    if options and not needs_samples(options):  # metrics=[nll]: the bound needs no sampling
        return {"metrics": write_scores(options, Path(cfg.output_dir), model, None, data, sampler, cfg.seed,
                                        device, cfg.ckpt_path)}

    out = generate(model, sampler, cfg.num_samples, cfg.batch_size, seed=cfg.seed, class_labels=labels,
                   trajectory_samples=cfg.trajectory_samples, progress=True, **kwargs)
    output_dir = Path(cfg.output_dir)
    paths = {"samples": output_dir / "samples.npz", "grid": output_dir / "grid.png", "trajectory": output_dir / "trajectory.gif"}
    save_samples(out.samples, paths["samples"])
    save_grid(out.samples[: cfg.grid_size], paths["grid"])
    save_gif(out.trajectory, paths["trajectory"])
    if "forward" in cfg.figures:
        paths["forward"] = output_dir / "forward.png"
        datamodule = instantiate(data)
        images, _ = datamodule.load_split(train=False)
        alphas, sigmas = model.process.sampling_grid(5, model.process.default_spacing)  # data, then 5 levels to noise
        forward_noising_figure(alphas.flip(0), sigmas.flip(0), images[:4].float() / 127.5 - 1, paths["forward"],
                               seed=cfg.seed)
    if options:
        paths["metrics"] = write_scores(options, output_dir, model, out.samples, data, sampler, cfg.seed, device,
                                        cfg.ckpt_path)
    return paths
