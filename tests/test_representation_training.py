"""REPA and the dispersive loss in `train(cfg)` (issue 28): both weights 0 is a run without them, bit for bit; with
them the terms are logged, the projector is saved and a resumed run matches an uninterrupted one bit for bit, and
sampling loads the checkpoint as any other."""

import pytest
import torch

from diffusion_lab.builders import load_model
from test_representation import classifier_file
from test_resume import assert_same_run, last_checkpoint, run
from tiny_run import image_folder, tiny_overrides


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A feature classifier of random weights for the 8x8 images: REPA's encoder."""
    return classifier_file(tmp_path_factory.mktemp("encoder") / "encoder.ckpt", image_size=8)


@pytest.fixture(scope="module")
def baseline(images, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("baseline")
    run(tiny_overrides(images, output_dir, 4))
    return last_checkpoint(output_dir)


def both_terms(encoder: str) -> list[str]:
    return ["representation=repa", f"representation.encoder.path={encoder}", "representation.disp_weight=0.25",
            "representation.projector_dim=16"]


def test_both_weights_zero_is_the_run_without_them_bit_for_bit(images, baseline, tmp_path, one_thread):
    run(tiny_overrides(images, tmp_path, 4) + ["representation=repa", "representation.repa_weight=0",
                                               "representation.disp_weight=0"])
    assert_same_run(baseline, last_checkpoint(tmp_path))


def test_terms_train_log_checkpoint_resume_exactly_and_sample(images, encoder, baseline, tmp_path, one_thread):
    straight, first = tmp_path / "straight", tmp_path / "first"
    metrics, _ = run(tiny_overrides(images, straight, 4) + both_terms(encoder))
    assert {"train/repa_loss", "train/disp_loss"} <= metrics.keys()
    assert -1 <= metrics["train/repa_loss"] <= 1 and -torch.log(torch.tensor(8.0)) <= metrics["train/disp_loss"] <= 0
    checkpoint = last_checkpoint(straight)
    projector = [name for name in checkpoint["current_model_state"] if name.startswith("representation.projector.")]
    assert len(projector) == 6  # three linear layers, weight and bias
    assert not any("encoder" in name for name in checkpoint["state_dict"])
    assert not torch.equal(checkpoint["current_model_state"]["model.net.final_conv.weight"],
                           baseline["current_model_state"]["model.net.final_conv.weight"])

    run(tiny_overrides(images, first, 2) + both_terms(encoder))
    run(tiny_overrides(images, tmp_path / "second", 4) + both_terms(encoder)
        + [f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"])
    assert_same_run(checkpoint, last_checkpoint(tmp_path / "second"))

    model = load_model(checkpoint, "ema", torch.device("cpu"))  # what sample.py loads: the projector is not the model's
    assert not any(name.startswith("representation") for name in model.state_dict())
