"""A pretrained diffusers `AutoencoderKL` (Stable Diffusion's VAE, or any saved with `save_pretrained`) as the first
stage of latent diffusion, by path:

    python train.py experiment=dit_imagenet256 vae_path=DIR      # DIR holds config.json and the weights

`${diffusers_vae:DIR,IMAGE_SIZE}` reads DIR/config.json into the run's `first_stage` config (models/first_stage.py:
the architecture, the latent shape and the VAE's own `scaling_factor`, 0.18215 for SD-VAE); training loads the weights from DIR, and every
checkpoint holds them under `model.first_stage.`, so a checkpoint alone samples, as with the project's autoencoder.
"""

import json
from pathlib import Path

from torch import Tensor, nn

from diffusion_lab.models.components.autoencoder_kl import DiagonalGaussian
from diffusion_lab.utils.errors import ConfigError


def read_vae_config(path: str) -> dict:
    """DIR/config.json of a diffusers AutoencoderKL, checked to be one."""
    config_file = Path(path).expanduser() / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"vae_path={path} has no config.json: give a folder written by diffusers' "
                          "AutoencoderKL.save_pretrained (e.g. a downloaded stabilityai/sd-vae-ft-ema)")
    config = json.loads(config_file.read_text())
    if config.get("_class_name") != "AutoencoderKL":
        raise ConfigError(f"vae_path={path} holds a {config.get('_class_name', 'unknown')}, not a diffusers AutoencoderKL")
    return config


class DiffusersVAE(nn.Module):
    """diffusers' AutoencoderKL behind the project autoencoder's interface: encode(x) -> q(z|x) as a
    `DiagonalGaussian`, decode(z) -> images, and the shapes (`channels`, `image_size`, `latent_channels`,
    `latent_size`). Built from its config with random weights; `load_pretrained` reads the saved ones."""

    def __init__(self, vae_config: dict, channels: int, image_size: int, factor: int, latent_channels: int):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_config(vae_config)
        self.channels, self.image_size, self.latent_channels = channels, image_size, latent_channels
        self.latent_size = image_size // factor

    def load_pretrained(self, path: str) -> "DiffusersVAE":
        from diffusers import AutoencoderKL

        self.vae.load_state_dict(AutoencoderKL.from_pretrained(Path(path).expanduser()).state_dict())
        return self

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.vae.encode(x).latent_dist.parameters)

    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample
