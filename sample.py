"""Sample from a checkpoint: `python sample.py ckpt_path=PATH [sampler=NAME sampler.steps=N] ...` (see README.md)."""

from omegaconf import DictConfig

from diffusion_lab.sample import sample
from diffusion_lab.config import hydra_main


@hydra_main("sample")
def main(cfg: DictConfig) -> None:
    for name, path in sample(cfg).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
