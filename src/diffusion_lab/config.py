"""The one config mechanism of every command-line program: `hydra_main` (Hydra apps: train.py, sample.py,
`python -m diffusion_lab.data.prepare`) and `compose_config` (programs with arguments of their own:
`python -m diffusion_lab.metrics`, the benchmarks) both read `CONFIG_DIR` with the project's OmegaConf resolvers
registered (`register_resolvers`), and end a bad input in one clear error line; `config_option` reads one option
file of a group as written (sample.py's own keys, the sweep's `sampler=NAME`). The resolvers read the first stage
and the prepared shards, so this module stands above the model object and the data.

`CONFIG_DIR` is the repository's `configs/`, found beside `src/`: the commands run from a source checkout (the
README's `pip install -e .`, or `PYTHONPATH=src`). A wheel or non-editable install carries no configs (they are
not package data); `config_option` and `compose_config` then end in one line saying so."""

import os
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.data.shards import read_meta
from diffusion_lab.models.first_stage import autoencoder_config, load_autoencoder_checkpoint, vae_config
from diffusion_lab.utils.cli import one_line_errors
from diffusion_lab.utils.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs/ (installed editable from src/)


def config_dir() -> Path:
    """`CONFIG_DIR`, or a ConfigError where it is absent (a non-editable install)."""
    if not CONFIG_DIR.is_dir():
        raise ConfigError(f"no configs/ at {CONFIG_DIR}: diffusion-lab runs from a source checkout; clone the "
                          "repository and install it with pip install -e .")
    return CONFIG_DIR


def config_option(group: str | None, name: str) -> DictConfig:
    """configs/<group>/<name>.yaml (configs/<name>.yaml for no group) as written, its defaults list included; for
    an option that does not exist, a ConfigError naming the group's options."""
    folder = config_dir() / group if group else config_dir()
    path = folder / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ConfigError(f"{group}={name} is not a {group} config; choose one of {choices}")
    return OmegaConf.load(path)


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
    return autoencoder_config(load_autoencoder_checkpoint(path))


def diffusers_vae(path: str, image_size: int) -> dict:
    """`${diffusers_vae:DIR,IMAGE_SIZE}`: the first-stage config of a diffusers AutoencoderKL saved at DIR
    (models/first_stage.py)."""
    return vae_config(path, image_size)


def shards_image(root: str, key: str) -> int:
    """`${shards_image:ROOT,size}` / `${shards_image:ROOT,channels}`: the image size or channels of the images the shards
    at ROOT were prepared from (their prepared.json; data=latent_shards: the shape its latents decode to)."""
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


def hydra_main(config_name: str) -> Callable[[Callable[[DictConfig], object]], Callable[[], object]]:
    """`@hydra_main("train")`: `hydra.main` over `CONFIG_DIR/<config_name>.yaml` (or a ConfigStore node of that
    name), the task function's errors in one line."""

    def decorate(task: Callable[[DictConfig], object]) -> Callable[[], object]:
        register_resolvers()
        hydra_app = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
        return hydra_app(one_line_errors(task))

    return decorate


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """`CONFIG_DIR/<config_name>.yaml` (or a ConfigStore node) composed with Hydra overrides, as `hydra_main` composes
    it for the command line."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name, overrides=overrides)
