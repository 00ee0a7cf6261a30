"""`sample(cfg)`: samples from a checkpoint alone: samples.npz, grid.png, trajectory.gif (and figures)."""

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.builders import backbone_shape, build_first_stage, build_net, build_process
from diffusion_lab.generate import generate
from diffusion_lab.metrics.evaluate import needs_samples, write_scores
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


def load_model(checkpoint: dict, weights: str, device: torch.device) -> tuple[Any, Any]:
    """(process, net) of a checkpoint, with the chosen weights, in eval mode on `device`."""
    config = checkpoint["config"]
    process = build_process(config)
    net = build_net(config, process)
    state = model_weights(checkpoint, weights)
    try:
        net.load_state_dict(submodule_state(state, "net"))
    except RuntimeError as error:
        raise ConfigError(f"the checkpoint's weights do not fit its saved model config: {str(error).splitlines()[0]}") from error
    return process.to(device).eval(), net.to(device).eval()


def load_first_stage(checkpoint: dict, weights: str, device: torch.device) -> Any:
    """The frozen first stage stored in a latent-diffusion checkpoint, on `device`; None for pixel diffusion."""
    first_stage = build_first_stage(checkpoint["config"])
    if first_stage is not None:
        first_stage.load_state_dict(submodule_state(model_weights(checkpoint, weights), "first_stage"))
        first_stage.to(device)
    return first_stage


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
    process, net = load_model(checkpoint, cfg.weights, device)
    first_stage = load_first_stage(checkpoint, cfg.weights, device)
    sampler = instantiate(sampler_config(config, cfg.sampler))

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
    if options and not needs_samples(options):  # metrics=[nll]: the bound needs no sampling
        return {"metrics": write_scores(options, Path(cfg.output_dir), process, net, None, data, sampler, cfg.seed,
                                        device, cfg.ckpt_path)}

    out = generate(process, net, sampler, cfg.num_samples, cfg.batch_size, backbone_shape(config), seed=cfg.seed,
                   class_labels=labels, trajectory_samples=cfg.trajectory_samples, progress=True,
                   decode=first_stage.decode if first_stage is not None else None, **kwargs)
    output_dir = Path(cfg.output_dir)
    paths = {"samples": output_dir / "samples.npz", "grid": output_dir / "grid.png", "trajectory": output_dir / "trajectory.gif"}
    save_samples(out.samples, paths["samples"])
    save_grid(out.samples[: cfg.grid_size], paths["grid"])
    save_gif(out.trajectory, paths["trajectory"])
    if "forward" in cfg.figures:
        paths["forward"] = output_dir / "forward.png"
        datamodule = instantiate(data)
        images, _ = datamodule.load_split(train=False)
        steps = process.num_timesteps
        timesteps = sorted({0, steps // 10, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
        forward_noising_figure(process, images[:4].float() / 127.5 - 1, timesteps, paths["forward"], seed=cfg.seed)
    if options:
        paths["metrics"] = write_scores(options, output_dir, process, net, out.samples, data, sampler, cfg.seed, device,
                                        cfg.ckpt_path)
    return paths
