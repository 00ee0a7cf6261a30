"""Building the model object from a composed config: one place, used by training, sampling and the benchmarks."""

import inspect
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from torch import nn

from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.models.first_stage import build_first_stage, latent_shape, load_first_stage
from diffusion_lab.utils.checkpoint import model_weights, submodule_state
from diffusion_lab.utils.errors import ConfigError


def build_process(cfg: Any) -> nn.Module:
    """The diffusion process of `cfg.process`; a DDPM-family process (one that takes `betas`) gets the betas of
    `cfg.schedule`, and any other refuses a schedule, which it would ignore. Each option the process does not
    take is a one-line error."""
    process_cfg, schedule = dict(cfg["process"]), cfg.get("schedule")
    target = process_cfg.get("_target_", "?")
    try:
        parameters = init_options(get_class(target))
    except (ImportError, ValueError) as error:
        raise ConfigError(f"process._target_={target} cannot be imported: {str(error).splitlines()[0]}") from error
    unknown = [key for key in process_cfg if key != "_target_" and key not in parameters]
    if unknown:
        options = [name for name in parameters if name != "betas"]
        raise ConfigError(f"process.{unknown[0]} is not an option of process {target.rsplit('.', 1)[-1]}; its options "
                          f"are: {', '.join(options)}")
    if "betas" in parameters:
        if not schedule:
            raise ConfigError(f"process {target.rsplit('.', 1)[-1]} needs a beta schedule: add schedule=linear (or cosine, ...)")
        return instantiate(process_cfg, betas=beta_schedule(**schedule))
    if schedule:
        raise ConfigError(f"schedule is set, but process {target.rsplit('.', 1)[-1]} takes no beta schedule and would "
                          "ignore it: drop the schedule= override (this process's config sets none)")
    return instantiate(process_cfg)


BUILDER_SET = ("channels", "image_size", "out_channels", "num_classes")  # what build_net gives a backbone


def init_options(cls: type) -> list[str]:
    """The named options of `cls(...)`: its `__init__`'s, and where that passes `**options` on to a base class
    (MeanFlow and Shortcut to FlowMatching), the base's, through the MRO."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return names


def backbone_shape(cfg: Any) -> tuple[int, int, int]:
    """(channels, height, width) of what the backbone denoises: the data's images, or for latent diffusion
    (`cfg.first_stage`) the first stage's latents."""
    if cfg.get("first_stage"):
        return latent_shape(cfg["first_stage"])
    return image_shape(cfg)


def image_shape(cfg: Any) -> tuple[int, int, int]:
    """(channels, height, width) of the data's images."""
    data = cfg["data"]
    return data["channels"], data["image_size"], data["image_size"]


def num_classes(cfg: Any) -> int | None:
    """The classes of a class-conditional config (data.conditional=true), else None."""
    data = cfg["data"]
    return data["num_classes"] if data.get("conditional", False) else None


def second_time_option(cfg: Any, process: nn.Module | None) -> dict:
    """{"second_time": True} for a process whose network takes a second time (the flow maps), checked against the
    backbone: one that cannot take one, or `model.second_time=true` under a process that gives none, is a one-line
    error."""
    model, target = cfg["model"], cfg["model"].get("_target_", "?")
    if process is None or not process.needs_second_time:
        if model.get("second_time", False):
            raise ConfigError(f"model.second_time=true, but process {getattr(process, 'name', None)} gives the network "
                              "no second time; only the flow-map processes do (process=meanflow, process=shortcut)")
        return {}
    if "second_time" not in inspect.signature(get_class(target)).parameters:
        raise ConfigError(f"process {process.name} needs a backbone that takes a second time (model=dit, uvit, "
                          f"unet_attn or ddpm_unet); {target.rsplit('.', 1)[-1]} takes none")
    return {"second_time": True}


def build_net(cfg: Any, process: nn.Module) -> nn.Module:
    """The backbone of `cfg.model` for inputs of `backbone_shape(cfg)`, with the output channels the process needs,
    for class-conditional data the number of classes, and a second time where the process needs one
    (`second_time_option`). The builder alone sets these (`BUILDER_SET`): a model config naming one is a one-line
    error, since the value would not be what builds (under latent diffusion the shape is the latents')."""
    named = [key for key in BUILDER_SET if key in cfg["model"]]
    if named:
        raise ConfigError(f"model.{named[0]} is set by the builder (channels and image_size from data.channels and "
                          "data.image_size, or the first stage's latents; out_channels from the process; num_classes "
                          f"from data.num_classes when data.conditional=true): drop model.{named[0]}")
    channels, image_size, _ = backbone_shape(cfg)
    return instantiate(cfg["model"], channels=channels, image_size=image_size, out_channels=process.output_channels(channels),
                       num_classes=num_classes(cfg), **second_time_option(cfg, process))


