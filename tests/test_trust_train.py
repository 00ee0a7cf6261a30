"""Training you can trust: a resume takes only the run its checkpoint holds; a loose option is one line; a refused
command changes no byte of the run folder it was refused for; the run's log is in its train.log; last.ckpt is saved
on a step count or a clock without waiting for validation; checkpoints are staged beside their target (never in the
system temp folder); a stopped run names the checkpoint it left; sample media are cheap and stop on a signal."""

import errno
import fcntl
import re
import signal
import tempfile

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.callbacks import sample_media
from diffusion_lab.utils.checkpoint import load_checkpoint
from diffusion_lab.utils.errors import ConfigError
from test_errors import assert_one_line_error
from test_resume import last_checkpoint, run
from tiny_run import image_folder, run_train, tiny_overrides

NAN_AFTER_STEP_2 = ["+callbacks.nan._target_=tiny_run.PoisonBatch", "+callbacks.nan.at_step=2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("save_when", [
    ["callbacks.model_checkpoint.every_n_train_steps=1"],
    ["callbacks.model_checkpoint.every_n_minutes=0"],
    ["trainer.val_check_interval=1"],
], ids=["every_n_train_steps", "every_n_minutes", "val_check_interval_1"])
def test_last_ckpt_is_saved_before_the_first_epoch_ends(images, tmp_path, one_thread, save_when):
    """A run that dies at step 3 of a 4-step epoch (a NaN loss here, a kill -9 alike) leaves last.ckpt at step 2."""
    output_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"not finite at step 3; .*last.ckpt holds step 2"):
        run(tiny_overrides(images, output_dir, 4) + save_when + NAN_AFTER_STEP_2)
    assert last_checkpoint(output_dir)["global_step"] == 2


def test_checkpoints_are_staged_beside_their_target_not_in_the_system_temp_folder(images, tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_system_temp_folder"))
    run(tiny_overrides(images, tmp_path / "run", 2))
    assert last_checkpoint(tmp_path / "run")["global_step"] == 2


def test_a_full_disk_at_last_ckpt_names_the_checkpoint_that_was_written(images, tmp_path, one_thread, monkeypatch):
    """At validation Lightning writes the best checkpoint, then last.ckpt: the disk fills between the two."""
    save, calls = torch.save, []

    def second_save_fails(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_save_fails)
    output_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"No space left on device.*step_0000002.ckpt holds step 2"):
        run(tiny_overrides(images, output_dir, 4) + ["trainer.val_check_interval=2"])
    assert load_checkpoint(output_dir / "checkpoints" / "step_0000002.ckpt")["global_step"] == 2


