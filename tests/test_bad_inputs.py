"""Bad input to each program (train.py, sample.py, `python -m diffusion_lab.data.prepare`, `python -m
diffusion_lab.metrics`) ends with the expected exit code and one line holding the expected words, never a
traceback; and no refused command changes a byte of the folders that already hold results.

Each row runs as its own process (tests/cli_forks.py forks them from one interpreter that imported torch once, two
at a time): the whole table costs about as much as a few fresh `python sample.py` starts."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_evaluation import tiny_checkpoint
from tiny_run import image_folder

from diffusion_lab.metrics.extractors import SHIPPED_CLASSIFIERS


CKPT = ROOT / "tests" / "fixtures" / "ddpm_v1.ckpt"  # unconditional DDPM on 8x8x1 images of data=folder
CONFIG_ERROR, HYDRA_ERROR = 2, 1  # exit codes: one_line_errors' `error: ...`, Hydra's own override errors
SAMPLE = ["ckpt_path={ckpt}", "num_samples=2", "batch_size=2", "sampler.steps=2", "trajectory_samples=1"]
TINY_TRAIN = ["data=folder", "data.root={ws}/folder", "data.image_size=8", "data.channels=1", "data.val_size=8",
              "data.batch_size=8", "model.dim=8", "model.dim_mults=[1,2]", "model.attn_heads=1", "model.attn_dim_head=8",
              "schedule.timesteps=20", "logger=csv", "trainer.accelerator=cpu", "trainer.max_steps=1",
              "paths.output_dir={ws}/train/{id}"]
PREPARE = ["data=folder", "data.root={ws}/folder", "data.image_size=8", "data.channels=1", "data.val_size=8",
           "num_workers=1"]
METRICS = "-m diffusion_lab.metrics"
PREPARE_CMD = "-m diffusion_lab.data.prepare"

# id, program, arguments ({ws}: the shared workspace, {ckpt}: the fixture checkpoint), exit code, words of the line
CASES = [
    # sample.py: the checkpoint
    ("ckpt-missing", "sample.py", ["ckpt_path={ws}/missing.ckpt", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["missing.ckpt does not exist"]),
    ("ckpt-absent", "sample.py", ["output_dir={ws}/s/{id}"], CONFIG_ERROR, ["ckpt_path"]),
    ("ckpt-text", "sample.py", ["ckpt_path={ws}/text.txt", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["not a readable checkpoint"]),
    ("ckpt-no-model", "sample.py", [*SAMPLE, "ckpt_path={ws}/no_model.ckpt", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["saved config has no model"]),
    # sample.py: options
    ("clip-maybe", "sample.py", [*SAMPLE, "clip_denoised=maybe", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["clip_denoised=maybe", "true, false or null"]),
    ("eta-negative", "sample.py", [*SAMPLE, "sampler=ddim", "sampler.eta=-1", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["sampler.eta=-1", ">= 0"]),
    ("eta-on-ddpm", "sample.py", [*SAMPLE, "+sampler.eta=0.5", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["sampler.eta is not an option of sampler ddpm", "steps, spacing, variance"]),
    ("sampler-typo-key", "sample.py", [*SAMPLE, "+sampler.stepz=3", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["sampler.stepz", "steps, spacing, variance"]),
    ("sampler-unknown", "sample.py", [*SAMPLE, "sampler=nope", "output_dir={ws}/s/{id}"], HYDRA_ERROR,
     ["Could not find 'sampler/nope'"]),
    ("sampler-steps-0", "sample.py", [*SAMPLE, "sampler.steps=0", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["sampler.steps=0"]),
    ("sampler-spacing", "sample.py", [*SAMPLE, "sampler.spacing=wobbly", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["sampler.spacing='wobbly'", "uniform"]),
    ("consistency-on-ddpm", "sample.py", [*SAMPLE, "sampler=consistency", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["sampler=consistency", "process=consistency", "GaussianDiffusion"]),
    ("labels-word", "sample.py", [*SAMPLE, "class_labels=[shirt]", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["class_labels=['shirt']", "class indices"]),
    ("labels-scalar", "sample.py", [*SAMPLE, "class_labels=3", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["class_labels=3", "class indices"]),
    ("labels-unconditional", "sample.py", [*SAMPLE, "class_labels=[1]", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["class-conditional checkpoint"]),
    ("guidance-unconditional", "sample.py", [*SAMPLE, "guidance_scale=3", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["class-conditional checkpoint", "guide_ckpt"]),
    ("guide-other-classes", "sample.py", [*SAMPLE, "guide_ckpt={ws}/two_classes.ckpt", "guidance_scale=2",
                                          "output_dir={ws}/s/{id}"], CONFIG_ERROR, ["guide differs", "classes"]),
    ("guide-missing", "sample.py", [*SAMPLE, "guide_ckpt={ws}/missing.ckpt", "guidance_scale=2",
                                    "output_dir={ws}/s/{id}"], CONFIG_ERROR, ["missing.ckpt does not exist"]),
    ("guide-without-scale", "sample.py", [*SAMPLE, "guide_ckpt={ckpt}", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["guidance_scale=1 is none"]),
    ("interval-outside-grid", "sample.py", [*SAMPLE, "ckpt_path={ws}/two_classes.ckpt", "guidance_scale=2",
                                            "guidance_interval=[1000,2000]", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["guidance_interval=[1000, 2000] holds none of the noise levels"]),
    ("interval-reversed", "sample.py", [*SAMPLE, "ckpt_path={ws}/two_classes.ckpt", "guidance_scale=2",
                                        "guidance_interval=[3,1]", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["0 <= s_lo < s_hi"]),
    ("interval-word", "sample.py", [*SAMPLE, "ckpt_path={ws}/two_classes.ckpt", "guidance_scale=2",
                                    "guidance_interval=[low,1]", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["guidance_interval=", "[s_lo,s_hi]"]),
    ("labels-beyond-folder-classes", "sample.py", [*SAMPLE, "ckpt_path={ws}/two_classes.ckpt", "class_labels=[7]",
                                                   "output_dir={ws}/s/{id}"], CONFIG_ERROR, ["2 classes", "0..1"]),
    ("unknown-key", "sample.py", [*SAMPLE, "+foo=1", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["foo is not an option of sample.py"]),
    ("num-samples-0", "sample.py", [*SAMPLE, "num_samples=0", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["num_samples=0", ">= 1"]),
    ("batch-size-word", "sample.py", [*SAMPLE, "batch_size=abc", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["batch_size=abc", "integer"]),
    ("chunk-size-negative", "sample.py", [*SAMPLE, "chunk_size=-5", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["chunk_size=-5"]),
    ("weights-unknown", "sample.py", [*SAMPLE, "weights=best", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["weights='best'", "ema, raw"]),
    ("figures-unknown", "sample.py", [*SAMPLE, "figures=[backward]", "output_dir={ws}/s/{id}"], CONFIG_ERROR,
     ["figures=['backward']", "forward"]),
    ("metrics-unknown", "sample.py", [*SAMPLE, "metrics=[fjd]", "output_dir={ws}/s/{id}"], HYDRA_ERROR,
     ["Could not load 'metrics/fjd'"]),
    ("fid-one-sample", "sample.py", [*SAMPLE, "metrics=[fid]", "num_samples=1", "output_dir={ws}/s/{id}"],
     CONFIG_ERROR, ["num_samples=1", "metrics=[fid]", "at least 2"]),
    ("prec-recall-three", "sample.py", [*SAMPLE, "metrics=[prec_recall]", "num_samples=3", "output_dir={ws}/s/{id}"],
     CONFIG_ERROR, ["num_samples=3", "metrics=[prec_recall]", "at least 4"]),
    ("is-fewer-than-splits", "sample.py", [*SAMPLE, "metrics=[is]", "num_samples=3", "output_dir={ws}/s/{id}"],
     CONFIG_ERROR, ["num_samples=3", "metrics.is.splits=10"]),
    # sample.py: the output folder
    ("out-is-file", "sample.py", [*SAMPLE, "output_dir={ws}/a_file"], CONFIG_ERROR, ["a_file is a file"]),
    ("out-under-file", "sample.py", [*SAMPLE, "output_dir={ws}/a_file/samples"], CONFIG_ERROR,
     ["cannot be a folder", "a_file is a file"]),
    ("out-read-only", "sample.py", [*SAMPLE, "output_dir={read_only}/samples"], CONFIG_ERROR, ["cannot be written"]),
    ("done-other-seed", "sample.py", [*SAMPLE, "seed=1", "output_dir={ws}/done"], CONFIG_ERROR,
     ["holds the samples of other arguments", "seed: 0 there, 1 here"]),
    ("done-other-checkpoint", "sample.py", [*SAMPLE, "ckpt_path={ws}/two_classes.ckpt", "output_dir={ws}/done"],
     CONFIG_ERROR, ["other arguments", "checkpoint"]),
    ("done-other-count", "sample.py", [*SAMPLE, "num_samples=3", "output_dir={ws}/done"], CONFIG_ERROR,
     ["other arguments", "num_samples: 2 there, 3 here"]),
    ("done-other-sampler", "sample.py", [*SAMPLE, "sampler=ddim", "output_dir={ws}/done"], CONFIG_ERROR,
     ["other arguments", "sampler: ddpm"]),
    ("samples-without-record", "sample.py", [*SAMPLE, "output_dir={ws}/foreign"], CONFIG_ERROR,
     ["already holds a samples.npz", "run.json"]),
    # the metrics command
    ("metrics-usage", METRICS, [], CONFIG_ERROR, ["usage"]),
    ("metrics-no-data", METRICS, ["{ws}/two.npz"], CONFIG_ERROR, ["data=NAME is needed"]),
    ("metrics-data-unknown", METRICS, ["{ws}/two.npz", "data=nope"], CONFIG_ERROR,
     ["Could not find 'data/nope'", "cifar10 fashion_mnist folder"]),
    ("metrics-bad-override", METRICS, ["{ws}/two.npz", "data=fashion_mnist", "metrics.nope=1"], CONFIG_ERROR,
     ["metrics.nope"]),
    ("metrics-samples-missing", METRICS, ["{ws}/missing.npz", "data=fashion_mnist"], CONFIG_ERROR,
     ["missing.npz does not exist"]),
    ("metrics-samples-text", METRICS, ["{ws}/text.txt", "data=fashion_mnist"], CONFIG_ERROR, ["not an npz file"]),
    ("metrics-no-arr0", METRICS, ["{ws}/no_arr0.npz", "data=fashion_mnist"], CONFIG_ERROR, ["no array arr_0"]),
    ("metrics-one-sample", METRICS, ["{ws}/one.npz", "data=fashion_mnist"], CONFIG_ERROR,
     ["one.npz holds 1 sample(s)", "metrics=[fid]", "at least 2"]),
    ("metrics-wrong-shape", METRICS, ["{ws}/two.npz", "data=cifar10"], CONFIG_ERROR, ["needs uint8 (N, 32, 32, 3)"]),
    ("metrics-float-samples", METRICS, ["{ws}/float.npz", "data=fashion_mnist"], CONFIG_ERROR, ["float32"]),
    ("metrics-ref-text", METRICS, ["{ws}/two.npz", "data=fashion_mnist", "ref={ws}/text.txt"], CONFIG_ERROR,
     ["text.txt is not an npz file"]),
    ("metrics-ref-missing", METRICS, ["{ws}/two.npz", "data=fashion_mnist", "ref={ws}/missing.npz"], CONFIG_ERROR,
     ["ref=", "does not exist"]),
    ("metrics-ref-not-stats", METRICS, ["{ws}/two.npz", "data=fashion_mnist", "ref={ws}/two.npz"], CONFIG_ERROR,
     ["no array mu"]),
    ("metrics-ref-and-write-ref", METRICS, ["{ws}/two.npz", "data=fashion_mnist", "ref={ws}/two.npz",
                                            "write_ref={ws}/stats.npz"], CONFIG_ERROR, ["ref=", "write_ref=", "one"]),
    ("metrics-ref-with-kid", METRICS, ["{ws}/two.npz", "data=fashion_mnist", "metrics=[fid,kid]", "ref={ws}/two.npz"],
     CONFIG_ERROR, ["drop kid"]),
    ("metrics-extractor-unknown", METRICS, ["{ws}/two.npz", "data=fashion_mnist", "metrics.extractor=vgg"],
     CONFIG_ERROR, ["metrics.extractor='vgg'"]),
    ("metrics-real-split", METRICS, ["{ws}/two.npz", "data=fashion_mnist", "metrics.real_split=holdout"],
     CONFIG_ERROR, ["metrics.real_split='holdout'"]),
    ("metrics-shards-no-classifier", METRICS, ["{ws}/two.npz", "data=shards", "data.root={ws}/shards",
                                               "data.image_size=28", "data.channels=1"], CONFIG_ERROR,
     ["no classifier ships for data=shards data.root=", "experiment=feature_classifier data=shards data.root="]),
    ("metrics-shards-missing", METRICS, ["{ws}/two.npz", "data=shards", "data.root={ws}/nowhere", "data.image_size=28",
                                         "data.channels=1", "metrics.extractor=classifier",
                                         f"metrics.classifier_path={SHIPPED_CLASSIFIERS['fashion_mnist']}"],
     CONFIG_ERROR, ["holds no prepared shards"]),
    # the prepare command
    ("prepare-out-absent", PREPARE_CMD, PREPARE, CONFIG_ERROR, ["out"]),
    ("prepare-out-is-file", PREPARE_CMD, [*PREPARE, "out={ws}/a_file"], CONFIG_ERROR, ["a_file is a file"]),
    ("prepare-out-under-file", PREPARE_CMD, [*PREPARE, "out={ws}/a_file/shards"], CONFIG_ERROR,
     ["cannot be a folder", "a_file is a file"]),
    ("prepare-out-read-only", PREPARE_CMD, [*PREPARE, "out={read_only}/shards"], CONFIG_ERROR, ["cannot be written"]),
    ("prepare-out-url", PREPARE_CMD, [*PREPARE, "out=s3://bucket/shards"], CONFIG_ERROR, ["local folder"]),
    ("prepare-out-not-empty", PREPARE_CMD, [*PREPARE, "out={ws}/done"], CONFIG_ERROR, ["not empty"]),
    ("prepare-out-other-settings", PREPARE_CMD, [*PREPARE, "data.image_size=4", "out={ws}/shards"], CONFIG_ERROR,
     ["other settings", "image_shape"]),
    ("prepare-source-missing", PREPARE_CMD, [*PREPARE, "data.root={ws}/nowhere", "out={ws}/p/{id}"], CONFIG_ERROR,
     ["holds no images"]),
    ("prepare-data-shards", PREPARE_CMD, ["data=shards", "data.root={ws}/shards", "out={ws}/p/{id}"], CONFIG_ERROR,
     ["cannot be prepared"]),
    ("prepare-workers-0", PREPARE_CMD, [*PREPARE, "num_workers=0", "out={ws}/p/{id}"], CONFIG_ERROR,
     ["num_workers=0"]),
    ("prepare-channels-2", PREPARE_CMD, [*PREPARE, "data.channels=2", "out={ws}/p/{id}"], CONFIG_ERROR,
     ["data.channels=2"]),
    ("prepare-val-size", PREPARE_CMD, [*PREPARE, "data.val_size=100", "out={ws}/p/{id}"], CONFIG_ERROR,
     ["data.val_size=100"]),
    # train.py
    ("train-batch-size-0", "train.py", [*TINY_TRAIN, "data.batch_size=0"], CONFIG_ERROR, ["data.batch_size=0"]),
    ("train-ema-decay-and-sigma-rel", "train.py", [*TINY_TRAIN, "callbacks.ema.sigma_rel=0.05"], CONFIG_ERROR,
     ["decay=0.9999, sigma_rel=0.05", "set the other to null"]),
    ("train-ema-sigma-rel-range", "train.py", [*TINY_TRAIN, "callbacks.ema.decay=null", "callbacks.ema.sigma_rel=0.4"],
     CONFIG_ERROR, ["callbacks.ema.sigma_rel=0.4 must be in"]),
    ("train-model-unknown", "train.py", [*TINY_TRAIN, "model=nope"], HYDRA_ERROR, ["Could not find 'model/nope'"]),
    ("train-timesteps-0", "train.py", [*TINY_TRAIN, "schedule.timesteps=0"], CONFIG_ERROR, ["schedule.timesteps=0"]),
    ("train-folder-missing", "train.py", [*TINY_TRAIN, "data.root={ws}/nowhere"], CONFIG_ERROR, ["holds no images"]),
    ("train-shards-missing", "train.py", [*TINY_TRAIN, "data=shards", "data.root={ws}/nowhere"], CONFIG_ERROR,
     ["holds no prepared shards"]),
    ("train-shards-flipped-bytes", "train.py", [*TINY_TRAIN, "data=shards", "data.root={ws}/shards_flipped"],
     CONFIG_ERROR, ["shards_flipped/val cannot be decoded", "damaged"]),
    ("train-shards-garbage-index", "train.py", [*TINY_TRAIN, "data=shards", "data.root={ws}/shards_garbage_index"],
     CONFIG_ERROR, ["index.json is unreadable"]),
    ("train-shards-cut-short", "train.py", [*TINY_TRAIN, "data=shards", "data.root={ws}/shards_cut_short"],
     CONFIG_ERROR, ["chunk-0-0.bin holds", "cut short"]),
    ("train-shards-train-flipped-in-workers", "train.py", [*TINY_TRAIN, "data=shards", "data.num_workers=2",
     "data.root={ws}/shards_train_flipped"], CONFIG_ERROR, ["shards_train_flipped/train cannot be decoded", "damaged",
                                                            "python -m diffusion_lab.data.prepare"]),
    ("train-shards-train-header", "train.py", [*TINY_TRAIN, "data=shards", "data.root={ws}/shards_train_header"],
     CONFIG_ERROR, ["shards_train_header/train cannot be decoded", "header", "python -m diffusion_lab.data.prepare"]),
    ("train-ckpt-missing", "train.py", [*TINY_TRAIN, "ckpt_path={ws}/missing.ckpt"], CONFIG_ERROR,
     ["missing.ckpt"]),
]
KEPT = ("done", "foreign", "shards", "two_classes.ckpt")  # what already holds results: no refused command changes it


def run_programs(cases: list[tuple[str, list[str]]]) -> list[dict]:
    """`python PROGRAM ARGS` of each case through tests/cli_forks.py (warnings off, W&B offline)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_forks.py")], cwd=ROOT, env=env, text=True,
                            input=json.dumps([{"program": program, "args": args} for program, args in cases]),
                            capture_output=True, check=True)
    return json.loads(result.stdout)


