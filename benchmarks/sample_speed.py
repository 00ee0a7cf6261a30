"""Sampling images/s for each sampler at a given step count, on an untrained network of the configured model
(speed does not depend on the weights), with network evaluations per image and the rate per evaluation. Each
sampler runs on the process's default spacing; one that cannot run on the process's grid is skipped with its reason.

    python benchmarks/sample_speed.py --steps 50 --batch-size 64
    python benchmarks/sample_speed.py experiment=ddpm_cifar10 --steps 20 --samplers ddim dpm_solver_pp
    python benchmarks/sample_speed.py --against reference --steps 50 --batch-size 256   # DDIM beside the reference

Positional arguments are Hydra overrides of configs/train.yaml. `--against reference` times DDIM at --steps (each
image's seeded noise, clipping and uint8 output included, as sample.py runs it) in alternating rounds against
lucidrains' denoising-diffusion-pytorch `GaussianDiffusion.ddim_sample` (eta 0, its own clipping) over its `Unet` of
the configured unet_attn shape (`pip install -e ".[bench]"`), and prints network evaluations x images/s of both
and their ratio.
"""

import argparse
import statistics
import time
from typing import Callable

import torch

from common import add_threads_argument, apply_threads, best_device, compose_train, reference_diffusion
from diffusion_lab.builders import build_model, to_memory_format
from diffusion_lab.generate import generate
from diffusion_lab.samplers import Sampler
from diffusion_lab.samplers.sampling import SAMPLERS, SamplerError


def timed(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def against_reference(cfg, model, args, device: torch.device) -> None:
    """DDIM at --steps, this project against denoising-diffusion-pytorch, alternating --rounds times."""
    reference = reference_diffusion(cfg, sampling_timesteps=args.steps).to(device).eval()
    shape = (args.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    sampler = Sampler("ddim", args.steps, model.process.default_spacing)  # as many network evaluations as the reference
    ours = lambda: generate(model, sampler, args.batch_size, args.batch_size)
    theirs = lambda: reference.ddim_sample(shape)
    ours(), theirs()  # warm-up
    rates = {"this project": [], "reference": []}
    for _ in range(args.rounds):
        rates["this project"].append(args.steps * args.batch_size / timed(ours, device))
        rates["reference"].append(args.steps * args.batch_size / timed(theirs, device))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"  {name:14s} ddim {args.steps} steps: {medians[name]:9.1f} NFE*img/s   "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"  ratio this project / reference: {medians['this project'] / medians['reference']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--against", choices=["reference"], default=None, help="DDIM beside denoising-diffusion-pytorch")
    parser.add_argument("--rounds", type=int, default=3, help="alternations with --against")
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    cfg = compose_train(args.overrides)
    device = best_device()
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    to_memory_format(model.net, cfg.get("channels_last"), device)
    spacing = model.process.default_spacing
    shape = "x".join(map(str, model.sample_shape))
    print(f"model {cfg.model._target_.rsplit('.', 1)[-1]}, batch {args.batch_size}, {shape}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'}")
    if args.against:
        return against_reference(cfg, model, args, device)
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
