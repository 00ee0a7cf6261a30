"""OmegaConf resolvers the configs use."""

import os

from omegaconf import OmegaConf


def wandb_mode() -> str:
    """"online" when the user is logged in to W&B (API key in the environment or ~/.netrc), else "offline":
    a fresh machine runs with no account and no prompt; `wandb sync` uploads later."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = os.path.expanduser("~/.netrc")
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
        os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, encoding="utf-8", errors="ignore").read()
    )
    return "online" if logged_in else "offline"


def first_stage(path: str) -> dict:
    """`${first_stage:PATH}`: the model config and latent scale factor of the autoencoder checkpoint at PATH
    (latent diffusion, see experiment/latent_ddpm_fashion_mnist.yaml)."""
    from diffusion_lab.models.autoencoder_module import first_stage_config, load_autoencoder_checkpoint

    return first_stage_config(load_autoencoder_checkpoint(path))


def diffusers_vae(path: str, image_size: int) -> dict:
    """`${diffusers_vae:DIR,IMAGE_SIZE}`: the first-stage config of a diffusers AutoencoderKL saved at DIR
    (models/components/diffusers_vae.py)."""
    from diffusion_lab.models.components.diffusers_vae import first_stage_config

    return first_stage_config(path, image_size)


def shards_image(root: str, key: str) -> int:
    """`${shards_image:ROOT,size}` / `${shards_image:ROOT,channels}`: the image size or channels of the images the shards
    at ROOT were prepared from (their prepared.json; data=latent_shards: the shape its latents decode to)."""
    from diffusion_lab.data.shards import read_meta

    channels, size, _ = read_meta(root, samples=None)["image_shape"]
    return {"size": size, "channels": channels}[key]


def folder_classes(root: str) -> int:
    """`${folder_classes:ROOT}`: how many classes (image sub-folders, as torchvision's ImageFolder) the folder holds."""
    from diffusion_lab.data.datasets import folder_files

    return len(folder_files(root)[2])


def scale_beta(beta: float, timesteps: int) -> float:
    """`${scale_beta:BETA,T}` = min(BETA * 1000 / T, 0.999): Ho et al.'s betas (1e-4..0.02) are for T = 1000; scaled
    so, alpha_bar_T stays near 0 at any T (Nichol & Dhariwal 2021, improved-diffusion `get_named_beta_schedule`;
    denoising-diffusion-pytorch's `linear_beta_schedule`); capped below 1 (T < 21) as their cosine betas are."""
    if int(timesteps) < 1:  # beta_schedule refuses such timesteps in one line
        return float(beta)
    return min(float(beta) * 1000 / int(timesteps), 0.999)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("scale_beta"):
        OmegaConf.register_new_resolver("scale_beta", scale_beta)
    if not OmegaConf.has_resolver("wandb_mode"):
        OmegaConf.register_new_resolver("wandb_mode", wandb_mode)
    if not OmegaConf.has_resolver("first_stage"):
        OmegaConf.register_new_resolver("first_stage", first_stage, use_cache=True)
    if not OmegaConf.has_resolver("shards_image"):
        OmegaConf.register_new_resolver("shards_image", shards_image, use_cache=True)
    if not OmegaConf.has_resolver("folder_classes"):
        OmegaConf.register_new_resolver("folder_classes", folder_classes, use_cache=True)
    if not OmegaConf.has_resolver("diffusers_vae"):
        OmegaConf.register_new_resolver("diffusers_vae", diffusers_vae, use_cache=True)
