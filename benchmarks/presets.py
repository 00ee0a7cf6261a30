"""Per tutorial preset: backbone parameters, forward GFLOPs per image and training images/s on this machine.

    python benchmarks/presets.py [--presets ddpm_fashion_mnist,ddpm_cifar10,...] [--batch-size 16] [--steps 3]
        [--device cpu]

Each preset's model (network and process) is built from its composed config at full size (random weights, random
images: no data set needed). GFLOPs: torch.utils.flop_counter.FlopCounterMode over one forward of one image
(multiply-adds count 2; norms and activations are not counted). Training: full steps (the model's loss,
backward, the preset's optimizer) on a batch of min(--batch-size, the preset's batch size), timed after one
warm-up step; the last column is that throughput over the default experiment's (ddpm_fashion_mnist) measured in
the same run.
"""

import argparse
import time

import torch
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from common import compose_train
from diffusion_lab.builders import build_model

PRESETS = ["ddpm_fashion_mnist", "ddpm_mnist_simple", "dpm2015_mnist", "dpm2015_cifar10", "ddpm_small_fashion_mnist",
           "ddpm_cifar10"]


def measure(preset: str, batch_size: int, steps: int, device: torch.device) -> dict:
    cfg = compose_train([f"experiment={preset}"])
    model = build_model(cfg).to(device)
    net, shape = model.net, model.sample_shape
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)

    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.randn(1, *shape, device=device), torch.zeros(1, device=device))  # the count does not depend on t
    gflops = counter.get_total_flops() / 1e9

    net.train()
    batch = min(batch_size, cfg.data.batch_size)
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    x0 = torch.rand(batch, *shape, device=device) * 2 - 1
    generator = torch.Generator(device).manual_seed(0)

    def step() -> None:
        loss, _ = model.loss(x0, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    images_per_s = steps * batch / (time.perf_counter() - start)
    return {"preset": preset, "model": cfg.model._target_.split(".")[-1], "params": params, "gflops": gflops,
            "batch": batch, "images_per_s": images_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    presets = args.presets.split(",")
    baseline = "ddpm_fashion_mnist"
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, timed steps: {args.steps}")
    print("| preset | network | params | GFLOPs/image (fwd) | batch | train images/s | vs ddpm_fashion_mnist |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    reference = None
    for preset in [baseline, *(p for p in presets if p != baseline)]:
        r = measure(preset, args.batch_size, args.steps, device)
        reference = reference or r["images_per_s"]
        if preset in presets:
            print(f"| {r['preset']} | {r['model']} | {r['params']:,} | {r['gflops']:.3f} | {r['batch']} | "
                  f"{r['images_per_s']:.1f} | {r['images_per_s'] / reference:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
