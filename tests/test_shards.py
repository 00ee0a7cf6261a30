"""Data beyond memory: shards written by `diffusion_lab.data.prepare` hold a folder's images and labels; a stopped
prepare goes on where it stopped; `data=shards` under 2-rank DDP sees each sample once an epoch and resumes
exactly after SIGTERM mid-epoch; bad shards are one clear line; `data=folder` decodes lazily where told to."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning import Callback

from diffusion_lab.data import datasets, image_datamodule
from diffusion_lab.data.image_datamodule import ImageDataModule, ImageFileDataset, UInt8ImageDataset, held_out
from diffusion_lab.data.prepare import plan, prepare
from diffusion_lab.data.shards import META_FILE, ShardsDataModule
from diffusion_lab.config import CONFIG_DIR as CONFIGS
from diffusion_lab.utils.errors import ConfigError
from conftest import needs_fashion_mnist
from test_data import idx_pair
from test_errors import assert_one_line_error
from test_resume import assert_same_run, last_checkpoint, run
from tiny_run import ROOT, TRAIN_STEPS_PER_EPOCH, image_folder, run_train, tiny_overrides

FOLDER = ["data=folder", "data.image_size=8", "data.channels=1", "data.val_size=8"]  # tiny_run's folder


def prepare_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("prepare", overrides=overrides)


def shard_overrides(shards: Path, output_dir: Path, max_steps: int) -> list[str]:
    """tiny_run's shrunk default run, reading the shards of its folder."""
    tiny = tiny_overrides(Path("unused"), output_dir, max_steps)
    return [o for o in tiny if not o.startswith(("data=", "data.root=", "data.val_size="))] + [
        "data=shards", f"data.root={shards}"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round().to(torch.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    prepare(prepare_config([*FOLDER, f"data.root={folder}", f"out={out}", "num_workers=2"]))
    return out


def test_shards_of_a_folder_hold_its_images_and_labels(folder, shards):
    from_shards = ShardsDataModule(str(shards), image_size=8, channels=1, batch_size=8)
    from_shards.setup()
    from_folder = ImageDataModule("folder", str(folder), image_size=8, channels=1, batch_size=8, val_size=8)
    from_folder.setup()
    assert len(from_shards.train_set) == len(from_folder.train_set) == 32
    for index in range(32):  # the same images in the same (held-out permutation's) order
        image, label = from_shards.train_set[index]
        expected_image, expected_label = from_folder.train_set[index]
        assert torch.equal(image, expected_image) and label == expected_label
    assert torch.equal(from_shards.train_set.images, from_folder.train_set.images)
    assert torch.equal(from_shards.val_set.images, from_folder.val_set.images)
    assert torch.equal(from_shards.val_set.labels, from_folder.val_set.labels)
    assert torch.equal(from_shards.test_set.images, from_folder.val_set.images)  # a folder has no test split
    assert from_shards.meta["classes"] == ["class0", "class1"]


def test_a_url_root_reads_the_same_shards_through_litdatas_downloader(shards, tmp_path):
    local = ShardsDataModule(str(shards), image_size=8, channels=1)
    remote = ShardsDataModule(f"local:{shards}", image_size=8, channels=1, cache_dir=str(tmp_path / "cache"))
    local.setup("fit")
    remote.setup("fit")
    assert torch.equal(remote.train_set.images, local.train_set.images)
    assert torch.equal(remote.val_set.labels, local.val_set.labels)


def test_an_array_data_set_is_resized_and_keeps_its_own_test_split(tmp_path):
    idx_pair(tmp_path / "raw", 20, train=True, gz=False)
    test_images, test_labels = idx_pair(tmp_path / "raw", 6, train=False, gz=False, seed=1)
    prepare(prepare_config(["data=fashion_mnist", f"data.root={tmp_path / 'raw'}", "data.image_size=16",
                            "data.val_size=4", f"out={tmp_path / 'out'}", "num_workers=1"]))
    data = ShardsDataModule(str(tmp_path / "out"), image_size=16, channels=1)
    data.setup()
    assert data.meta["splits"] == {"train": 16, "val": 4, "test": 6}
    expected = datasets.resize_crop(torch.from_numpy(test_images).unsqueeze(1).to(torch.uint8), 16)
    assert torch.equal(data.test_set.images, expected)
    assert data.test_set.labels.tolist() == test_labels.tolist()


def test_a_stopped_prepare_goes_on_from_its_last_chunk(folder, shards, tmp_path):
    source = shutil.copytree(folder, tmp_path / "images")
    _, train = held_out(40, 8)
    broken = sorted(source.rglob("*.png"))[train[20]]  # the 21st training image: 4 chunks of 5 are written before
    good = broken.read_bytes()
    broken.write_bytes(b"not a png")
    config = prepare_config([*FOLDER, f"data.root={source}", f"out={tmp_path / 'out'}", "num_workers=1",
                             "chunk_bytes=400"])
    with pytest.raises(ConfigError, match=f"writing the train split stopped: .*{broken.name}.*run the same command"):
        prepare(config)
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "train").glob("chunk-*.bin")}
    assert written  # chunks finished before the bad file
    broken.write_bytes(good)
    prepare(config)
    assert {name: (tmp_path / "out" / "train" / name).stat().st_mtime_ns for name in written} == written
    resumed = ShardsDataModule(str(tmp_path / "out"), image_size=8, channels=1)
    resumed.setup("fit")
    straight = ShardsDataModule(str(shards), image_size=8, channels=1)
    straight.setup("fit")
    assert torch.equal(resumed.train_set.images, straight.train_set.images)
    assert torch.equal(resumed.train_set.labels, straight.train_set.labels)
    assert torch.equal(resumed.val_set.images, straight.val_set.images)


