"""Train a diffusion model: `python train.py [hydra overrides]` (see README.md)."""

import hydra
from omegaconf import DictConfig

from diffusion_lab.train import train
from diffusion_lab.utils.cli import one_line_errors
from diffusion_lab.utils.resolvers import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    monitored = cfg.get("optimized_metric")
    return metrics.get(monitored) if monitored else None


if __name__ == "__main__":
    main()