def fingerprint(paths: list[Path]) -> dict[str, str]:
    """The sha256 of every file under `paths` (and the names of the folders), by path."""
    found = {}
    for path in paths:
        for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
            found[str(item)] = hashlib.sha256(item.read_bytes()).hexdigest() if item.is_file() else "folder"
    return found


def workspace(ws: Path) -> dict[str, str]:
    """The files the table reads; returns the placeholders of its arguments."""
    image_folder(ws / "folder")
    (ws / "text.txt").write_text("not a checkpoint, not an npz\n")
    (ws / "a_file").write_text("a file where a folder belongs\n")
    rng = np.random.default_rng(0)
    np.savez(ws / "two.npz", rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8))
    np.savez(ws / "one.npz", rng.integers(0, 256, (1, 28, 28, 1), dtype=np.uint8))
    np.savez(ws / "float.npz", rng.random((2, 28, 28, 1), dtype=np.float32))
    np.savez(ws / "no_arr0.npz", images=rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8))
    checkpoint = torch.load(CKPT, weights_only=True)
    torch.save({**checkpoint, "config": {k: v for k, v in checkpoint["config"].items() if k != "model"}},
               ws / "no_model.ckpt")
    _, two_classes = tiny_checkpoint(ws, ["data.conditional=true"], ["data=folder", f"data.root={ws / 'folder'}",
                                                                    "data.image_size=8", "data.channels=1"])
    os.replace(two_classes, ws / "two_classes.ckpt")
    (ws / "foreign").mkdir()
    np.savez(ws / "foreign" / "samples.npz", rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8))
    read_only = ws / "read_only"
    read_only.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes through any mode bits: a folder the kernel refuses instead
        read_only = Path("/sys")
    return {"ws": str(ws), "ckpt": str(CKPT), "read_only": str(read_only)}


