"""Training images/s under Lightning's Trainer and under a plain PyTorch loop over the same network, loss and
optimizer, measured warm and alternating in one process; their ratio; forward FLOPs per image and the fraction of
this machine's matmul rate (measured in the same run) that training reaches; peak memory.

    python benchmarks/train_speed.py                                   # default experiment (unet_attn, batch 128)
    python benchmarks/train_speed.py --against reference               # and the reference implementation, side by side
    python benchmarks/train_speed.py experiment=ddpm_cifar10 --precision bf16-mixed --peak-tflops 989
    python benchmarks/train_speed.py channels_last=true --compile --threads 2 data.batch_size=64

Positional arguments are Hydra overrides of configs/train.yaml. Data is random images of the configured shape, so
only the network, the loss and the optimizer are timed; the Trainer runs without callbacks or loggers.
`--against reference` adds a third loop, alternating with the other two: lucidrains' denoising-diffusion-pytorch
(`pip install -e ".[bench]"`) `Unet(dim, dim_mults)` of the configured unet_attn under its `GaussianDiffusion`
(eps objective, linear betas, the configured T, its L2 loss), as its README trains it, with the same optimizer,
batch, threads and data.
"""

import argparse
import contextlib
import resource
import statistics
import time
from typing import Callable

import torch
from hydra.utils import instantiate
from lightning import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from common import add_threads_argument, apply_threads, best_device, compose_train, reference_diffusion
from diffusion_lab.builders import build_model, to_memory_format
from diffusion_lab.models.diffusion_module import DiffusionModule

AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of an n x n matmul (2 n^3 per product), best of `repeats`: this machine's attainable peak."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class StepTimes(Callback):
    """perf_counter after every optimizer step."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())


def rate(times: list[float], warmup: int, batch_size: int) -> float:
    """Images/s over the steps after `warmup`."""
    return batch_size * (len(times) - 1 - warmup) / (times[-1] - times[warmup])


def print_profile(run: Callable[[], float], device: torch.device, top: int) -> None:
    """The `top` ops by self time (CPU, and CUDA on a GPU) over one call of `run`, with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    run()  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    print(f"  top {top} ops by {key} ({total / 1e6:.2f} s over one pass):")
    for event in events[:top]:
        print(f"    {event.key:40s} {getattr(event, key) / total:6.1%}  ({event.count} calls)")


def channels_last(net: torch.nn.Module) -> bool:
    return any(p.dim() == 4 and not p.is_contiguous() for p in net.parameters())


