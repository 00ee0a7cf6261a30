"""Drawing samples from a trained model in batches: what `sample.py` and the training callbacks share."""

from dataclasses import dataclass, field

import numpy as np
import torch

from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.errors import NonFiniteError
from diffusion_lab.utils.media import to_uint8


@dataclass
class Generated:
    samples: np.ndarray  # uint8 (N, H, W, C)
    trajectory: list[np.ndarray] = field(default_factory=list)  # frames of uint8 (k, H, W, C), noise to image


@torch.no_grad()
def generate(
    model: DiffusionModel,
    sampler: Sampler,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    class_labels: list[int] | None = None,
    trajectory_samples: int = 0,
    trajectory_frames: int = 40,
    progress: bool = False,
    **sample_kwargs,
) -> Generated:
    """`num_samples` images from x ~ N(0, I) at the model's sample shape, batch by batch, reproducible under `seed`
    (for a given batch size), decoded by the model's first stage (latent diffusion). `class_labels` (cycled over the
    samples) condition a class-conditional model. The first `trajectory_samples` samples also give about
    `trajectory_frames` frames of x_t from noise to image (decoded too). An image with NaN or inf raises
    NonFiniteError naming the first step whose x_t was not finite (recorded on the device: one host sync per batch,
    not per step)."""
    device = next(model.net.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        batches, frames = [], []
        starts = range(0, num_samples, batch_size)
        if progress:
            from rich.progress import track

            starts = track(starts, description=f"sampling {num_samples} with {sampler}")
        for start in starts:
            n = min(batch_size, num_samples - start)
            noise = torch.randn((n, *model.sample_shape), generator=generator, device=device)
            kwargs = dict(sample_kwargs)
            if class_labels:
                labels = [class_labels[(start + i) % len(class_labels)] for i in range(n)]
                kwargs["class_labels"] = torch.tensor(labels, device=device)
            k = min(trajectory_samples, n) if start == 0 else 0
            every = max(1, sampler.steps // trajectory_frames)
            if k:
                frames.append(to_uint8(model.decode(noise[:k])))
            history = []  # (noise level sigma / alpha, x finite) of each step, as device tensors

            def callback(state, k=k, every=every, history=history):
                history.append((state["sigma"] / state["alpha"], state["x"].isfinite().all()))
                if k and ((state["i"] + 1) % every == 0 or state["i"] == sampler.steps - 1):
                    frames.append(to_uint8(model.decode(state["x"][:k].to(noise.dtype))))

            x0 = model.sample(noise, sampler, callback=callback, generator=generator, **kwargs)
            images = model.decode(x0)
            if not images.isfinite().all():
                raise NonFiniteError(nonfinite_message(sampler, history, x0, model.latent, start, n))
            batches.append(to_uint8(images))
    finally:
        model.train(was_training)
    return Generated(np.concatenate(batches), frames)


def nonfinite_message(sampler: Sampler, history: list, x0: torch.Tensor, decoded: bool, start: int, n: int) -> str:
    """Where a batch's images became NaN or inf: the sampler's first step with a non-finite x_t, or the decoder."""
    where = f"samples {start}..{start + n - 1} of sampler {sampler}"
    bad = [i for i, (_, finite) in enumerate(history) if not finite]
    if bad:
        level = float(history[bad[0]][0])
        return (f"{where}: x_t is NaN or inf from step {bad[0] + 1} of {len(history)} (noise level sigma/alpha={level:.4g}) "
                "on; no samples written")
    if decoded and x0.isfinite().all():
        return f"{where}: the first stage's decoder made NaN or inf of finite latents; no samples written"
    return f"{where}: x_0 is NaN or inf in float32 after the last step; no samples written"
