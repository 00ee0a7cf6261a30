"""Fault tolerance: SIGTERM mid-epoch leaves a resumable last.ckpt, and `ckpt_path=auto` in the same run folder
reaches bit for bit the raw and EMA weights, optimizer state and W&B run id of a run never interrupted."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffusion_lab.train import train
from diffusion_lab.utils.checkpoint import load_checkpoint
from diffusion_lab.utils.resolvers import register_resolvers
from tiny_run import ROOT, TRAIN_STEPS_PER_EPOCH, image_folder, tiny_overrides

STEPS = 2 * TRAIN_STEPS_PER_EPOCH + 2  # ends mid-epoch, after two epoch boundaries
INTERRUPT_AT = TRAIN_STEPS_PER_EPOCH + 1  # mid-epoch: the resumed sampler must skip the batches already seen


def run(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)
    return train(cfg)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sigterm_then_auto_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    images = image_folder(tmp_path / "images")
    # logger=wandb (offline) on top of the csv logger, to check the run id survives the resume
    logged = ["logger=wandb", "+logger.csv._target_=lightning.pytorch.loggers.CSVLogger", "+logger.csv.save_dir=${paths.output_dir}"]

    straight = tmp_path / "straight"
    run(tiny_overrides(images, straight, STEPS) + ["ckpt_path=auto"])  # auto with no checkpoint: a fresh start

    resumed = tmp_path / "resumed"
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException after the step in flight
        run(tiny_overrides(images, resumed, STEPS) + logged + [
            "ckpt_path=auto", "+callbacks.sigterm._target_=tiny_run.SendSignal", f"+callbacks.sigterm.at_step={INTERRUPT_AT}"])
    interrupted = load_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert interrupted["global_step"] == INTERRUPT_AT
    run_id = interrupted["config"]["logger"]["wandb"]["id"]
    assert run_id

    run(tiny_overrides(images, resumed, STEPS) + logged + ["ckpt_path=auto"])
    expected = load_checkpoint(straight / "checkpoints" / "last.ckpt")
    actual = load_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert expected["global_step"] == actual["global_step"] == STEPS
    assert_same_tensors(expected["current_model_state"], actual["current_model_state"])  # raw weights
    assert_same_tensors(expected["state_dict"], actual["state_dict"])  # EMA weights
    assert_same_tensors(expected["optimizer_states"][0]["state"][0], actual["optimizer_states"][0]["state"][0])
    assert actual["config"]["logger"]["wandb"]["id"] == run_id
    assert not list((resumed / "checkpoints").glob("last-v*.ckpt"))
