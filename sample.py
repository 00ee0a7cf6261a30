"""Sample from a checkpoint: `python sample.py ckpt_path=PATH [sampler=NAME sampler.steps=N] ...` (see README.md)."""

import hydra
from omegaconf import DictConfig

from diffusion_lab.sample import sample
from diffusion_lab.utils.cli import one_line_errors
from diffusion_lab.utils.resolvers import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="sample.yaml")
@one_line_errors
def main(cfg: DictConfig) -> None:
    for name, path in sample(cfg).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
