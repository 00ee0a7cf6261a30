"""Train a diffusion model: `python train.py [hydra overrides]` (see README.md)."""

from omegaconf import DictConfig

from diffusion_lab.train import train
from diffusion_lab.config import hydra_main


@hydra_main("train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    monitored = cfg.get("optimized_metric")
    return metrics.get(monitored) if monitored else None


if __name__ == "__main__":
    main()
