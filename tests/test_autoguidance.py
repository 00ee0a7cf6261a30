"""Guidance over an interval of noise levels (Kynkaanniemi et al. 2024) and autoguidance by a weaker model (Karras et
al. 2024): the switch and the combination on toy denoisers, the network evaluations saved, the grid check, and a
guide that equals the model giving the model itself."""

import math

import pytest
import torch
from toy_models import TinyNet

from diffusion_lab.diffusion.edm import EDM
from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.guidance import Guidance, GuidedDenoiser
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.samplers import Sampler
from diffusion_lab.samplers.denoiser import DenoiserOutput
from diffusion_lab.utils.errors import ConfigError


class Shift(torch.nn.Module):
    """A toy denoiser: x_0 = x + offset + label, eps = x - offset - label; records the batch of each call."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset, self.batches = offset, []

    def forward(self, x, alpha, sigma, class_labels=None):
        self.batches.append(x.shape[0])
        shift = self.offset + (0 if class_labels is None else class_labels.double().reshape(-1, 1, 1, 1))
        return DenoiserOutput(x + shift, x - shift)


def level(s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of the noise level s = sigma / alpha, on the variance-preserving circle."""
    alpha = 1 / math.sqrt(1 + s**2)
    return torch.tensor(alpha, dtype=torch.float64), torch.tensor(s * alpha, dtype=torch.float64)


@pytest.mark.parametrize("s, inside", [(0.5, False), (1.0, False), (1.5, True), (3.0, True), (3.5, False)])
def test_classifier_free_guidance_acts_only_inside_the_interval(s, inside):
    """(s_lo, s_hi] = (1, 3]: inside, D_u + w (D_c - D_u) from one call over the batch twice; outside (and at s_lo),
    the conditional D alone from one call over the batch."""
    inner, labels, w = Shift(0.0), torch.tensor([0, 1, 2]), 2.5
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    out = GuidedDenoiser(inner, Guidance(w, (1.0, 3.0)), labels, null_class=7)(x, *level(s))
    shift_c = labels.double().reshape(-1, 1, 1, 1)
    expected = (x + 7) + w * (shift_c - 7) if inside else x + shift_c
    torch.testing.assert_close(out.x0, expected)
    assert inner.batches == [6 if inside else 3]


def test_autoguidance_is_guide_plus_w_times_the_difference_and_one_call_each():
    """D_g + w (D - D_g), the guide given the same labels; each network called once over the batch."""
    main, guide, labels, w = Shift(1.0), Shift(-0.5), torch.tensor([0, 2]), 3.0
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    out = GuidedDenoiser(main, Guidance(w, guide_net=torch.nn.Identity()), labels, guide=guide)(x, *level(1.0))
    shift = labels.double().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out.x0, (x - 0.5 + shift) + w * 1.5)
    torch.testing.assert_close(out.eps, (x + 0.5 - shift) - w * 1.5)
    assert main.batches == [2] and guide.batches == [2]


def test_per_sample_levels_are_switched_per_sample():
    inner, labels, w = Shift(0.0), torch.tensor([1, 1]), 2.0
    x = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    alpha, sigma = (torch.stack(pair) for pair in zip(level(0.5), level(2.0)))
    out = GuidedDenoiser(inner, Guidance(w, (1.0, 3.0)), labels, null_class=5)(x, alpha, sigma)
    assert out.x0.flatten().tolist() == [1.0, 5 + w * (1 - 5)]


def make_model(process, conditional=True, seed=0) -> DiffusionModel:
    net = TinyNet(channels=2, num_classes=3 if conditional else None, seed=seed)
    return DiffusionModel(net, process, (2, 4, 4), num_classes=3 if conditional else None)


PROCESSES = {"ddpm": lambda: GaussianDiffusion(beta_schedule("linear", 30)), "edm": EDM, "flow": FlowMatching}


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("algorithm", ["ddim", "heun", "dpm_solver_pp"])
def test_autoguidance_by_the_model_itself_is_the_model(name, algorithm):
    """guide == main: D + w (D - D) = D, so the samples equal the unguided ones bit for bit, for an unconditional
    model too (autoguidance needs no classes)."""
    model = make_model(PROCESSES[name](), conditional=False)
    sampler = Sampler(algorithm, 4, model.process.default_spacing)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    plain = model.sample(noise, sampler)
    guided = model.sample(noise, sampler, guidance=model.autoguidance(model, 2.5))
    assert torch.equal(plain, guided)