def build_standalone_net(cfg: Any) -> nn.Module:
    """The network that an autoencoder or a feature-classifier run trains, exactly as `cfg.model` says: its config
    takes channels and image_size from `${data.*}` itself, so that the checkpoint's model config alone rebuilds it
    (the first stage of latent diffusion, the classifier of FID). Such a network takes no class conditioning."""
    if cfg["data"].get("conditional", False):
        raise ConfigError(f"data.conditional=true does not apply to {cfg['model']['_target_'].rsplit('.', 1)[-1]}, "
                          "which takes no class; set data.conditional=false")
    return instantiate(cfg["model"])


def to_memory_format(net: nn.Module, channels_last: bool | str | None, device: torch.device) -> None:
    """`channels_last=true` puts the network's 4-D weights in channels-last memory (N, H, W, C), which convolutions
    then propagate to their outputs: the same function, computed by other kernels. `auto` does so on a CPU, where
    benchmarks/train_speed.py measured it faster, and not elsewhere (not measured); false (or absent, as in older
    checkpoints) leaves the weights contiguous."""
    if channels_last not in (True, False, None, "auto"):
        raise ConfigError(f"channels_last={channels_last!r} must be true, false or auto")
    if channels_last is True or (channels_last == "auto" and device.type == "cpu"):
        net.to(memory_format=torch.channels_last)


def build_model(cfg: Any, trained_first_stage: bool = True) -> DiffusionModel:
    """The model object of a config: process, backbone, first stage, sample shape, classes. Latent diffusion loads
    the first stage's weights, when `trained_first_stage` (training), from `cfg.first_stage_ckpt` (the project's
    autoencoder) or `cfg.first_stage.path` (a diffusers VAE); sampling from a checkpoint builds it untrained and
    loads the whole model's weights from the checkpoint."""
    process = build_process(cfg)
    net = build_net(cfg, process)
    first_stage = None
    if cfg.get("first_stage") and trained_first_stage:
        vae_path = cfg["first_stage"].get("path")  # a pretrained diffusers VAE by path, else the project's autoencoder
        path, key = (vae_path, "vae_path") if vae_path else (cfg["first_stage_ckpt"], "first_stage_ckpt")
        first_stage, _ = load_first_stage(path, image_shape(cfg), key)
    elif cfg.get("first_stage"):
        first_stage = build_first_stage(cfg["first_stage"])
    return DiffusionModel(net, process, backbone_shape(cfg), first_stage, num_classes(cfg))


MODEL_KEYS = ("model", "process", "data")  # what a checkpoint's saved config needs to build its model


def load_model(checkpoint: dict, weights: str, device: torch.device, name: str = "the checkpoint") -> DiffusionModel:
    """The model object of a checkpoint (its saved config), with the chosen weights, in eval mode on `device`;
    ConfigError (one line, the checkpoint called `name`, e.g. teacher_ckpt=PATH) for the checkpoint of another kind
    of run (an autoencoder's, a classifier's) or weights that do not fit."""
    config = checkpoint["config"]
    missing = [key for key in MODEL_KEYS if not config.get(key)]
    if missing:
        module = (config.get("module") or {}).get("_target_", "")
        kind = f" (module {module.rsplit('.', 1)[-1]})" if module else ""
        raise ConfigError(f"{name}: its saved config has no {', '.join(missing)}{kind}, so it does not describe a "
                          "diffusion model (train.py writes one that does)")
    model = build_model(config, trained_first_stage=False)
    try:
        model.load_state_dict(submodule_state(model_weights(checkpoint, weights), "model"))
    except RuntimeError as error:
        raise ConfigError(f"{name}: its weights do not fit its saved model config: {str(error).splitlines()[0]}") from error
    to_memory_format(model.net, checkpoint["config"].get("channels_last"), device)
    return model.to(device).eval()
