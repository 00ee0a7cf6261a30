"""The first stage of latent diffusion, in one place: its `first_stage` config (what a run saves of it: the
autoencoder's model config and the latent scale factor), read from an autoencoder checkpoint of this project
(experiment=autoencoder_*) or from a diffusers AutoencoderKL folder (save_pretrained); the frozen `FirstStage` built
from that config; and the one check that it encodes images of the data's shape.

    ${first_stage:PATH}               the config of an autoencoder checkpoint (`autoencoder_config`)
    ${diffusers_vae:DIR,IMAGE_SIZE}   the config of a diffusers VAE folder (`vae_config`)
"""

from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import Tensor

from diffusion_lab.models.components.autoencoder_kl import FirstStage
from diffusion_lab.models.components.diffusers_vae import read_vae_config
from diffusion_lab.utils.checkpoint import load_checkpoint, submodule_state
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_path


def load_autoencoder_checkpoint(path: str, key: str = "first_stage_ckpt") -> dict:
    """An autoencoder checkpoint written by `AutoencoderModule` (or `save_first_stage`); ConfigError for anything
    else, naming the option `key` that gave `path`."""
    checkpoint = load_checkpoint(path, key=key)
    if "first_stage" not in checkpoint:
        raise ConfigError(
            f"{key}={path} is not an autoencoder checkpoint; train one with experiment=autoencoder_fashion_mnist"
        )
    return checkpoint


def autoencoder_config(checkpoint: dict) -> dict:
    """The `first_stage` config of an autoencoder checkpoint: its model config and measured scale factor."""
    return {"model": checkpoint["config"]["model"], "scale_factor": checkpoint["first_stage"]["scale_factor"]}


def vae_config(path: str, image_size: int) -> dict:
    """The `first_stage` config of the diffusers VAE at `path` for images of `image_size`: its architecture, latent
    shape and own `scaling_factor` (0.18215 for SD-VAE), and the path its weights are loaded from."""
    config = read_vae_config(path)
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if int(image_size) % factor:
        raise ConfigError(f"data.image_size={image_size} is not divisible by the VAE's downsampling factor {factor}")
    model = {"_target_": "diffusion_lab.models.components.diffusers_vae.DiffusersVAE", "vae_config": config,
             "channels": config["in_channels"], "image_size": int(image_size), "factor": factor,
             "latent_channels": config["latent_channels"]}
    return {"model": model, "scale_factor": config.get("scaling_factor", 0.18215), "path": str(path)}


def latent_shape(config: dict) -> tuple[int, int, int]:
    """(channels, height, width) of the latents of a `first_stage` config."""
    autoencoder = config["model"]
    size = autoencoder["image_size"] // autoencoder["factor"]
    return autoencoder["latent_channels"], size, size


def build_first_stage(config: dict, state_dict: dict[str, Tensor] | None = None) -> FirstStage:
    """The frozen `FirstStage` of a `first_stage` config, with the autoencoder weights of `state_dict` when given."""
    autoencoder = instantiate(config["model"], _convert_="all")
    if state_dict is not None:
        autoencoder.load_state_dict(state_dict)
    return FirstStage(autoencoder, config["scale_factor"])


def load_first_stage(path: str, image_shape: tuple[int, int, int], key: str) -> tuple[FirstStage, dict]:
    """The frozen first stage at `path` (an autoencoder checkpoint file or a diffusers VAE folder, given by the option
    `key`) with its weights, in eval mode, and its `first_stage` config; checked to encode images of `image_shape`
    (C, H, W)."""
    if not Path(path).expanduser().exists():
        raise ConfigError(f"{key}={path} does not exist; give an autoencoder checkpoint of this project "
                          "(experiment=autoencoder_*) or a diffusers AutoencoderKL folder (save_pretrained)")
    if Path(path).expanduser().is_dir():
        config = vae_config(path, image_shape[-1])
        first_stage = build_first_stage(config)
        first_stage.autoencoder.load_pretrained(path)
    else:
        checkpoint = load_autoencoder_checkpoint(path, key)
        config = autoencoder_config(checkpoint)
        first_stage = build_first_stage(config, submodule_state(checkpoint["state_dict"], "net"))
    autoencoder = first_stage.autoencoder
    if (autoencoder.channels, autoencoder.image_size, autoencoder.image_size) != tuple(image_shape):
        c, h, w = image_shape
        raise ConfigError(f"{key}={path} encodes {autoencoder.image_size}x{autoencoder.image_size}x"
                          f"{autoencoder.channels} images, but the data are {h}x{w}x{c}; use a first stage trained on "
                          "this data set, or set data.image_size and data.channels to the first stage's")
    return first_stage.eval(), config


def save_first_stage(first_stage: FirstStage, config: dict, path: Path) -> None:
    """`first_stage` as an autoencoder checkpoint (the format `AutoencoderModule` writes), which `${first_stage:PATH}`
    and `load_first_stage` read."""
    checkpoint = {"config": {"model": config["model"]}, "first_stage": {"scale_factor": float(first_stage.scale_factor)},
                  "state_dict": {f"net.{name}": value for name, value in first_stage.autoencoder.state_dict().items()}}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
