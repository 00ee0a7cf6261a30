"""What the benchmark scripts share: the composed training config and the CPU thread setting."""

import argparse

import torch
from omegaconf import DictConfig

from diffusion_lab.config import compose_config


def compose_train(overrides: list[str]) -> DictConfig:
    """configs/train.yaml with the given Hydra overrides, as `python train.py OVERRIDES` would compose it."""
    return compose_config("train", overrides)


def best_device() -> torch.device:
    """Where the benchmarks train and sample: the GPU where there is one (scoring stays on the CPU)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def reference_diffusion(cfg: DictConfig, **options):
    """lucidrains' denoising-diffusion-pytorch (`pip install -e ".[bench]"`): its `Unet` of the configured unet_attn
    shape under its `GaussianDiffusion` (eps objective, linear betas, the configured T; `options` go to it), the
    reference the speed benchmarks run beside this project. SystemExit with one line for another model or process."""
    if not cfg.model._target_.endswith(".UnetAttn") or not cfg.process._target_.endswith(".GaussianDiffusion"):
        raise SystemExit("--against reference: the reference implements DDPM with the attention U-Net only "
                         f"(model=unet_attn, process=gaussian), not {cfg.model._target_} under {cfg.process._target_}")
    try:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    except ImportError:
        raise SystemExit('--against reference needs the reference implementation: pip install -e ".[bench]"') from None
    unet = Unet(dim=cfg.model.dim, dim_mults=tuple(cfg.model.dim_mults), channels=cfg.data.channels,
                attn_heads=cfg.model.attn_heads, attn_dim_head=cfg.model.attn_dim_head)
    return GaussianDiffusion(unet, image_size=cfg.data.image_size, timesteps=cfg.schedule.timesteps,
                             objective="pred_noise", beta_schedule="linear", **options)
