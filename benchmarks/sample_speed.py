"""Sampling images/s for each sampler at a given step count, on an untrained network of the configured model
(speed does not depend on the weights), with network evaluations per image and the rate per evaluation. Each
sampler runs on the process's default spacing; one that cannot run on the process's grid is skipped with its reason.

    python benchmarks/sample_speed.py --steps 50 --batch-size 64
    python benchmarks/sample_speed.py experiment=ddpm_cifar10 --steps 20 --samplers ddim dpm_solver_pp

Positional arguments are Hydra overrides of configs/train.yaml.
"""

import argparse
import time

import torch

from common import add_threads_argument, apply_threads, compose_train
from diffusion_lab.builders import build_model
from diffusion_lab.generate import generate
from diffusion_lab.samplers import Sampler
from diffusion_lab.samplers.sampling import SAMPLERS, SamplerError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    cfg = compose_train(args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    spacing = model.process.default_spacing
    shape = "x".join(map(str, model.sample_shape))
    print(f"model {cfg.model._target_.rsplit('.', 1)[-1]}, batch {args.batch_size}, {shape}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'}")
    print(f"  {'sampler':16s} {'steps':>5s} {'NFE':>5s} {'img/s':>9s} {'NFE*img/s':>10s}")
    generate(model, Sampler("ddim", 2, spacing), args.batch_size, args.batch_size)  # warm-up
    for name in args.samplers:
        sampler = Sampler(name, args.steps, spacing)
        try:
            sampler.check(*model.sampling_grid(sampler))
        except SamplerError as error:
            print(f"  {name:16s} skipped: {error}")
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(model, sampler, args.batch_size, args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        images_per_s = args.batch_size / (time.perf_counter() - start)
        nfe = sampler.evaluations_used  # dopri5: its adaptive count
        print(f"  {name:16s} {args.steps:5d} {nfe:5d} {images_per_s:9.2f} {images_per_s * nfe:10.1f}")


if __name__ == "__main__":
    main()
