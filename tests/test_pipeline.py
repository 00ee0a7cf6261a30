"""End to end: train(cfg) on real Fashion-MNIST, the files a run writes, sampling from a checkpoint alone, EMA."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONFIGS, compose_train, needs_fashion_mnist, run_script
from diffusion_lab.builders import build_model
from diffusion_lab.generate import generate
from diffusion_lab.sample import sample
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.checkpoint import submodule_state


def compose_sample(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("sample.yaml", overrides=overrides)


def test_run_writes_last_checkpoint_and_resolved_config(trained_run):
    output_dir, metrics, _ = trained_run
    assert (output_dir / "checkpoints" / "last.ckpt").is_file()
    text = (output_dir / ".hydra" / "config.yaml").read_text()
    assert "${" not in text
    config = OmegaConf.load(output_dir / ".hydra" / "config.yaml")
    assert not {"channels", "image_size"} & set(config.model)  # the builder's, from the data config
    assert config.paths.output_dir == str(output_dir)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    assert sorted(p.suffix for p in (output_dir / "samples").iterdir()) == [".gif", ".png"]  # media at the last step


def test_checkpoint_loads_with_weights_only_and_holds_ema_and_raw(trained_run):
    output_dir, _, _ = trained_run
    checkpoint = torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert isinstance(checkpoint["config"], dict) and checkpoint["config"]["model"]["dim"] == 8
    assert checkpoint["format_version"] == 2  # the weights of the model object, under model.
    ema = submodule_state(checkpoint["state_dict"], "model.net")
    raw = submodule_state(checkpoint["current_model_state"], "model.net")
    assert ema and ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())
    assert checkpoint["global_step"] == 3


def test_sample_py_on_a_moved_checkpoint_writes_the_three_files(trained_run, tmp_path):
    output_dir, _, _ = trained_run
    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(output_dir / "checkpoints" / "last.ckpt", moved)
    out = tmp_path / "samples"
    run_script("sample.py", [f"ckpt_path={moved}", "num_samples=5", "batch_size=2", f"output_dir={out}", "seed=3",
                             "sampler=ddim", "sampler.steps=4"])
    samples = np.load(out / "samples.npz")["arr_0"]
    assert samples.dtype == np.uint8 and samples.shape == (5, 28, 28, 1)
    assert Image.open(out / "grid.png").size[0] > 28
    gif = Image.open(out / "trajectory.gif")
    assert gif.n_frames == 5  # the noise, then one frame per DDIM step


def test_ema_weights_are_the_ones_sampled(trained_run, tmp_path):
    output_dir, _, _ = trained_run
    ckpt = output_dir / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={ckpt}", "num_samples=3", "batch_size=3", "sampler=ddim", "sampler.steps=3", "seed=0"]
    paths = {w: sample(compose_sample([*common, f"weights={w}", f"output_dir={tmp_path / w}"]))["samples"] for w in ("ema", "raw")}
    ema_samples, raw_samples = (np.load(paths[w])["arr_0"] for w in ("ema", "raw"))
    assert not np.array_equal(ema_samples, raw_samples)

    checkpoint = torch.load(ckpt, weights_only=True)
    model = build_model(checkpoint["config"], trained_first_stage=False)
    model.load_state_dict(submodule_state(checkpoint["state_dict"], "model"))
    assert model.sample_shape == (1, 28, 28)
    direct = generate(model.eval(), Sampler("ddim", 3), 3, 3, seed=0)
    assert np.array_equal(direct.samples, ema_samples)


@pytest.mark.parametrize("sampler_overrides", [["sampler=ddpm"], ["sampler=ddim", "sampler.eta=1.0"], ["sampler=ddim"]])
def test_sampling_is_deterministic_under_a_seed(trained_run, tmp_path, sampler_overrides):
    output_dir, _, _ = trained_run
    ckpt = output_dir / "checkpoints" / "last.ckpt"

    def draw(seed: int, name: str) -> np.ndarray:
        cfg = compose_sample([f"ckpt_path={ckpt}", "num_samples=2", "batch_size=2", "sampler.steps=5", f"seed={seed}",
                              f"output_dir={tmp_path / name}", "trajectory_samples=1", *sampler_overrides])
        return np.load(sample(cfg)["samples"])["arr_0"]

    a, b, c = draw(1, "a"), draw(1, "b"), draw(2, "c")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
@needs_fashion_mnist
def test_a_few_hundred_steps_lower_the_loss_on_real_data(tmp_path):
    from diffusion_lab.train import train

    cfg = compose_train(["trainer.max_steps=240", "trainer.val_check_interval=240", "trainer.log_every_n_steps=1",
                         "data.batch_size=16", "callbacks.ema=null", "callbacks.sample_media=null", "optimizer.lr=3e-3"], tmp_path)
    train(cfg)
    import csv

    with open(tmp_path / "csv" / "metrics.csv") as f:
        losses = np.array([float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")])
    assert len(losses) >= 200
    first, last = losses[:40].mean(), losses[-40:].mean()
    assert last < 0.7 * first, (first, last)


def test_every_group_option_composes():
    """`--cfg job` for every option of every group (the configs resolve where they need no runtime values)."""
    groups = ["data", "model", "process", "schedule", "sampler", "module", "recipe", "trainer", "callbacks", "logger", "debug",
              "experiment"]
    for group in groups:
        for option in sorted(p.stem for p in Path(CONFIGS, group).glob("*.yaml")):
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
                cfg = compose("train.yaml", overrides=[f"{group}={option}"])
            assert cfg.model._target_ and cfg.data._target_, (group, option)


@needs_fashion_mnist
def test_sample_media_sampler_override_as_its_config_comment_writes_it(tmp_path):
    """configs/callbacks/sample_media.yaml's example sampler, given as a train.py override (steps shrunk to 2),
    draws the media: its GIF has x_T and one frame per DDIM step (the run's own sampler: sampler.steps + 1 = 21)."""
    comment = next(line for line in Path(CONFIGS, "callbacks", "sample_media.yaml").read_text().splitlines()
                   if line.strip().startswith("sampler:"))
    example = comment[comment.index("{"): comment.rindex("}") + 1]
    from diffusion_lab.train import train

    cfg = compose_train([f"callbacks.sample_media.sampler={example}", "callbacks.sample_media.sampler.steps=2",
                         "trainer.max_steps=1"], tmp_path)
    _, objects = train(cfg)
    callback = next(c for c in objects["trainer"].callbacks if type(c).__name__ == "SampleMedia")
    assert repr(callback.sampler) == "ddim(steps=2, spacing=uniform)"
    (gif,) = (tmp_path / "samples").glob("step_*.gif")
    assert Image.open(gif).n_frames == 3
