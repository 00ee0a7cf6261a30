"""Every resume is exact: after SIGTERM, after a run that ended at max_steps mid-epoch or at an epoch boundary, with
accumulate_grad_batches=2, in the same or another run folder, the resumed run reaches bit for bit the raw and EMA
weights and optimizer state of a run never interrupted (and keeps its W&B run id)."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffusion_lab.train import train
from diffusion_lab.utils.checkpoint import load_checkpoint
from diffusion_lab.config import register_resolvers
from tiny_run import ROOT, TRAIN_STEPS_PER_EPOCH, image_folder, tiny_overrides

STEPS = 2 * TRAIN_STEPS_PER_EPOCH + 2  # ends mid-epoch, after two epoch boundaries


def run(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)
    return train(cfg)


def last_checkpoint(output_dir) -> dict:
    return load_checkpoint(output_dir / "checkpoints" / "last.ckpt")


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            assert_same_tensors(a[name], b[name])
        else:
            assert torch.equal(torch.as_tensor(a[name]), torch.as_tensor(b[name])), name


def assert_same_run(expected: dict, actual: dict) -> None:
    """The same step, raw weights, EMA weights and optimizer state, bit for bit."""
    assert expected["global_step"] == actual["global_step"]
    assert_same_tensors(expected["current_model_state"], actual["current_model_state"])
    assert_same_tensors(expected["state_dict"], actual["state_dict"])
    assert_same_tensors(expected["optimizer_states"][0]["state"], actual["optimizer_states"][0]["state"])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    """The last checkpoint of a run never interrupted, by accumulate_grad_batches (computed once each)."""
    runs = {}

    def get(accumulate: int, steps: int) -> dict:
        if (accumulate, steps) not in runs:
            output_dir = tmp_path_factory.mktemp(f"straight_{accumulate}")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:  # ckpt_path=auto with no checkpoint: a fresh start
                run(tiny_overrides(images, output_dir, steps) + [f"trainer.accumulate_grad_batches={accumulate}",
                                                                  "ckpt_path=auto"])
            finally:
                torch.set_num_threads(threads)
            runs[accumulate, steps] = last_checkpoint(output_dir)
        return runs[accumulate, steps]

    return get


def test_sigterm_then_auto_resume_matches_an_uninterrupted_run(images, uninterrupted, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # logger=wandb (offline) on top of the csv logger, to check the run id survives the resume
    logged = ["logger=wandb", "+logger.csv._target_=lightning.pytorch.loggers.CSVLogger", "+logger.csv.save_dir=${paths.output_dir}"]
    interrupt_at = TRAIN_STEPS_PER_EPOCH + 1  # mid-epoch: the resumed loader must go on after the batches already seen
    resumed = tmp_path / "resumed"
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException after the step in flight
        run(tiny_overrides(images, resumed, STEPS) + logged + [
            "ckpt_path=auto", "+callbacks.sigterm._target_=tiny_run.SendSignal", f"+callbacks.sigterm.at_step={interrupt_at}"])
    interrupted = last_checkpoint(resumed)
    assert interrupted["global_step"] == interrupt_at
    run_id = interrupted["config"]["logger"]["wandb"]["id"]
    assert run_id

    run(tiny_overrides(images, resumed, STEPS) + logged + ["ckpt_path=auto"])
    actual = last_checkpoint(resumed)
    assert_same_run(uninterrupted(1, STEPS), actual)
    assert actual["config"]["logger"]["wandb"]["id"] == run_id
    assert not list((resumed / "checkpoints").glob("last-v*.ckpt"))


@pytest.mark.parametrize(
    "first_steps, accumulate, in_place",
    [
        (TRAIN_STEPS_PER_EPOCH + 2, 1, False),  # ended at max_steps mid-epoch; continued into another folder
        (TRAIN_STEPS_PER_EPOCH, 1, True),  # ended at an epoch boundary; continued in place with ckpt_path=auto
        (TRAIN_STEPS_PER_EPOCH // 2 + 1, 2, False),  # two batches a step: ended mid-epoch
    ],
    ids=["mid_epoch", "epoch_boundary_in_place", "accumulate_2"],
)
def test_training_longer_matches_an_uninterrupted_run(images, uninterrupted, tmp_path, one_thread, first_steps,
                                                     accumulate, in_place):
    total = STEPS // accumulate
    accumulate_override = [f"trainer.accumulate_grad_batches={accumulate}"]
    first = tmp_path / "first"
    run(tiny_overrides(images, first, first_steps) + accumulate_override)
    assert last_checkpoint(first)["global_step"] == first_steps
    second = first if in_place else tmp_path / "second"
    ckpt_path = "auto" if in_place else first / "checkpoints" / "last.ckpt"
    run(tiny_overrides(images, second, total) + accumulate_override + [f"ckpt_path={ckpt_path}"])
    assert_same_run(uninterrupted(accumulate, total), last_checkpoint(second))
