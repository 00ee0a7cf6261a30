"""The model object on a latent run, as a new user meets it: the FID callback scores decoded images, the
loss-by-timestep callback encodes, and metrics=[nll] refuses in one line (the three latent bugs of issue 12); the distillation modules use its public methods only."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import run_script
from test_fid_callback import classifier_checkpoint
from test_latent import compose_run
from tiny_run import image_folder

from diffusion_lab.metrics.scores import SampleScores
from diffusion_lab.models.diffusion_model import DiffusionModel


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_latent_run_callbacks_decode_and_encode_and_nll_refuses(tmp_path, monkeypatch):
    from diffusion_lab.train import train

    data = image_folder(tmp_path / "images")
    train(compose_run(["experiment=autoencoder_fashion_mnist", f"data.root={data}", "model.dim=8"], tmp_path / "ae"))
    scored_shapes, encoded_shapes = [], []
    update, encode = SampleScores.update, DiffusionModel.encode
    monkeypatch.setattr(SampleScores, "update", lambda self, batch: scored_shapes.append(tuple(batch.shape[1:])) or update(self, batch))
    monkeypatch.setattr(DiffusionModel, "encode",
                        lambda self, images, generator=None: encoded_shapes.append(tuple(images.shape[1:])) or encode(self, images, generator))
    _, objects = train(compose_run([
        "experiment=latent_ddpm_fashion_mnist", f"first_stage_ckpt={tmp_path / 'ae' / 'checkpoints' / 'last.ckpt'}",
        f"data.root={data}", "model.dim=8", "model.attn_heads=1", "model.attn_dim_head=8", "schedule.timesteps=10",
        "sampler.steps=3", "callbacks=[default,fid,loss_by_timestep]", "callbacks.sample_media=null",
        "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=4", "callbacks.fid.batch_size=4",
        f"callbacks.fid.classifier_path={classifier_checkpoint(tmp_path / 'clf.ckpt', 8)}",
        f"callbacks.fid.cache_dir={tmp_path / 'cache'}", "callbacks.loss_by_timestep.every_n_steps=2",
        "callbacks.loss_by_timestep.num_images=4", "callbacks.loss_by_timestep.repeats=1",
    ], tmp_path / "ldm"))
    model = objects["module"].model
    assert model.latent and model.sample_shape == (2, 4, 4)
    assert scored_shapes and all(shape == (1, 8, 8) for shape in scored_shapes)  # decoded images, not 2x4x4 latents
    assert encoded_shapes.count((1, 8, 8)) >= 3 + 1  # the 3 training steps and the loss-by-timestep figure encode
    assert list((tmp_path / "ldm").rglob("loss_by_timestep_*.png"))

    result = run_script("sample.py", [f"ckpt_path={tmp_path / 'ldm' / 'checkpoints' / 'last.ckpt'}", "metrics=[nll]",
                                      f"output_dir={tmp_path / 'nll'}", "device=cpu"], check=False)
    assert result.returncode != 0 and not (tmp_path / "nll" / "metrics.json").exists()
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "latent" in message[0] and "nll" in message[0], result.stderr


def test_distillation_modules_use_the_model_objects_public_methods_only():
    """The teacher and the CD/CT, progressive and reflow modules never reach into a model's process or backbone
    (`model.process`, `model.net`): what they need is a method of `DiffusionModel` (issue 25)."""
    package = Path(__file__).parents[1] / "src" / "diffusion_lab" / "models"
    for name in ("teacher.py", "consistency_module.py", "progressive_module.py", "reflow_module.py"):
        tree = ast.parse((package / name).read_text())
        reached = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in ("process", "net")]
        assert not reached, f"{name} reaches into .process or .net at lines {reached}"
