"""Bad input ends with a non-zero exit and one clear line naming the key, no traceback; nothing written is lost."""

import functools

import pytest
import torch

from conftest import ROOT, TINY, compose_train, run_script
from toy_models import TinyNet

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.generate import generate
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.cli import user_error
from diffusion_lab.utils.errors import ConfigError, NonFiniteError
from diffusion_lab.utils.io import atomic_path
from diffusion_lab.utils.lr_schedules import linear_warmup, optimizers_and_schedulers


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["data.batch_size=0"], ["data.batch_size=0"]),
        (["schedule.timesteps=0"], ["schedule.timesteps=0"]),
        (["model.dim_mults=[1,2,4,8]"], ["data.image_size=28", "divisible by 8"]),
        (["data=folder", "data.root=/nonexistent/images"], ["data.root=/nonexistent/images", "no images"]),
    ],
)
def test_bad_training_overrides(tmp_path, overrides, fragments):
    from diffusion_lab.train import train

    with pytest.raises(Exception) as error:  # noqa: PT011 - Hydra's instantiate wraps it; user_error unwraps
        train(compose_train(overrides, tmp_path))
    config_error = user_error(error.value)
    assert isinstance(config_error, ConfigError), error.value
    for fragment in fragments:
        assert fragment in str(config_error)


def test_train_cli_exits_with_one_line(tmp_path):
    result = run_script("train.py", ["data.batch_size=-3", f"paths.output_dir={tmp_path}", "logger=csv"], check=False)
    assert_one_line_error(result, "data.batch_size=-3", ">= 1")


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
@pytest.mark.parametrize("script, group", [("train.py", "model"), ("train.py", "local"), ("sample.py", "sampler")])
def test_unknown_option_is_rejected_by_hydra_with_the_choices(tmp_path, script, group):
    """No group is `optional`: a typo'd option is Hydra's error listing the options, never silently skipped."""
    # if the option were skipped, data.batch_size=0 / the missing ckpt_path would end the run at once
    args = [f"{group}=nope", "ckpt_path=x"] if script == "sample.py" else [f"{group}=nope", "data.batch_size=0",
                                                                           f"paths.output_dir={tmp_path}"]
    result = run_script(script, args, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"Could not find '{group}/nope'" in result.stderr.splitlines()[0], result.stderr
    options = sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))
    assert options and all(f"\t{option}" in result.stderr for option in options), result.stderr


@pytest.mark.parametrize(
    "optimizer, lr_scheduler, fragments",
    [
        (functools.partial(torch.optim.Adam, lr=-1), None, ["optimizer.lr=-1", "Invalid learning rate"]),
        (functools.partial(torch.optim.SGD, lr=0.1, momentum=-1), None, ["optimizer.momentum=-1"]),
        (functools.partial(torch.optim.AdamW, betas=(0.9, 1.5)), None, ["optimizer.betas=(0.9, 1.5)"]),
        (functools.partial(torch.optim.RMSprop, lr=1e-3, alpah=0.9), None, ["optimizer.alpah=0.9", "'alpah'"]),
        (functools.partial(torch.optim.Adam), functools.partial(linear_warmup, warmup_steps="x"),
         ["lr_scheduler.warmup_steps=x"]),
        (functools.partial(torch.optim.Adam), functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1),
         ["lr_scheduler.max_lr=0.1", "total_steps"]),
    ],
)
def test_optimizer_and_scheduler_arguments_are_config_errors(optimizer, lr_scheduler, fragments):
    with pytest.raises(ConfigError) as error:
        optimizers_and_schedulers([torch.nn.Parameter(torch.zeros(2))], optimizer, lr_scheduler)
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_a_bad_learning_rate_ends_train_py_with_one_line(tmp_path):
    result = run_script("train.py", [*TINY, "optimizer.lr=-1", f"paths.output_dir={tmp_path}"], check=False)
    assert_one_line_error(result, "optimizer.lr=-1", "Invalid learning rate")


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_bad_checkpoints_and_sample_settings(tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"config": {}, "state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    cases = [
        ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], ["missing.ckpt does not exist"]),
        ([f"ckpt_path={truncated}"], ["truncated.ckpt is not a readable checkpoint"]),
        ([f"ckpt_path={foreign}"], ["not a checkpoint of this project"]),
        ([f"ckpt_path={foreign}", "num_samples=0"], ["num_samples=0"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(run_script("sample.py", [*args, f"output_dir={tmp_path / 'out'}"], check=False), *fragments)


class NaNBelow(TinyNet):
    """TinyNet whose output is NaN at timesteps below 12."""

    def forward(self, x, t, **kwargs):
        return torch.where(t.reshape(-1, 1, 1, 1) < 12, torch.nan, super().forward(x, t, **kwargs))


class InfiniteDecoder(torch.nn.Module):
    """A first stage whose decoder turns finite latents into inf."""

    def encode(self, images, generator=None):
        return images

    def decode(self, z):
        return z + torch.inf


def test_nonfinite_samples_and_decoded_latents_raise_naming_the_step_and_sampler():
    process = GaussianDiffusion(beta_schedule("linear", 20))
    sampler = Sampler("ddim", 5)  # t = 19, 14, 10, 5, 0: the step from t = 10 (the first NaN) reaches t = 5
    alpha_bar = process.alphas_cumprod[5]
    level = float(((1 - alpha_bar) / alpha_bar).sqrt())
    message = rf"sampler ddim\(steps=5.*step 3 of 5 \(noise level sigma/alpha={level:.4g}\)"
    with pytest.raises(NonFiniteError, match=message):
        generate(DiffusionModel(NaNBelow(channels=1), process, (1, 4, 4)), sampler, 4, 2, trajectory_samples=1)
    with pytest.raises(NonFiniteError, match="decoder"):
        generate(DiffusionModel(TinyNet(channels=1), process, (1, 4, 4), first_stage=InfiniteDecoder()), sampler, 2, 2)


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_sample_py_on_nonfinite_weights_ends_in_one_line_and_writes_nothing(trained_run, tmp_path):
    checkpoint = torch.load(trained_run[0] / "checkpoints" / "last.ckpt", weights_only=True)
    for value in checkpoint["state_dict"].values():
        if value.is_floating_point():
            value.fill_(torch.nan)
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    out = tmp_path / "samples"
    result = run_script("sample.py", [f"ckpt_path={tmp_path / 'nan.ckpt'}", "sampler=ddim", "sampler.steps=2",
                                      "num_samples=2", "batch_size=2", f"output_dir={out}"], check=False)
    assert_one_line_error(result, "sampler ddim(steps=2", "step 1 of 2", "NaN or inf")
    assert not out.exists() or not any(out.iterdir()), sorted(str(p.relative_to(out)) for p in out.rglob("*"))


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_a_failed_run_leaves_earlier_outputs_intact(trained_run, tmp_path):
    output_dir, _, _ = trained_run
    ckpt = output_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "samples"
    run_script("sample.py", [f"ckpt_path={ckpt}", "num_samples=2", "batch_size=2", f"output_dir={out}", "sampler=ddim",
                             "sampler.steps=2"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run_script("sample.py", [f"ckpt_path={ckpt}", "num_samples=2", f"output_dir={out}", "sampler=ddim",
                                      "sampler.steps=100000"], check=False)
    assert_one_line_error(result, "sampler.steps=100000")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"good"
    assert list(tmp_path.iterdir()) == [target]