def test_bad_shards_are_one_clear_error(shards, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no prepared shards.*diffusion_lab.data.prepare"):
        ShardsDataModule(str(tmp_path / "empty"), image_size=8, channels=1)
    meta = json.loads((shards / META_FILE).read_text())
    for name, change, message in [("old", {"format_version": 0}, "format version 0, but this code reads version 1"),
                                  ("partial", {"complete": False}, "only partly prepared")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / META_FILE).write_text(json.dumps(meta | change))
        with pytest.raises(ConfigError, match=message):
            ShardsDataModule(str(tmp_path / name), image_size=8, channels=1)
    with pytest.raises(ConfigError, match="holds 8x8x1 images, but data.image_size=16"):
        ShardsDataModule(str(shards), image_size=16, channels=1)


def test_a_split_too_large_to_hold_decoded_is_one_clear_error(folder, shards, monkeypatch):
    monkeypatch.setattr(image_datamodule, "DECODE_LIMIT_BYTES", 1000)  # 8 images of 8x8 fit, 32 do not
    lazy = ImageDataModule("folder", str(folder), 8, 1, val_size=8, in_memory_limit_mb=0)
    streamed = ShardsDataModule(str(shards), image_size=8, channels=1)
    for data in (lazy, streamed):
        data.setup("fit")
        assert len(data.val_set.images) == 8
        with pytest.raises(ConfigError, match="a split of 32 images .* compare against metrics.real_split=val"):
            data.train_set.images


@needs_fashion_mnist
def test_prepared_json_names_the_folder_fashion_mnist_was_read_from(tmp_path):
    settings, _ = plan(prepare_config(["data=fashion_mnist", f"data.root={tmp_path}", f"out={tmp_path / 'out'}"]).data)
    assert settings["source"] == {"dataset": "fashion_mnist", "root": str(datasets.DEBIAN_FASHION_MNIST.resolve())}


def test_prepare_sizes_its_workers_to_the_cores_and_drops_litdatas_advertisement(folder, tmp_path, capfd):
    meta = prepare(prepare_config([*FOLDER, f"data.root={folder}", f"out={tmp_path / 'out'}"]))
    assert meta["num_workers"] == len(os.sched_getaffinity(0))
    out = capfd.readouterr().out
    assert "train: 32 images" in out and "lightning.ai" not in out


def test_damaged_shards_are_one_clear_error(shards, tmp_path):
    from test_bad_inputs import damaged_copies

    damaged_copies(shutil.copytree(shards, tmp_path / "shards"))
    for name, message in [("flipped", "cannot be decoded"), ("cut_short", "holds .* of its .* bytes"),
                          ("garbage_index", "index.json is unreadable")]:
        data = ShardsDataModule(str(tmp_path / f"shards_{name}"), image_size=8, channels=1)
        with pytest.raises(ConfigError, match=message):
            data.setup("fit")


def test_mixed_image_sizes_with_no_resize_are_one_line_from_the_cli(tmp_path):
    from PIL import Image

    for name, size in [("a.png", (8, 8)), ("b.png", (12, 10))]:
        Image.new("L", size).save(tmp_path / name)
    result = run_script_module(["data=folder", f"data.root={tmp_path}", "data.image_size=null", "data.channels=1",
                                f"out={tmp_path / 'out'}"])
    assert_one_line_error(result, "not all of one square size", "12x10", "set data.image_size=N")
    assert not (tmp_path / "out").exists()


def run_script_module(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m diffusion_lab.data.prepare ARGS` from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "diffusion_lab.data.prepare", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


class SeenProbe(Callback):
    """Each rank writes `<dirpath>/rank<r>.pt`: the epoch and uint8 images of every training batch it took."""

    def __init__(self, dirpath: str):
        self.dirpath, self.epochs, self.images = Path(dirpath), [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.epochs.append(trainer.current_epoch)
        self.images.append(to_uint8(batch[0].detach().cpu()))

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save({"epochs": self.epochs, "images": torch.stack(self.images)},
                   self.dirpath / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_two_rank_ddp_over_shards_sees_each_sample_once_an_epoch(shards, tmp_path):
    epochs, probe_dir = 2, tmp_path / "probe"
    steps = epochs * TRAIN_STEPS_PER_EPOCH // 2  # each rank takes half of every epoch's batches
    run_train(shard_overrides(shards, tmp_path / "run", steps) + [
        "data.random_flip=false", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.sync_batchnorm=false", "+callbacks.probe._target_=test_shards.SeenProbe",
        f"+callbacks.probe.dirpath={probe_dir}"])
    ranks = [torch.load(probe_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    data = ShardsDataModule(str(shards), image_size=8, channels=1)
    data.setup("fit")
    everything = sorted(bytes(image.numpy()) for image in data.train_set.images)
    orders = []
    for epoch in range(epochs):
        seen = [torch.cat([b for e, b in zip(rank["epochs"], rank["images"]) if e == epoch]) for rank in ranks]
        assert len(seen[0]) == len(seen[1]) == 16
        assert sorted(bytes(image.numpy()) for image in torch.cat(seen)) == everything  # each sample exactly once
        orders.append(torch.cat(seen))
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    """The last checkpoint of a run on the shards never interrupted, by loader workers (computed once each)."""
    runs = {}

    def get(num_workers: int, steps: int) -> dict:
        if (num_workers, steps) not in runs:
            output_dir = tmp_path_factory.mktemp(f"straight_{num_workers}")
            run(shard_overrides(shards, output_dir, steps) + [f"data.num_workers={num_workers}"])
            runs[num_workers, steps] = last_checkpoint(output_dir)
        return runs[num_workers, steps]

    return get


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_mid_epoch_on_shards_then_resume_matches_an_uninterrupted_run(shards, uninterrupted, tmp_path,
                                                                             one_thread, num_workers):
    steps, interrupt_at = 2 * TRAIN_STEPS_PER_EPOCH + 2, TRAIN_STEPS_PER_EPOCH + 1  # stopped and ended mid-epoch
    overrides = shard_overrides(shards, tmp_path / "run", steps) + [f"data.num_workers={num_workers}",
                                                                   "ckpt_path=auto"]
    with pytest.raises(SystemExit):
        run(overrides + ["+callbacks.sigterm._target_=tiny_run.SendSignal",
                         f"+callbacks.sigterm.at_step={interrupt_at}"])
    assert last_checkpoint(tmp_path / "run")["global_step"] == interrupt_at
    run(overrides)
    assert_same_run(uninterrupted(num_workers, steps), last_checkpoint(tmp_path / "run"))


def test_training_on_from_an_epoch_boundary_matches_an_uninterrupted_run(shards, uninterrupted, tmp_path, one_thread):
    steps = 2 * TRAIN_STEPS_PER_EPOCH + 2
    run(shard_overrides(shards, tmp_path / "run", TRAIN_STEPS_PER_EPOCH))  # ends with the first epoch's last batch
    run(shard_overrides(shards, tmp_path / "run", steps) + ["ckpt_path=auto"])
    assert_same_run(uninterrupted(0, steps), last_checkpoint(tmp_path / "run"))


def test_training_on_local_shards_says_nothing_of_a_download_cache(shards, tmp_path, caplog, one_thread):
    """litdata logs "max_cache_size is unset; using 27 GB ..." for shards it reads in place, with no cache at all."""
    with caplog.at_level(logging.INFO):
        run(shard_overrides(shards, tmp_path / "run", 1))
    assert "litdata" in caplog.text and "max_cache_size" not in caplog.text


def test_a_large_folder_decodes_lazily_in_workers_and_loads_as_in_memory(folder, monkeypatch):
    decoded = []
    load_image = datasets.load_image
    monkeypatch.setattr(datasets, "load_image", lambda *args: decoded.append(args[0]) or load_image(*args))
    lazy = ImageDataModule("folder", str(folder), 8, 1, batch_size=8, val_size=8, num_workers=2, in_memory_limit_mb=0)
    lazy.setup("fit")
    assert isinstance(lazy.train_set, ImageFileDataset) and not decoded  # nothing decoded up front
    in_memory = ImageDataModule("folder", str(folder), 8, 1, batch_size=8, val_size=8)  # 2.5 KB: in memory
    in_memory.setup("fit")
    assert isinstance(in_memory.train_set, UInt8ImageDataset)
    assert torch.equal(lazy.val_set.images, in_memory.val_set.images)
    expected = [batch for batch, _ in in_memory.train_dataloader()]
    stopped = lazy.train_dataloader()
    batches = iter(stopped)
    taken = [next(batches)[0] for _ in range(2)]  # then stopped: a new loader goes on from the stopped one's state
    resumed = lazy.train_dataloader()
    resumed.load_state_dict(stopped.state_dict())
    rest = [batch for batch, _ in resumed]
    assert all(torch.equal(a, b) for a, b in zip(taken + rest, expected, strict=True))
