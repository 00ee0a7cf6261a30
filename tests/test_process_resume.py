"""Flow matching and EDM train with EMA and resume exactly, as DDPM does (tests/test_resume.py): a run stopped at
step 3 and continued to step 6 reaches bit for bit the raw and EMA weights and optimizer state of a run never
interrupted, and its checkpoint samples."""

import pytest
import torch

from test_resume import assert_same_run, last_checkpoint, run
from tiny_run import image_folder, tiny_overrides

from diffusion_lab.builders import load_model
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.errors import ConfigError


def overrides(experiment: str, images, output_dir, steps: int) -> list[str]:
    tiny = [o for o in tiny_overrides(images, output_dir, steps) if not o.startswith("schedule.")]
    return [f"experiment={experiment}", *tiny, "callbacks.ema.decay=0.5", "callbacks.ema.warmup=false",
            "callbacks.ema.sigma_rel=null"]


@pytest.mark.parametrize("experiment, sampler", [("rectified_flow_fashion_mnist", Sampler("heun", 3, "uniform")),
                                                 ("edm_fashion_mnist", Sampler("edm", 3, "karras"))])
def test_process_resumes_exactly_with_ema(experiment, sampler, tmp_path, one_thread):
    images = image_folder(tmp_path / "images")
    run(overrides(experiment, images, tmp_path / "straight", 6))
    run(overrides(experiment, images, tmp_path / "first", 3))
    run(overrides(experiment, images, tmp_path / "second", 6) + [f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"])
    straight = last_checkpoint(tmp_path / "straight")
    assert_same_run(straight, last_checkpoint(tmp_path / "second"))
    ema, raw = (load_model(straight, kind, torch.device("cpu")) for kind in ("ema", "raw"))
    assert not torch.equal(ema.net.final_conv.weight, raw.net.final_conv.weight)  # the EMA is its own average
    x = ema.sample(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), sampler)
    assert x.shape == (2, 1, 8, 8) and x.isfinite().all()


def test_resume_may_switch_gradient_checkpointing(tmp_path, one_thread):
    """How the network runs is not what it is: a run resumed with model.gradient_checkpointing flipped is accepted,
    and a changed width is still refused."""
    images = image_folder(tmp_path / "images")
    first = tmp_path / "first" / "checkpoints" / "last.ckpt"
    run(tiny_overrides(images, tmp_path / "first", 2))
    run(tiny_overrides(images, tmp_path / "second", 3) + ["model.gradient_checkpointing=true", f"ckpt_path={first}"])
    assert last_checkpoint(tmp_path / "second")["global_step"] == 3
    with pytest.raises(ConfigError, match="is another run: model.dim: 8 in the checkpoint, 16 here"):
        run(tiny_overrides(images, tmp_path / "third", 3) + ["model.dim=16", f"ckpt_path={first}"])
