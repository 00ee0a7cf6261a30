"""Checkpoints written before the model object and the (alpha, sigma) processes (format 1) sample the same images;
runs saved while backbone configs still declared the data's shape resume."""

from pathlib import Path

import pytest
import torch

from diffusion_lab.builders import load_model
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.checkpoint import load_checkpoint
from tiny_run import image_folder, run_train, tiny_overrides

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLERS = {
    "ddpm": Sampler("ddpm", 20, "uniform", variance="auto"),
    "ddim": Sampler("ddim", 10, "uniform", eta=0.0),
    "dpm_solver_pp": Sampler("dpm_solver_pp", 8, "trailing", order=2),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_format_1_ddpm_checkpoint_samples_the_same_images(name, one_thread):
    """tests/fixtures/README.md: the samples that the code of format 1 drew from the fixture, at the same seed, to
    float32 rounding (bit for bit on the machine that drew them; another CPU's kernels round differently, by ~1e-5
    after a sampler's steps, where a wrong coefficient or a misread weight moves samples by ~1e-1)."""
    checkpoint = load_checkpoint(FIXTURES / "ddpm_v1.ckpt")
    assert checkpoint["format_version"] == 2 and all(key.startswith("model.") for key in checkpoint["state_dict"])
    model = load_model(checkpoint, "ema", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((4, 1, 8, 8), generator=generator)
    samples = model.sample(noise, SAMPLERS[name], generator=generator)
    expected = torch.load(FIXTURES / "ddpm_v1_samples.pt", weights_only=True)[name]
    torch.testing.assert_close(samples, expected, rtol=0, atol=1e-4)


@pytest.mark.slow  # two tiny training runs through train.py: about 25 s on 2 cores
def test_a_run_saved_with_the_shape_in_its_model_config_resumes(tmp_path):
    """Backbone configs said `channels: ${data.channels}` and `image_size: ${data.image_size}` until the builder
    became their one source; a checkpoint of that time resumes (the saved keys are dropped on load) rather than
    being refused as another run."""
    data, run = image_folder(tmp_path / "data"), tmp_path / "run"
    run_train(tiny_overrides(data, run, 2))
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    checkpoint["config"]["model"].update(channels=1, image_size=8)
    torch.save(checkpoint, last)
    run_train([*tiny_overrides(data, run, 3), "ckpt_path=auto"])
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
