"""REPA and the dispersive loss in `train(cfg)` (issue 28): both weights 0 is a run without them, bit for bit; with
them the terms are logged, the projector is saved, a resumed run matches an uninterrupted one bit for bit, sampling
loads the checkpoint as any other, and two DDP ranks end with the same backbone and projector."""

import pytest
import torch

from diffusion_lab.builders import load_model
from test_representation import classifier_file
from test_resume import assert_same_run, last_checkpoint, run
from tiny_run import image_folder, run_train, tiny_overrides


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A feature classifier of random weights for the 8x8 images: REPA's encoder."""
    return classifier_file(tmp_path_factory.mktemp("encoder") / "encoder.ckpt", image_size=8)


@pytest.fixture(scope="module")
def baseline(images, tmp_path_factory):
    """The run without the terms, on one thread as the tests' own runs (`one_thread`): bit equality needs the same
    reduction order, whatever thread count the tests before left."""
    output_dir, threads = tmp_path_factory.mktemp("baseline"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(tiny_overrides(images, output_dir, 4))
    finally:
        torch.set_num_threads(threads)
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


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_terms_under_two_rank_ddp_leave_both_ranks_the_same_weights(images, encoder, tmp_path):
    output_dir, probe_dir = tmp_path / "run", tmp_path / "probe"
    run_train(tiny_overrides(images, output_dir, 2) + both_terms(encoder) + [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.sync_batchnorm=false",
        "+callbacks.probe._target_=tiny_run.RankProbe", f"+callbacks.probe.dirpath={probe_dir}",
    ])
    ranks = [torch.load(probe_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])
    assert any(name.startswith("representation.projector.") for name in ranks[0]["weights"])
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name
