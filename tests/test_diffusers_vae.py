"""A pretrained diffusers AutoencoderKL by path as the first stage: it round-trips through save_pretrained and
loading, experiment=dit_imagenet256 runs under debug=fast on generated data with a tiny VAE, and its checkpoint
samples alone (the VAE folder deleted)."""

import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from test_resume import run

from diffusion_lab.models.first_stage import build_first_stage, vae_config
from diffusion_lab.utils.errors import ConfigError


def tiny_vae(path: Path) -> diffusers.AutoencoderKL:
    """A randomly initialised AutoencoderKL in the real layout (two levels: factor 2, 4 latent channels)."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16)
    vae.save_pretrained(path)
    return vae


def test_diffusers_vae_round_trips_through_save_and_load(tmp_path):
    vae = tiny_vae(tmp_path / "vae")
    config = vae_config(str(tmp_path / "vae"), 16)
    assert config["scale_factor"] == 0.18215 and config["model"]["latent_channels"] == 4
    first_stage = build_first_stage(config)
    first_stage.autoencoder.load_pretrained(str(tmp_path / "vae"))
    saved = vae.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in first_stage.autoencoder.vae.state_dict().items())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean
        z = first_stage.encode(x, torch.Generator().manual_seed(0))
        assert torch.allclose(first_stage.autoencoder.encode(x).mean, expected)
        assert z.shape == (2, 4, 8, 8) and first_stage.decode(z).shape == (2, 3, 16, 16)


def test_a_vae_path_without_config_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json") as error:
        vae_config(str(tmp_path / "empty"), 16)
    assert "\n" not in str(error.value)


def rgb_folder(root: Path, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for i in range(48):
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_dit_imagenet256_runs_under_debug_fast_and_samples_from_its_checkpoint_alone(tmp_path, one_thread):
    tiny_vae(tmp_path / "vae")
    run(["experiment=dit_imagenet256", "debug=fast", "data=folder", f"data.root={rgb_folder(tmp_path / 'images')}",
         "data.image_size=16", "data.val_size=8", "data.num_classes=3", f"vae_path={tmp_path / 'vae'}",
         "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "schedule.timesteps=20", "sampler.steps=5",
         "logger=csv", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "trainer.accelerator=cpu",
         "+trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path / 'run'}"])
    shutil.rmtree(tmp_path / "vae")
    run_script("sample.py", [f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "num_samples=2",
                             "batch_size=2", f"output_dir={tmp_path / 'samples'}", "device=cpu", "guidance_scale=2.0"])
    samples = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert samples.shape == (2, 16, 16, 3) and samples.dtype == np.uint8