def snapshot(folder) -> dict:
    """Every file under `folder` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory):
    """A 2-step run through the command line, as a user leaves it."""
    output_dir = tmp_path_factory.mktemp("cli") / "run"
    run_train(tiny_overrides(images, output_dir, 2))
    return output_dir


def test_the_run_log_is_in_train_log_without_lightnings_tips(finished_run):
    log = (finished_run / "train.log").read_text()
    assert "Seed set to 42" in log and "GPU available" in log
    assert "litlogger" not in log and "was configured so 100% of the batches" not in log


def test_a_refused_command_changes_no_byte_of_the_run_folder(images, finished_run):
    before = snapshot(finished_run)
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "checkpoints/last.ckpt"} <= before.keys()
    fresh_start = run_train(tiny_overrides(images, finished_run, 3) + ["seed=7"], check=False)
    assert_one_line_error(fresh_start, "already holds a run's checkpoints")
    with open(finished_run / ".lock", "a+") as lock:  # the folder's lock held, as by a run in progress
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        live = run_train(tiny_overrides(images, finished_run, 3) + ["ckpt_path=auto"], check=False)
    assert_one_line_error(live, "is in use by another run")
    changed = run_train(tiny_overrides(images, finished_run, 3) + ["ckpt_path=auto", "seed=7"], check=False)
    assert_one_line_error(changed, "is another run: seed: 42 in the checkpoint, 7 here")
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("under", ["", "run"], ids=["a_file", "under_a_file"])
def test_an_output_dir_that_cannot_be_a_folder_is_one_line(images, tmp_path, under):
    (tmp_path / "file").write_text("keep me")
    result = run_train(tiny_overrides(images, tmp_path / "file" / under, 2), check=False)
    assert_one_line_error(result, "paths.output_dir=", "is a file")
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.fixture(scope="module")
def first_run(images, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("first")
    run(tiny_overrides(images, output_dir, 2))
    return output_dir / "checkpoints" / "last.ckpt"


def test_a_resume_with_another_process_is_one_line_naming_both(images, first_run, tmp_path):
    """The checkpoint of a DDPM run resumed as an EDM run (or, as the issue found it, the reverse)."""
    edm = [o for o in tiny_overrides(images, tmp_path / "edm", 3) if not o.startswith("schedule.")]
    with pytest.raises(ConfigError, match=r"is another run: .*process: diffusion_lab\.diffusion\.gaussian"
                                          r"\.GaussianDiffusion\(\.\.\.\) in the checkpoint, .*EDM.*\(\.\.\.\) here"
                                          r".*allow_changes=\[.*process"):
        run(["experiment=edm_fashion_mnist", *edm, f"ckpt_path={first_run}"])
    assert not (tmp_path / "edm" / ".hydra").exists()


def test_a_resume_with_another_batch_size_names_it_and_takes_it_when_allowed(images, first_run, tmp_path, one_thread):
    changed = tiny_overrides(images, tmp_path / "second", 3) + ["data.batch_size=4", f"ckpt_path={first_run}"]
    with pytest.raises(ConfigError, match=r"data.batch_size: 8 in the checkpoint, 4 here.*allow_changes=\[data.batch_size\]"):
        run(changed)
    run(changed + ["resume.allow_changes=[data.batch_size]"])
    assert last_checkpoint(tmp_path / "second")["global_step"] == 3


def test_allow_changes_takes_only_run_defining_keys(images, first_run, tmp_path):
    with pytest.raises(ConfigError, match="resume.allow_changes names trainer.max_steps, which is not a key a resume must keep"):
        run(tiny_overrides(images, tmp_path / "second", 3) + [f"ckpt_path={first_run}", "resume.allow_changes=[trainer.max_steps]"])


def test_an_autoencoder_checkpoint_as_ckpt_path_is_one_line_naming_the_module(images, first_run, tmp_path):
    checkpoint = torch.load(first_run, weights_only=True)
    checkpoint["config"]["module"] = {"_target_": "diffusion_lab.models.autoencoder_module.AutoencoderModule"}
    checkpoint["config"]["process"] = checkpoint["config"]["schedule"] = None
    torch.save(checkpoint, tmp_path / "autoencoder.ckpt")
    with pytest.raises(ConfigError, match=r"module: .*AutoencoderModule\(\.\.\.\) in the checkpoint, .*DiffusionModule\(\.\.\.\) here"):
        run(tiny_overrides(images, tmp_path / "run", 2) + [f"ckpt_path={tmp_path / 'autoencoder.ckpt'}"])


def test_an_autoencoder_checkpoint_as_teacher_ckpt_is_one_line_naming_the_module(first_run, tmp_path):
    from diffusion_lab.builders import load_model
    from diffusion_lab.models.teacher import load_teacher

    checkpoint = torch.load(first_run, weights_only=True)
    student = load_model(checkpoint, "ema", torch.device("cpu"))
    checkpoint["config"]["module"] = {"_target_": "diffusion_lab.models.autoencoder_module.AutoencoderModule"}
    del checkpoint["config"]["process"]  # as the autoencoder's run config holds none
    torch.save(checkpoint, tmp_path / "autoencoder.ckpt")
    with pytest.raises(ConfigError, match=re.escape(f"teacher_ckpt={tmp_path / 'autoencoder.ckpt'}: its saved config "
                                                    "has no process (module AutoencoderModule)")):
        load_teacher(str(tmp_path / "autoencoder.ckpt"), ("gaussian",), student, "progressive_distillation")


@pytest.mark.parametrize("override, words", [
    ("compile=maybe", "compile=maybe; give true or false"),
    ("seed=abc", "seed=abc; give an integer"),
    ("seed=1.5", "seed=1.5; give an integer"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0; give the number of batches"),
    ("trainer.max_steps=0", "trains nothing"),
    ("+trainer.foo=1", "trainer: Trainer.__init__() got an unexpected keyword argument 'foo'"),
])
def test_a_loose_train_option_is_one_line_and_writes_nothing(images, tmp_path, override, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        run(tiny_overrides(images, tmp_path / "run", 2) + [override])
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("overrides, words", [
    (["+foo=1"], ["+foo=1: nothing reads a top-level key 'foo'"]),
    (["debug=fast", "trainer=gpu"], ["debug=fast runs on the CPU", "trainer=gpu asks for GPUs"]),
], ids=["unknown_top_level_key", "debug_with_gpu_trainer"])
def test_a_loose_command_line_is_one_line(images, tmp_path, overrides, words):
    result = run_train(tiny_overrides(images, tmp_path / "run", 2) + overrides, check=False)
    assert_one_line_error(result, *words)


def test_a_signal_stops_sample_media_before_its_next_network_evaluation(images, tmp_path, monkeypatch, one_thread):
    """SIGTERM while the callback draws its grid at step 2: no further network evaluation, no media for step 2, and
    the run stops after that step with last.ckpt at it."""
    generate, evaluations = sample_media.generate, []

    def signal_then_generate(model, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        model.net.register_forward_pre_hook(lambda module, inputs: evaluations.append(1))
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(sample_media, "generate", signal_then_generate)
    media = [o for o in tiny_overrides(images, tmp_path / "run", 4) if o != "callbacks.sample_media=null"]
    with pytest.raises(SystemExit) as stop:
        run(media + ["callbacks.sample_media.every_n_steps=2", "callbacks.sample_media.num_samples=2"])
    assert stop.value.code == 128 + signal.SIGTERM
    assert evaluations == []
    assert not (tmp_path / "run" / "samples" / "step_0000002.png").exists()
    assert last_checkpoint(tmp_path / "run")["global_step"] == 2


def test_the_default_sample_media_grid_is_cheap():
    """The default run's grid: at most 16 samples x 50 steps of its DDPM sampler (not 64 x all 300)."""
    from hydra.utils import instantiate
    from types import SimpleNamespace

    from conftest import CONFIGS
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train.yaml", overrides=["paths.output_dir=unused"])
    callback = instantiate(cfg.callbacks.sample_media)
    sampler = callback.media_sampler(SimpleNamespace(run_config={"sampler": OmegaConf.to_container(cfg.sampler, resolve=True)}))
    assert cfg.sampler.steps == 300 and sampler.algorithm == cfg.sampler.algorithm
    assert callback.num_samples * sampler.evaluations <= 16 * 50
