"""Classifier-free guidance as one batched forward, and self-conditioning state in sampling."""

import pytest
import torch
from toy_models import TinyNet, run_sampler

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.samplers import Sampler
from diffusion_lab.samplers.sampling import SAMPLERS
from diffusion_lab.utils.errors import ConfigError

NUM_CLASSES = 3


class Counting(TinyNet):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append((x.shape[0], kwargs))
        return super().forward(x, t, **kwargs)


def setup(objective="eps", **process_kwargs):
    """A process, x_t, per-sample noise levels (alpha, sigma) of the timesteps 3, 10, 20, 29 and class labels."""
    process = GaussianDiffusion(beta_schedule("linear", 30), objective=objective, **process_kwargs)
    x_t = torch.randn(4, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    alpha_bar = process.alphas_cumprod[torch.tensor([3, 10, 20, 29])]
    labels = torch.tensor([0, 1, 2, 1])
    return process, x_t, (alpha_bar.sqrt(), (1 - alpha_bar).sqrt()), labels


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_guided_eps_is_eps_u_plus_w_times_the_difference(objective, w):
    """eps_u + w (eps_c - eps_u) from one forward over 2B (w = 1: one forward over B)."""
    process, x_t, level, labels = setup(objective)
    net = Counting(channels=2, num_classes=NUM_CLASSES)
    guided = process.denoiser(net, clip_denoised=False, guidance_scale=w, class_labels=labels)(x_t, *level)
    assert [b for b, _ in net.calls] == [4 if w == 1 else 8]
    plain = process.denoiser(net, clip_denoised=False)
    eps_c = process.denoiser(net, clip_denoised=False, class_labels=labels)(x_t, *level).eps
    eps_u = plain(x_t, *level).eps  # no labels: the null class
    assert torch.allclose(guided.eps, eps_u + w * (eps_c - eps_u))
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in level)
    assert torch.allclose(alpha * guided.x0 + sigma * guided.eps, x_t)


def test_guidance_keeps_the_conditional_learned_variance():
    process, x_t, level, labels = setup(loss_type="hybrid")
    net = TinyNet(channels=2, out_channels=4, num_classes=NUM_CLASSES)
    guided = process.denoiser(net, guidance_scale=2.0, class_labels=labels)(x_t, *level)
    conditional = process.denoiser(net, class_labels=labels)(x_t, *level)
    assert torch.allclose(guided.variance_interp, conditional.variance_interp)


def test_guidance_without_labels_is_a_config_error():
    process, _, _, _ = setup()
    with pytest.raises(ConfigError, match="class_labels"):
        process.denoiser(TinyNet(channels=2), guidance_scale=3.0)


def test_guided_sampling_runs_every_sampler():
    process, x_t, _, labels = setup()
    model = DiffusionModel(TinyNet(channels=2, num_classes=NUM_CLASSES), process, (2, 4, 4), num_classes=NUM_CLASSES)
    for algorithm in SAMPLERS:
        x = model.sample(x_t, Sampler(algorithm, 4), guidance_scale=2.0, class_labels=labels,
                         generator=torch.Generator().manual_seed(0))
        assert x.shape == x_t.shape and x.abs().max() <= 1


@pytest.mark.parametrize("algorithm", ["ddim", "heun", "unipc"])
@pytest.mark.parametrize("w", [1.0, 2.0])
def test_self_conditioning_feeds_the_previous_x0(algorithm, w):
    """Every network call after the first gets the x_0 the sampler saw from the call before."""
    process, x_t, _, labels = setup()
    net = Counting(channels=2, num_classes=NUM_CLASSES, self_condition=True)
    seen = []
    denoiser = process.denoiser(net, guidance_scale=w, class_labels=labels)

    def recording(x, alpha, sigma):
        out = denoiser(x, alpha, sigma)
        seen.append(out.x0)
        return out

    run_sampler(Sampler(algorithm, 4), process, recording, x_t)
    assert net.calls[0][1]["x_self_cond"] is None
    for (batch, kwargs), previous in zip(net.calls[1:], seen):
        expected = previous if batch == 4 else torch.cat([previous, previous])
        assert torch.equal(kwargs["x_self_cond"], expected)
