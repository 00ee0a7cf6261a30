"""Latents encoded once (`prepare ... first_stage=PATH`, data/latents.py) and stage 2 on them (`data=latent_shards`):
the cached latents equal a fresh encode; stage 2 trains with the encoder never run, resumes exactly and its
checkpoint samples alone; latents of another shape or first stage are one clear line; 2 encoding ranks (gloo) write
the same latents, in the same order, as one."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_script
from test_diffusers_vae import rgb_folder, tiny_vae
from test_errors import assert_one_line_error
from test_latent import image_folder
from test_resume import assert_same_run, last_checkpoint, run
from test_shards import prepare_config, run_script_module
from tiny_run import run_train

from diffusion_lab.data.image_datamodule import ImageDataModule
from diffusion_lab.data.latent_shards import LatentShardsDataModule
from diffusion_lab.data.latents import FIRST_STAGE_FILE, weights_sha256
from diffusion_lab.models.first_stage import load_first_stage
from diffusion_lab.data.prepare import prepare
from diffusion_lab.data.shards import ShardsDataModule
from diffusion_lab.models.components.autoencoder_kl import AutoencoderKL
from diffusion_lab.utils.errors import ConfigError

FOLDER = ["data=folder", "data.image_size=8", "data.channels=1", "data.val_size=8"]  # test_latent's 40 8x8 images


def autoencoder_ckpt(path: Path, seed: int = 0, latent_channels: int = 2) -> Path:
    """A randomly initialised project autoencoder (8x8x1 images -> 4x4 latents) saved as an autoencoder checkpoint."""
    torch.manual_seed(seed)
    model = {"_target_": "diffusion_lab.models.components.autoencoder_kl.AutoencoderKL", "channels": 1,
             "image_size": 8, "factor": 2, "latent_channels": latent_channels, "dim": 8}
    net = AutoencoderKL(**{key: value for key, value in model.items() if key != "_target_"})
    torch.save({"config": {"model": model}, "first_stage": {"scale_factor": 0.8},
                "state_dict": {f"net.{name}": value for name, value in net.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory) -> Path:
    return autoencoder_ckpt(tmp_path_factory.mktemp("ae") / "ae.ckpt")


@pytest.fixture(scope="module")
def latents(folder, autoencoder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "latents"
    prepare(prepare_config([*FOLDER, f"data.root={folder}", f"first_stage={autoencoder}", f"out={out}",
                            "num_workers=0", "device=cpu", "latent_dtype=float32"]))
    return out


def fresh_moments(first_stage, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        posterior = first_stage.autoencoder.encode(images.float() / 127.5 - 1)
    return torch.cat([posterior.mean, posterior.logvar], dim=1)


@pytest.mark.parametrize("kind", ["autoencoder-float32", "diffusers_vae-float16"])
def test_cached_latents_equal_a_fresh_encode(kind, folder, latents, autoencoder, tmp_path):
    if kind.startswith("autoencoder"):
        source, image_size, channels, out, dtype = autoencoder, 8, 1, latents, torch.float32
        images = folder
    else:  # 16x16 RGB through a tiny diffusers AutoencoderKL, stored as float16
        tiny_vae(tmp_path / "vae")
        source, image_size, channels, out, dtype = tmp_path / "vae", 16, 3, tmp_path / "latents", torch.float16
        images = rgb_folder(tmp_path / "images")
        prepare(prepare_config(["data=folder", f"data.root={images}", "data.image_size=16", "data.val_size=8",
                                f"first_stage={source}", f"out={out}", "num_workers=0", "device=cpu"]))
    first_stage, config = load_first_stage(str(source), (channels, image_size, image_size), "first_stage")
    meta = json.loads((out / "prepared.json").read_text())["latents"]
    assert meta["shape"] == list(first_stage.latent_shape) and meta["dtype"] == str(dtype).removeprefix("torch.")
    assert meta["scale_factor"] == pytest.approx(float(first_stage.scale_factor))
    assert meta["first_stage"]["weights_sha256"] == weights_sha256(first_stage)
    assert meta["first_stage"]["config"]["model"] == config["model"]
    copied, _ = load_first_stage(str(out / FIRST_STAGE_FILE), (channels, image_size, image_size), "first_stage")
    assert weights_sha256(copied) == weights_sha256(first_stage)  # the decoder stage 2 uses is the same

    cached = LatentShardsDataModule(str(out), image_size, channels)
    cached.setup()
    source_images = ImageDataModule("folder", str(images), image_size, channels, val_size=8)
    source_images.setup()
    for latent_split, image_split in [(cached.split(train=True), source_images.train_set),
                                      (cached.val_set, source_images.val_set)]:
        # the same batches as prepare encoded (one each), so float32 is bit-exact; float16 is its rounding
        expected = fresh_moments(first_stage, image_split.images).to(dtype)
        assert latent_split.moments.dtype == dtype and torch.equal(latent_split.moments, expected)
        assert torch.equal(latent_split.labels, image_split.labels)


def test_a_stopped_encode_keeps_finished_splits_and_encodes_the_unfinished_one_again(folder, latents, autoencoder,
                                                                                    tmp_path):
    out = shutil.copytree(latents, tmp_path / "latents")
    meta = json.loads((out / "prepared.json").read_text())
    (out / "prepared.json").write_text(json.dumps(meta | {"complete": False}))
    (out / "val" / "index.json").unlink()  # stopped after val's chunks were written, before its index
    train_chunks = {path.name: path.stat().st_mtime_ns for path in (out / "train").glob("chunk-*.bin")}
    overrides = [*FOLDER, f"data.root={folder}", "num_workers=0", "device=cpu", "latent_dtype=float32"]
    prepare(prepare_config([*overrides, f"first_stage={autoencoder}", f"out={out}"]))
    assert {path.name: path.stat().st_mtime_ns for path in (out / "train").glob("chunk-*.bin")} == train_chunks
    again, straight = LatentShardsDataModule(str(out), 8, 1), LatentShardsDataModule(str(latents), 8, 1)
    assert torch.equal(again.split(train=False).moments, straight.split(train=False).moments)
    other = autoencoder_ckpt(tmp_path / "other.ckpt", seed=1)
    with pytest.raises(ConfigError, match=r"holds shards prepared with other settings \(latents\)"):
        prepare(prepare_config([*overrides, f"first_stage={other}", f"out={out}"]))


def stage_two(latents: Path, output_dir: Path, max_steps: int = 4) -> list[str]:
    """The default experiment (DDPM, attention U-Net) shrunk, on the latent shards, under debug=fast."""
    return ["debug=fast", "data=latent_shards", f"data.root={latents}", "model.dim=8", "model.dim_mults=[1,2]",
            "model.attn_heads=1", "model.attn_dim_head=8", "schedule.timesteps=20", "sampler.steps=5",
            "callbacks.sample_media.num_samples=2", "callbacks.sample_media.trajectory_samples=1",
            "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "+trainer.enable_progress_bar=false",
            f"trainer.max_steps={max_steps}", "trainer.max_epochs=-1", f"paths.output_dir={output_dir}"]


@pytest.fixture
def no_encoder(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("stage 2 on latent shards ran the encoder")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_stage_two_trains_without_the_encoder_and_its_checkpoint_samples_alone(latents, tmp_path, no_encoder,
                                                                               one_thread):
    copy = shutil.copytree(latents, tmp_path / "latents")
    _, objects = run(stage_two(copy, tmp_path / "run"))
    model = objects["module"].model
    assert model.latent and model.sample_shape == (2, 4, 4) and model.net.init_conv.in_channels == 2
    assert weights_sha256(model.first_stage) == json.loads((copy / "prepared.json").read_text())["latents"][
        "first_stage"]["weights_sha256"]
    assert last_checkpoint(tmp_path / "run")["global_step"] == 4
    assert list((tmp_path / "run" / "samples").glob("*.png"))  # the sample callback decoded latents into images
    shutil.rmtree(copy)  # sampling needs the checkpoint alone
    run_script("sample.py", [f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "num_samples=3",
                             "batch_size=2", f"output_dir={tmp_path / 'samples'}", "device=cpu", "trajectory_samples=2"])
    samples = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert samples.shape == (3, 8, 8, 1) and samples.dtype == np.uint8


def test_sigterm_mid_epoch_on_latent_shards_then_resume_matches_an_uninterrupted_run(latents, tmp_path, no_encoder,
                                                                                   one_thread):
    steps = 6  # 4 batches an epoch: stopped in the first epoch, ended in the second
    run(stage_two(latents, tmp_path / "straight", steps))
    overrides = stage_two(latents, tmp_path / "run", steps) + ["ckpt_path=auto"]
    with pytest.raises(SystemExit):
        run(overrides + ["+callbacks.sigterm._target_=tiny_run.SendSignal", "+callbacks.sigterm.at_step=2"])
    assert last_checkpoint(tmp_path / "run")["global_step"] == 2
    run(overrides)
    assert_same_run(last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "run"))


@pytest.mark.parametrize("latent_channels, seed, message", [
    (3, 0, r"latents shape mismatch: .* holds latents of shape \(2, 4, 4\) .* diffuses \(3, 4, 4\)"),
    (2, 1, "the run's first stage is not the one the latents .* were encoded with"),  # same shape, other weights
])
def test_a_first_stage_other_than_the_latents_one_is_one_line(latents, tmp_path, latent_channels, seed, message):
    other = autoencoder_ckpt(tmp_path / "other.ckpt", seed, latent_channels)
    with pytest.raises(ConfigError, match=message) as error:
        run([*stage_two(latents, tmp_path / "run"), f"first_stage_ckpt={other}"])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_latents_of_another_shape_are_one_line_from_the_cli(latents, tmp_path):
    other = autoencoder_ckpt(tmp_path / "other.ckpt", latent_channels=3)
    result = run_train(["experiment=latent_ddpm_fashion_mnist", *stage_two(latents, tmp_path / "run"),
                        f"first_stage_ckpt={other}"], check=False)
    assert_one_line_error(result, "latents shape mismatch", "(2, 4, 4)", "(3, 4, 4)")


def test_image_shards_latent_shards_and_first_stages_are_not_mixed_up(folder, latents, tmp_path):
    prepare(prepare_config([*FOLDER, f"data.root={folder}", f"out={tmp_path / 'images'}", "num_workers=1"]))
    with pytest.raises(ConfigError, match="holds images .* read them with data=shards"):
        LatentShardsDataModule(str(tmp_path / "images"), 8, 1)
    with pytest.raises(ConfigError, match="holds latents .* read them with data=latent_shards"):
        ShardsDataModule(str(latents), 8, 1)
    with pytest.raises(ConfigError, match="first_stage=/nonexistent.ckpt does not exist"):
        prepare(prepare_config([*FOLDER, f"data.root={folder}", "first_stage=/nonexistent.ckpt", f"out={tmp_path / 'x'}"]))
    with pytest.raises(ConfigError, match="holds latents, not images"):
        LatentShardsDataModule(str(latents), 8, 1).split(train=False).images  # nothing to score real images on


@pytest.mark.slow
def test_two_encoding_ranks_write_the_same_latents_as_one(folder, latents, autoencoder, tmp_path):
    result = run_script_module([*FOLDER, f"data.root={folder}", f"first_stage={autoencoder}", f"out={tmp_path / 'out'}",
                                "num_workers=0", "latent_dtype=float32", "trainer=ddp", "trainer.accelerator=cpu",
                                "trainer.devices=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    two, one = LatentShardsDataModule(str(tmp_path / "out"), 8, 1), LatentShardsDataModule(str(latents), 8, 1)
    assert len(list((tmp_path / "out" / "train").glob("chunk-1-*.bin"))) >= 1  # rank 1 wrote its own chunks
    for train in (True, False):  # in the split's order; equal up to float32 rounding (other batch compositions)
        torch.testing.assert_close(two.split(train).moments, one.split(train).moments, rtol=1e-5, atol=1e-6)
        assert torch.equal(two.split(train).labels, one.split(train).labels)
