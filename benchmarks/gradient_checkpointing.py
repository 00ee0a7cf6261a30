"""Gradient checkpointing (`model.gradient_checkpointing=true`): peak memory and time of a training step, with and
without, for every backbone that has it.

    python benchmarks/gradient_checkpointing.py [--backbones unet_attn,ddpm_unet,dit,uvit] [--batch-size 32]
        [--steps 5] [--device cpu] [--threads N]

Each backbone is the model config of a preset (BACKBONES below; random weights, random images of its data shape).
A step is forward, an L2 loss against random targets and backward (no optimizer: its state is the same with and
without). Peak memory: the most tensor memory allocated during the step above what was allocated at its start
(activations, the recomputed ones included, and gradients; the weights are there before). On CUDA it is
torch.cuda.max_memory_allocated; on the CPU, the running sum of the allocations and frees that torch.profiler
records (profile_memory=True). Time: seconds per step (on the CPU, CPU seconds of this process: use --threads 1
on a shared machine), the median of --steps steps that alternate with and without (after the memory step, the
warm-up), without the profiler. The ratios are with over without, measured in
the same run.
"""

import argparse
import itertools
import statistics
import time
from functools import partial

import torch
from hydra.utils import instantiate
from torch.profiler import ProfilerActivity, profile

from common import add_threads_argument, apply_threads, compose_train

BACKBONES = {  # backbone: the overrides that compose its config
    "unet_attn": ["experiment=ddpm_fashion_mnist"],  # the default experiment's U-Net, 28x28x1
    "ddpm_unet": ["experiment=ddpm_cifar10", "model.ch=64"],  # Ho et al.'s U-Net at half width, 32x32x3
    "dit": ["experiment=dit_fashion_mnist"],  # depth 6, width 192, patch 2, 28x28x1, class-conditional
    "uvit": ["model=uvit", "data=cifar10"],  # configs/model/uvit.yaml, 32x32x3
}


def build(name: str, device: torch.device, gradient_checkpointing: bool) -> tuple[torch.nn.Module, tuple, int | None]:
    """The backbone of BACKBONES[name] (seeded, so both settings get the same weights), its input shape, classes."""
    cfg = compose_train([*BACKBONES[name], f"model.gradient_checkpointing={gradient_checkpointing}"])
    channels, size = cfg.data.channels, cfg.data.image_size
    num_classes = cfg.data.num_classes if cfg.data.conditional else None
    torch.manual_seed(0)
    net = instantiate(cfg.model, channels=channels, image_size=size, out_channels=channels, num_classes=num_classes)
    return net.to(device).train(), (channels, size, size), num_classes


def step(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> None:
    net.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(net(x, t, class_labels=labels), x).backward()


def peak_bytes(run, device: torch.device) -> int:
    """The most tensor memory allocated while `run()` runs, above the amount allocated when it starts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def seconds(run, device: torch.device) -> float:
    """Seconds of one `run()`: wall-clock on CUDA; on the CPU, the CPU time of this process (all its threads), which
    other processes on a shared machine do not inflate."""
    if device.type != "cuda":
        start = time.process_time()
        run()
        return time.process_time() - start
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(name: str, batch_size: int, steps: int, device: torch.device) -> dict:
    """Peak bytes and median seconds per step without (False) and with (True) checkpointing; the timed steps
    alternate between the two, so that a change in the machine's load falls on both."""
    runs, result = {}, {"backbone": name}
    for checkpointing in (False, True):
        net, shape, num_classes = build(name, device, checkpointing)
        generator = torch.Generator(device).manual_seed(0)
        x = torch.randn(batch_size, *shape, generator=generator, device=device)
        t = torch.rand(batch_size, generator=generator, device=device) * 1000
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator, device=device) if num_classes else None
        runs[checkpointing] = partial(step, net, x, t, labels)
        result["params"] = sum(p.numel() for p in net.parameters())
        result["shape"] = "x".join(map(str, shape[1:] + shape[:1]))
    peaks = {checkpointing: peak_bytes(run, device) for checkpointing, run in runs.items()}  # also the warm-up
    times = {checkpointing: [] for checkpointing in runs}
    for _ in range(steps):
        for checkpointing, run in runs.items():
            times[checkpointing].append(seconds(run, device))
    for checkpointing in runs:
        result[checkpointing] = (peaks[checkpointing], statistics.median(times[checkpointing]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    device = torch.device(args.device)
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, batch {args.batch_size}, timed steps: {args.steps}")
    unit = "s" if device.type == "cuda" else "CPU s"
    print("| backbone | input | params | peak MB without | peak MB with | memory with/without "
          f"| {unit}/step without | {unit}/step with | time with/without |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.backbones.split(","):
        r = measure(name, args.batch_size, args.steps, device)
        (mem_off, time_off), (mem_on, time_on) = r[False], r[True]
        print(f"| {name} | {r['shape']} | {r['params'] / 1e6:.1f}M | {mem_off / 2**20:.0f} | {mem_on / 2**20:.0f} "
              f"| {mem_on / mem_off:.2f} | {time_off:.3f} | {time_on:.3f} | {time_on / time_off:.2f} |", flush=True)


if __name__ == "__main__":
    main()
