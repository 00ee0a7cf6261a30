"""Drawing samples from a trained model in batches: what `sample.py` and the training callbacks share."""

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.errors import NonFiniteError
from diffusion_lab.utils.media import to_uint8


@dataclass
class Generated:
    samples: np.ndarray  # uint8 (N, H, W, C)
    trajectory: list[np.ndarray] = field(default_factory=list)  # frames of uint8 (k, H, W, C), noise to image


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index` under run seed `seed`: one 64-bit word of numpy's SeedSequence([seed,
    index]), so (seed, i) and (seed', i') never share a stream by arithmetic coincidence."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


class PerSampleNoise:
    """N(0, I) draws whose row j comes from its own generator, seeded by (seed, indices[j]): EDM's
    StackedRandomGenerator (NVlabs/edm generate.py), so a sample's noise is the same in any batch or on any rank."""

    def __init__(self, seed: int, indices: range, device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(sample_seed(seed, i)) for i in indices]

    def __call__(self, like: Tensor) -> Tensor:
        return torch.stack([torch.randn(like.shape[1:], generator=g, device=like.device, dtype=like.dtype)
                            for g in self.generators])


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
    first: int = 0,
    **sample_kwargs,
) -> Generated:
    """Samples first .. first + num_samples - 1 from x ~ N(0, I) at the model's sample shape, batch by batch; sample i
    depends only on (seed, i) (`PerSampleNoise` draws its initial and its sampler noise), whatever `batch_size` or
    `first`. Decoded by the model's first stage (latent diffusion). `class_labels` (sample i gets
    class_labels[i % len]) condition a class-conditional model. The first `trajectory_samples` samples of the first
    batch also give about `trajectory_frames` frames of x_t from noise to image (decoded too). An image with NaN or
    inf raises NonFiniteError naming the first step whose x_t was not finite (recorded on the device: one host sync
    per batch, not per step)."""
    device = next(model.net.parameters()).device
    was_training = model.training
    model.eval()
    try:
        batches, frames = [], []
        for start in range(first, first + num_samples, batch_size):
            n = min(batch_size, first + num_samples - start)
            noise_sampler = PerSampleNoise(seed, range(start, start + n), device)
            noise = noise_sampler(torch.empty((n, *model.sample_shape), device=device))
            kwargs = dict(sample_kwargs)
            if class_labels:
                labels = [class_labels[(start + i) % len(class_labels)] for i in range(n)]
                kwargs["class_labels"] = torch.tensor(labels, device=device)
            k = min(trajectory_samples, n) if start == first else 0
            every = max(1, sampler.steps // trajectory_frames)
            if k:
                frames.append(to_uint8(model.decode(noise[:k])))
            history = []  # (noise level sigma / alpha, x finite) of each step, as device tensors

            def callback(state, k=k, every=every, history=history):
                history.append((state["sigma"] / state["alpha"], state["x"].isfinite().all()))
                if k and ((state["i"] + 1) % every == 0 or state["i"] == sampler.steps - 1):
                    frames.append(to_uint8(model.decode(state["x"][:k].to(noise.dtype))))

            x0 = model.sample(noise, sampler, callback=callback, noise_sampler=noise_sampler, **kwargs)
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