def reference_loop(cfg, device: torch.device, loader: DataLoader, autocast_dtype: torch.dtype | None,
                   warmup: int) -> Callable[[], float]:
    """A function that runs one pass over `loader` training denoising-diffusion-pytorch's Unet of the configured
    unet_attn shape under its GaussianDiffusion and returns the images/s after the warm-up steps."""
    diffusion = reference_diffusion(cfg, auto_normalize=False).to(device)
    unet = diffusion.model
    optimizer = instantiate(cfg.optimizer)(params=unet.parameters())
    batch = next(iter(loader))[0][:1].to(device)
    with FlopCounterMode(display=False) as counter:
        unet(batch, torch.zeros(1, device=device))

    def run() -> float:
        stamps = []
        for x0, _ in loader:
            autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext())
            with autocast:
                loss = diffusion(x0.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync(device)
            stamps.append(time.perf_counter())
        return rate(stamps, warmup, loader.batch_size)

    run.params = sum(p.numel() for p in unet.parameters())
    run.forward_flops = counter.get_total_flops()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    parser.add_argument("--precision", default="32-true", choices=list(AUTOCAST))
    parser.add_argument("--against", choices=["plain", "reference"], default="plain",
                        help="reference: also time denoising-diffusion-pytorch on the same network shape")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (nn.Module.compile)")
    add_threads_argument(parser)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternations Trainer / plain loop")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's stated peak, for a second fraction")
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="also print the top K ops by self time over one pass of the plain loop (torch.profiler)")
    args = parser.parse_intermixed_args()  # overrides may follow options, as in the examples above
    apply_threads(args.threads)
    cfg = compose_train(args.overrides)
    device = best_device()
    batch_size, data = cfg.data.batch_size, cfg.data
    autocast_dtype = AUTOCAST[args.precision]

    torch.manual_seed(0)
    models = [build_model(cfg).to(device) for _ in range(2)]
    for model in models:
        to_memory_format(model.net, cfg.get("channels_last"), device)
    models[1].load_state_dict(models[0].state_dict())
    if args.compile:
        for model in models:
            model.net.compile()
    params = sum(p.numel() for p in models[0].net.parameters())

    images = torch.rand(batch_size * (args.warmup + args.steps + 1), data.channels, data.image_size, data.image_size) * 2 - 1
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=batch_size,
                        drop_last=True, pin_memory=device.type == "cuda")

    with FlopCounterMode(display=False) as counter:
        models[0].net(images[:batch_size].to(device), torch.zeros(batch_size, device=device))
    forward_flops = counter.get_total_flops() / batch_size

    # Lightning: the project's DiffusionModule under a bare Trainer
    module = DiffusionModule(models[0], instantiate(cfg.optimizer), seed=cfg.seed)
    times = StepTimes(device)

    def lightning_rate() -> float:
        times.times = []
        trainer = Trainer(accelerator=device.type, devices=1, precision=args.precision, max_steps=args.warmup + args.steps + 1,
                          logger=False, callbacks=[times], enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, train_dataloaders=loader)
        return rate(times.times, args.warmup, batch_size)

    # plain loop: the same loss and optimizer, the same autocast and gradient scaling Lightning applies; its own
    # model, since the Trainer moves the module (and the model in it) back to the CPU after each fit
    plain = models[1]
    optimizer = instantiate(cfg.optimizer)(params=plain.net.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    generator = torch.Generator(device).manual_seed(0)

    def plain_rate() -> float:
        stamps = []
        plain.train()
        for x0, labels in loader:
            x0, labels = x0.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext())
            with autocast:
                loss = plain.loss(x0, generator, labels)[0].mean()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            sync(device)
            stamps.append(time.perf_counter())
        return rate(stamps, args.warmup, batch_size)

    reference_rate = reference_loop(cfg, device, loader, autocast_dtype, args.warmup) if args.against == "reference" else None
    if args.profile:
        print_profile(plain_rate, device, args.profile)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lightning_rates, plain_rates, reference_rates = [], [], []
    for _ in range(args.rounds):
        lightning_rates.append(lightning_rate())
        plain_rates.append(plain_rate())
        if reference_rate is not None:
            reference_rates.append(reference_rate())
    matmul_dtype = autocast_dtype or torch.float32
    machine = matmul_rate(device, matmul_dtype, 8192 if device.type == "cuda" else 1024)

    lightning, plain = statistics.median(lightning_rates), statistics.median(plain_rates)
    train_flops = 3 * forward_flops * lightning  # backward ~ 2x forward
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {cfg.model._target_.rsplit('.', 1)[-1]} ({params / 1e6:.2f}M params), batch {batch_size}, "
          f"{data.channels}x{data.image_size}x{data.image_size}, {name}, precision {args.precision}, "
          f"channels_last {cfg.get('channels_last')} ({'on' if channels_last(models[0].net) else 'off'}), compile {args.compile}")
    print(f"  Trainer     {lightning:9.1f} img/s   (rounds: {', '.join(f'{r:.1f}' for r in lightning_rates)})")
    print(f"  plain loop  {plain:9.1f} img/s   (rounds: {', '.join(f'{r:.1f}' for r in plain_rates)})")
    print(f"  ratio Trainer / plain: {lightning / plain:.3f}")
    if reference_rates:
        reference = statistics.median(reference_rates)
        print(f"  reference   {reference:9.1f} img/s   (rounds: {', '.join(f'{r:.1f}' for r in reference_rates)}; "
              f"{reference_rate.params / 1e6:.2f}M params, {reference_rate.forward_flops / 1e9:.3f} GFLOP/image)")
        print(f"  ratio Trainer / reference: {lightning / reference:.3f}   plain / reference: {plain / reference:.3f}")
    print(f"  forward {forward_flops / 1e9:.3f} GFLOP/image; training {train_flops / 1e12:.3f} TFLOP/s = "
          f"{train_flops / machine:.1%} of this machine's {matmul_dtype} matmul rate ({machine / 1e12:.2f} TFLOP/s)"
          + (f", {train_flops / (args.peak_tflops * 1e12):.1%} of the stated {args.peak_tflops:g} TFLOP/s peak"
             if args.peak_tflops else ""))
    print(f"  peak memory {peak:.2f} GiB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")


if __name__ == "__main__":
    main()
