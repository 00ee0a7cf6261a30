"""What the benchmark scripts share: the composed training config and the CPU thread setting."""

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from diffusion_lab.utils.resolvers import register_resolvers

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def compose_train(overrides: list[str]) -> DictConfig:
    """configs/train.yaml with the given Hydra overrides, as `python train.py OVERRIDES` would compose it."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train.yaml", overrides=overrides)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