def damaged_copies(shards: Path) -> None:
    """Copies of the shards with the validation split's first chunk damaged: bytes flipped, cut short, and its
    index.json garbage; and with the training split's (read only while training, in loader workers or not) flipped
    after its first third, and flipped every 97th byte from the first (its header)."""
    for name in ("flipped", "cut_short", "garbage_index", "train_flipped", "train_header"):
        shutil.copytree(shards, shards.with_name(f"shards_{name}"))
    for name, split in (("flipped", "val"), ("train_flipped", "train")):
        chunk = shards.with_name(f"shards_{name}") / split / "chunk-0-0.bin"
        data = chunk.read_bytes()
        chunk.write_bytes(data[: len(data) // 3] + bytes(255 - byte for byte in data[len(data) // 3 :]))
    chunk = shards.with_name("shards_train_header") / "train" / "chunk-0-0.bin"
    chunk.write_bytes(bytes(255 - byte if i % 97 == 0 else byte for i, byte in enumerate(chunk.read_bytes())))
    chunk = shards.with_name("shards_cut_short") / "val" / "chunk-0-0.bin"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    (shards.with_name("shards_garbage_index") / "val" / "index.json").write_text('{"chunks": [')


@pytest.fixture(scope="session")
def table(tmp_path_factory):
    """Every case run once: {id: result}, and the fingerprints of KEPT before and after the table."""
    ws = tmp_path_factory.mktemp("bad_inputs")
    places = workspace(ws)
    made = run_programs([("sample.py", [a.format(**places) for a in [*SAMPLE, f"output_dir={ws / 'done'}"]]),
                         (PREPARE_CMD, [a.format(**places) for a in [*PREPARE, f"out={ws / 'shards'}"]])])
    assert [r["returncode"] for r in made] == [0, 0], made
    damaged_copies(ws / "shards")
    kept = [ws / name for name in KEPT]
    before = fingerprint(kept)
    results = run_programs([(program, [a.format(id=case_id, **places) for a in args])
                            for case_id, program, args, _, _ in CASES])
    return dict(zip((case[0] for case in CASES), results)), before, fingerprint(kept)


def test_the_table_has_sixty_cases_over_the_four_programs():
    assert len(CASES) >= 60 and len({case[0] for case in CASES}) == len(CASES)
    assert {case[1] for case in CASES} == {"sample.py", "train.py", METRICS, PREPARE_CMD}


@pytest.mark.parametrize("case_id, program, args, code, words", CASES, ids=[case[0] for case in CASES])
def test_bad_input_ends_in_one_clear_line(table, case_id, program, args, code, words):
    result = table[0][case_id]
    stderr = result["stderr"]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert result["returncode"] == code, (result["returncode"], stderr[-3000:])
    if code == CONFIG_ERROR:
        lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, stderr[-3000:]
    else:  # Hydra's own error: its first line says what is wrong
        lines = stderr.strip().splitlines()[:1]
    for word in words:
        assert word in lines[0], lines[0]


def test_no_refused_command_changes_a_byte_of_existing_results(table):
    _, before, after = table
    assert any(path.endswith("samples.npz") for path in before) and any(path.endswith("index.json") for path in before)
    assert after == before
