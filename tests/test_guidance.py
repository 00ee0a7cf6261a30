"""Classifier-free guidance as one batched forward, and self-conditioning: its state in sampling and the x_0 it
feeds back in training and sampling."""

import pytest
import torch
from toy_models import TinyNet, run_sampler

from diffusion_lab.diffusion.guidance import Guidance, GuidedDenoiser
from diffusion_lab.diffusion.edm import EDM
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.samplers import Sampler
from diffusion_lab.samplers.denoiser import DenoiserOutput, SamplerError
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
    guided = process.denoiser(net, clip_denoised=False, guidance=Guidance(w), class_labels=labels)(x_t, *level)
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
    guided = process.denoiser(net, guidance=Guidance(2.0), class_labels=labels)(x_t, *level)
    conditional = process.denoiser(net, class_labels=labels)(x_t, *level)
    assert torch.allclose(guided.variance_interp, conditional.variance_interp)


def test_guidance_without_labels_is_a_config_error():
    process, _, _, _ = setup()
    with pytest.raises(ConfigError, match="class_labels"):
        process.denoiser(TinyNet(channels=2), guidance=Guidance(3.0))


def test_guided_sampling_runs_every_sampler():
    process, x_t, _, labels = setup()
    model = DiffusionModel(TinyNet(channels=2, num_classes=NUM_CLASSES), process, (2, 4, 4), num_classes=NUM_CLASSES)
    for algorithm in SAMPLERS:
        if algorithm == "flow_map":  # steps a learned flow map, which a DDPM process has not: one line instead
            with pytest.raises(SamplerError, match="sampler=flow_map"):
                model.sample(x_t, Sampler(algorithm, 4), guidance=Guidance(2.0), class_labels=labels)
            continue
        x = model.sample(x_t, Sampler(algorithm, 4), guidance=Guidance(2.0), class_labels=labels,
                         generator=torch.Generator().manual_seed(0))
        assert x.shape == x_t.shape and x.abs().max() <= 1


@pytest.mark.parametrize("algorithm", ["ddim", "heun", "unipc"])
@pytest.mark.parametrize("w", [1.0, 2.0])
def test_self_conditioning_feeds_the_previous_x0(algorithm, w):
    """Every network call after the first gets the x_0 the sampler saw from the call before."""
    process, x_t, _, labels = setup()
    net = Counting(channels=2, num_classes=NUM_CLASSES, self_condition=True)
    seen = []
    denoiser = process.denoiser(net, guidance=Guidance(w), class_labels=labels)

    def recording(x, alpha, sigma):
        out = denoiser(x, alpha, sigma)
        seen.append(out.x0)
        return out

    run_sampler(Sampler(algorithm, 4), process, recording, x_t)
    assert net.calls[0][1]["x_self_cond"] is None
    for (batch, kwargs), previous in zip(net.calls[1:], seen):
        expected = previous if batch == 4 else torch.cat([previous, previous])
        assert torch.equal(kwargs["x_self_cond"], expected)


class Scaled(Counting):
    """TinyNet's output times 5, so that x_0 estimates leave [-1, 1]."""

    def forward(self, x, t, **kwargs):
        return 5 * super().forward(x, t, **kwargs)


@pytest.mark.parametrize("name, latent, clamped", [("ddpm", False, True), ("ddpm", True, False), ("edm", False, False)])
def test_self_conditioning_feeds_the_same_function_of_x0_in_training_and_sampling(name, latent, clamped):
    """Issue 26 item 7: the x_0 fed back is clamped to [-1, 1] in training and in sampling alike where the model's x_0
    lies there (DDPM on pixels), and as it is in both for latents and EDM, whatever clip_denoised sampling is asked for
    (`DiffusionModel.clip_x0`, `self_condition_input`)."""
    process = GaussianDiffusion(beta_schedule("linear", 30)) if name == "ddpm" else EDM()
    net = Scaled(channels=2, self_condition=True)
    model = DiffusionModel(net, process, (2, 4, 4), first_stage=torch.nn.Identity() if latent else None)
    assert model.clip_x0 == clamped
    x0 = 3 * torch.randn(8, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for seed in range(20):  # self-conditioning is used in half the training steps
        model.loss(x0, torch.Generator().manual_seed(seed))
        if len(net.calls) == 2:
            break
        net.calls.clear()
    training = [net.calls[1][1]["x_self_cond"]]
    net.calls.clear()
    model.sample(x0, Sampler("ddim", 6, process.default_spacing), clip_denoised=not clamped)
    sampling = [kwargs["x_self_cond"] for _, kwargs in net.calls[1:]]
    for fed in (training, sampling):
        if clamped:
            assert all(x.abs().max() <= 1 for x in fed) and any((x.abs() == 1).any() for x in fed)
        else:
            assert any((x.abs() > 1).any() for x in fed)


def test_self_conditioning_state_starts_afresh_in_every_sampling_run():
    """One denoiser module sampled twice: the first call of each run gets no x_self_cond (`SelfConditioning`'s state
    is reset by the Sampler), every later call the x_0 of the call before."""
    process, x_t, _, _ = setup()
    net = Counting(channels=2, self_condition=True)
    denoiser = process.denoiser(net)
    sampler = Sampler("ddim", 3)
    for _ in range(2):
        net.calls.clear()
        run_sampler(sampler, process, denoiser, x_t)
        fed = [kwargs["x_self_cond"] for _, kwargs in net.calls]
        assert fed[0] is None and all(x is not None for x in fed[1:]) and sampler.evaluations_used == 3


class LabelShift(torch.nn.Module):
    """A toy denoiser: x_0 = x + label, eps = x - label, variance = label, per sample; records its batch sizes."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, alpha, sigma, class_labels=None):
        self.batches.append(x.shape[0])
        shift = class_labels.double().reshape(-1, 1, 1, 1)
        return DenoiserOutput(x + shift, x - shift, shift.expand_as(x))


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guidance_wrapper_is_out_u_plus_w_times_the_difference(w):
    """`GuidedDenoiser` (classifier-free) on a toy denoiser: out_u + w (out_c - out_u) for x_0 and eps with the null class for
    out_u, from one call over the batch twice (w = 1: the conditional call alone); the variance is the conditional's."""
    inner, labels = LabelShift(), torch.tensor([0, 1, 2])
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    out = GuidedDenoiser(inner, Guidance(w), labels, null_class=7)(x, torch.ones(1), torch.ones(1))
    shift_c, shift_u = labels.double().reshape(-1, 1, 1, 1), 7.0
    torch.testing.assert_close(out.x0, (x + shift_u) + w * (shift_c - shift_u))
    torch.testing.assert_close(out.eps, (x - shift_u) + w * (shift_u - shift_c))
    torch.testing.assert_close(out.variance_interp, shift_c.expand_as(x))
    assert inner.batches == [3 if w == 1 else 6]