def test_autoguidance_by_another_model_changes_the_samples_and_counts_two_evaluations():
    process = GaussianDiffusion(beta_schedule("linear", 30))
    model, guide = make_model(process), make_model(process, seed=1)
    calls = []
    guide.net.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    noise, labels = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2])
    sampler = Sampler("ddim", 5)
    plain = model.sample(noise, sampler, class_labels=labels)
    guided = model.sample(noise, sampler, guidance=model.autoguidance(guide, 2.0), class_labels=labels)
    assert not torch.allclose(plain, guided) and calls == [3] * 5


@pytest.mark.parametrize("name", PROCESSES)
def test_interval_saves_the_unconditional_pass_outside_it(name):
    """Network rows per sample = steps + the number of grid levels inside the interval (its s_lo excluded, its s_hi
    included), and an interval holding every level is guidance everywhere, bit for bit."""
    model = make_model(PROCESSES[name]())
    sampler = Sampler("ddim", 6, model.process.default_spacing)
    alphas, sigmas = model.sampling_grid(sampler)
    levels = (sigmas[:-1] / alphas[:-1].clamp_min(2**-12)).tolist()
    low, high = levels[4], levels[1]  # holds levels 1, 2, 3 (s_lo itself is outside)
    rows = []
    model.net.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    noise, labels = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 2])
    model.sample(noise, sampler, guidance=Guidance(3.0, (low, high)), class_labels=labels)
    assert rows == [2, 4, 4, 4, 2, 2]
    everywhere = model.sample(noise, sampler, guidance=Guidance(3.0), class_labels=labels)
    wide = model.sample(noise, sampler, guidance=Guidance(3.0, (0.0, math.inf)), class_labels=labels)
    assert torch.equal(everywhere, wide)


def test_an_interval_outside_the_grid_is_one_line():
    model = make_model(GaussianDiffusion(beta_schedule("linear", 30)))
    with pytest.raises(ConfigError, match="holds none of the noise levels"):
        model.sample(torch.randn(1, 2, 4, 4), Sampler("ddim", 4), guidance=Guidance(2.0, (1e3, 1e4)),
                     class_labels=torch.tensor([0]))


@pytest.mark.parametrize("interval", [(2.0, 1.0), (-1.0, 1.0)])
def test_a_reversed_or_negative_interval_is_one_line(interval):
    with pytest.raises(ConfigError, match="0 <= s_lo < s_hi"):
        Guidance(2.0, interval)


@pytest.mark.parametrize("other, words", [
    (lambda: make_model(EDM()), "process edm"),
    (lambda: make_model(GaussianDiffusion(beta_schedule("cosine", 30))), "noise levels"),
    (lambda: make_model(GaussianDiffusion(beta_schedule("linear", 30)), conditional=False), "classes"),
])
def test_a_guide_of_another_process_schedule_or_classes_is_one_line(other, words):
    model = make_model(GaussianDiffusion(beta_schedule("linear", 30)))
    with pytest.raises(ConfigError, match=words):
        model.autoguidance(other(), 2.0)


def test_classifier_free_guidance_of_an_unconditional_model_is_one_line():
    model = make_model(GaussianDiffusion(beta_schedule("linear", 30)), conditional=False)
    with pytest.raises(ConfigError, match="guide network"):
        model.sample(torch.randn(1, 2, 4, 4), Sampler("ddim", 2), guidance=Guidance(2.0))


def test_sample_py_autoguidance_and_interval(tmp_path, one_thread):
    """Through sample.py: guide_ckpt = the checkpoint itself draws the unguided samples bit for bit, on an
    unconditional model; the interval and the guide are recorded in run.json, and a finished folder refuses another
    interval in one line."""
    import json

    import numpy as np
    from test_evaluation import tiny_checkpoint
    from test_pipeline import compose_sample

    from diffusion_lab.sample import sample

    _, ckpt = tiny_checkpoint(tmp_path, ["sampler=ddim", "sampler.steps=4"])
    common = [f"ckpt_path={ckpt}", "num_samples=3", "batch_size=3", "trajectory_samples=1", "device=cpu"]

    def draw(folder, *options):
        paths = sample(compose_sample([*common, f"output_dir={tmp_path / folder}", *options]))
        return np.load(paths["samples"])["arr_0"]

    plain = draw("plain")
    itself = draw("itself", f"guide_ckpt={ckpt}", "guidance_scale=3", "guidance_interval=[0.05,20]")
    assert np.array_equal(plain, itself)
    record = json.loads((tmp_path / "itself" / "run.json").read_text())
    assert record["guidance_interval"] == [0.05, 20] and record["guide_ckpt"] == str(ckpt.resolve())
    with pytest.raises(ConfigError, match="guidance_interval"):
        draw("itself", f"guide_ckpt={ckpt}", "guidance_scale=3", "guidance_interval=[0.1,20]")
