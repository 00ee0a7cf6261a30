"""Training images/s of latent diffusion (frozen encoder + backbone on latents) against pixel diffusion with the
same backbone (same width and levels) on the images, measured warm and alternating in one process; their ratio.

    python benchmarks/latent_speed.py first_stage_ckpt=PATH               # experiment=latent_ddpm_fashion_mnist
    python benchmarks/latent_speed.py first_stage_ckpt=PATH experiment=latent_ddpm_cifar10 --batch-size 64

Positional arguments are Hydra overrides of configs/train.yaml (the latent run); the pixel run is the same config
without the first stage. Data is random images of the data's shape; a step is loss, backward and Adam update.
"""

import argparse
import statistics
import time

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from common import add_threads_argument, apply_threads, compose_train
from diffusion_lab.builders import build_model
from diffusion_lab.models.diffusion_module import DiffusionModule


def build(cfg) -> DiffusionModule:
    """The training module of cfg: latent diffusion when cfg has a first stage (loaded from cfg.first_stage_ckpt)."""
    return DiffusionModule(build_model(cfg), instantiate(cfg.optimizer), seed=cfg.seed,
                           run_config=OmegaConf.to_container(cfg, resolve=True))


def seconds_per_step(module: DiffusionModule, optimizer, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for step in range(steps):
        losses, _ = module._losses((images, labels), torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements of each; the median is kept")
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    latent_cfg = compose_train(["experiment=latent_ddpm_fashion_mnist", *args.overrides])
    pixel_cfg = latent_cfg.copy()
    with open_dict(pixel_cfg):
        pixel_cfg.first_stage = None

    data = latent_cfg.data
    images = torch.rand(args.batch_size, data.channels, data.image_size, data.image_size) * 2 - 1
    labels = torch.randint(0, data.num_classes, (args.batch_size,))
    runs = {}
    for name, cfg in (("pixel", pixel_cfg), ("latent", latent_cfg)):
        module = build(cfg)
        runs[name] = (module, module.configure_optimizers()["optimizer"], module.model.sample_shape)
        seconds_per_step(module, runs[name][1], images, labels, 1)  # warm-up
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (module, optimizer, _) in runs.items():
            times[name].append(seconds_per_step(module, optimizer, images, labels, args.steps))
    rates = {name: args.batch_size / statistics.median(values) for name, values in times.items()}
    model = latent_cfg.model
    print(f"backbone {model._target_.rsplit('.', 1)[-1]} dim={model.dim} dim_mults={list(model.dim_mults)}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, device cpu")
    for name, (module, _, shape) in runs.items():
        params = sum(p.numel() for p in module.model.net.parameters())
        print(f"{name:>6}: backbone input {'x'.join(map(str, shape))}, {params / 1e6:.3f} M params, "
              f"{rates[name]:.1f} images/s")
    print(f"latent / pixel: {rates['latent'] / rates['pixel']:.2f}x (the latent rate includes the frozen encoder)")


if __name__ == "__main__":
    main()
