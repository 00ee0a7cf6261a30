"""Fault injection: SIGTERM and Ctrl-C at random points (training step, validation, sample media) stop within one
step or validation batch and leave a last.ckpt that resumes exactly; a checkpoint write that fails halfway, a full
disk while writing samples and a non-finite loss keep the previous good last.ckpt; two runs never share a folder;
a checkpoint of a newer format is a clear error."""

import errno
import random
import signal

import pytest
import torch
from PIL import Image

from diffusion_lab.callbacks import sample_media
from diffusion_lab.utils.checkpoint import FORMAT_VERSION, load_checkpoint
from diffusion_lab.utils.errors import ConfigError
from test_resume import assert_same_run, last_checkpoint, run
from tiny_run import image_folder, run_train, tiny_overrides

STEPS = 6  # 16 training images = 2 steps an epoch, each ending with 3 validation batches (and sample media)
MEDIA = ["callbacks.sample_media.every_n_steps=2", "callbacks.sample_media.num_samples=2",
         "callbacks.sample_media.trajectory_samples=1", "sampler.steps=4"]
HOOKS = ["on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end", "on_validation_batch_start",
         "on_validation_batch_end", "sample_media"]
_draw = random.Random(13)
POINTS = [(hook, _draw.choice(["SIGTERM", "SIGINT"]), _draw.randrange(2, STEPS, 2) if "validation" in hook or
           hook == "sample_media" else _draw.randrange(1, STEPS - 1)) for hook in HOOKS]


def overrides(images, output_dir, steps: int = STEPS, media: bool = True) -> list[str]:
    tiny = [o for o in tiny_overrides(images, output_dir, steps) if not (media and o == "callbacks.sample_media=null")]
    return tiny + ["data.val_size=24"] + (MEDIA if media else [])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(overrides(images, output_dir))
    finally:
        torch.set_num_threads(threads)
    return output_dir


@pytest.mark.parametrize("hook, signum, at_step", POINTS, ids=[f"{h}-{s}-{n}" for h, s, n in POINTS])
def test_a_signal_stops_within_one_step_or_batch_and_resumes_exactly(images, uninterrupted, tmp_path, monkeypatch,
                                                                    one_thread, hook, signum, at_step):
    output_dir = tmp_path / "run"
    if hook == "sample_media":  # the signal arrives while the callback samples at step at_step
        generate, calls = sample_media.generate, []

        def generate_then_signal(*args, **kwargs):
            calls.append(1)
            if len(calls) == at_step // 2:
                signal.raise_signal(getattr(signal, signum))
            return generate(*args, **kwargs)

        monkeypatch.setattr(sample_media, "generate", generate_then_signal)
        probe = []
    else:
        probe = ["+callbacks.signal._target_=tiny_run.SendSignal", f"+callbacks.signal.at_step={at_step}",
                 f"+callbacks.signal.signum={signum}", f"+callbacks.signal.hook={hook}"]
    with pytest.raises(SystemExit) as stop:
        run(overrides(images, output_dir) + probe)
    assert stop.value.code == 128 + getattr(signal, signum)
    monkeypatch.undo()
    interrupted = last_checkpoint(output_dir)
    in_step = hook in ("on_train_batch_start", "on_before_optimizer_step")  # the step in flight completes
    assert interrupted["global_step"] == (at_step + 1 if in_step else at_step)
    validated = interrupted["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["current"]["completed"]
    if "validation" in hook:
        assert validated == 1  # of 3 validation batches
    run(overrides(images, output_dir) + ["ckpt_path=auto"])
    assert_same_run(last_checkpoint(uninterrupted), last_checkpoint(output_dir))


def test_a_checkpoint_write_that_fails_halfway_keeps_the_previous_last_ckpt(images, tmp_path, monkeypatch, one_thread):
    output_dir = tmp_path / "run"
    run(overrides(images, output_dir, steps=2))
    good = (output_dir / "checkpoints" / "last.ckpt").read_bytes()
    save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(ConfigError, match="Input/output error.*last.ckpt holds step 2"):
        run(overrides(images, output_dir, steps=4) + ["ckpt_path=auto"])
    assert (output_dir / "checkpoints" / "last.ckpt").read_bytes() == good
    assert not [p.name for p in (output_dir / "checkpoints").iterdir() if ".tmp" in p.name]


def test_a_full_disk_while_writing_samples_stops_in_one_line_and_keeps_what_was_written(images, tmp_path, monkeypatch,
                                                                                       one_thread):
    output_dir = tmp_path / "run"
    run(overrides(images, output_dir, steps=2))
    samples = {p.name: p.read_bytes() for p in (output_dir / "samples").iterdir()}
    assert samples

    def disk_full(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\0" * 10)  # a partial write, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(ConfigError, match="No space left on device.*last.ckpt holds step 2"):
        run(overrides(images, output_dir, steps=4) + ["ckpt_path=auto"])
    assert {p.name: p.read_bytes() for p in (output_dir / "samples").iterdir()} == samples
    assert load_checkpoint(output_dir / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(images, tmp_path, one_thread):
    output_dir = tmp_path / "run"
    run(overrides(images, output_dir, steps=2))
    with pytest.raises(ConfigError, match=r"not finite at step 3; .*last.ckpt holds step 2"):
        run(overrides(images, output_dir, media=False) + [
            "ckpt_path=auto", "+callbacks.nan._target_=tiny_run.PoisonBatch", "+callbacks.nan.at_step=2"])
    checkpoint = load_checkpoint(output_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2
    assert all(t.isfinite().all() for t in checkpoint["current_model_state"].values() if t.is_floating_point())


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_the_cli_ends_a_non_finite_loss_in_one_line(images, tmp_path):
    from test_errors import assert_one_line_error

    result = run_train(overrides(images, tmp_path / "run", media=False) + ["optimizer.lr=1e30"], check=False)
    assert_one_line_error(result, "not finite at step", "no checkpoint was written")


def test_a_second_run_on_the_same_folder_is_refused_unless_it_resumes(images, tmp_path, one_thread):
    output_dir = tmp_path / "run"
    run(overrides(images, output_dir, steps=2))
    before = (output_dir / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run's checkpoints; continue it with ckpt_path=auto"):
        run(overrides(images, output_dir, steps=2))
    assert (output_dir / "checkpoints" / "last.ckpt").read_bytes() == before
    with pytest.raises(ConfigError, match=r"is in use by another run \(pid \d+\)"):  # one still running
        run(overrides(images, output_dir, steps=4) + ["ckpt_path=auto", "+callbacks.twin._target_=tiny_run.StartTwin"])
    assert (output_dir / "checkpoints" / "last.ckpt").read_bytes() == before


def test_a_checkpoint_of_a_newer_format_is_a_clear_error(tmp_path):
    path = tmp_path / "future.ckpt"
    torch.save({"config": {}, "state_dict": {}, "format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(ConfigError, match=f"has checkpoint format {FORMAT_VERSION + 1}, newer than this diffusion-lab"):
        load_checkpoint(path)
