"""Data: the IDX reader, Fashion-MNIST's sources in order, MNIST / CIFAR-10 in torchvision's layout, folders, errors."""

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import needs_fashion_mnist
from diffusion_lab.data import datasets
from diffusion_lab.data.image_datamodule import EpochShuffleSampler, ImageDataModule, ResumableLoader
from diffusion_lab.utils.errors import ConfigError


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def idx_pair(folder, n: int, train: bool, gz: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    stems = datasets.IDX_FILES[train]
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / stems[0], images, gz)
    write_idx(folder / stems[1], labels, gz)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files_from_root_first(tmp_path, gz):
    images, labels = idx_pair(tmp_path, 12, train=True, gz=gz)
    x, y = datasets.fashion_mnist(str(tmp_path), train=True)
    assert x.dtype == torch.uint8 and x.shape == (12, 1, 28, 28)
    assert np.array_equal(x[:, 0].numpy(), images) and np.array_equal(y.numpy(), labels)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    idx_pair(tmp_path, 4, train=True, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="truncated"):
        datasets.fashion_mnist(str(tmp_path), train=True)


@needs_fashion_mnist
def test_fashion_mnist_falls_back_to_the_debian_package(tmp_path):
    x, y = datasets.fashion_mnist(str(tmp_path / "empty"), train=False)
    assert x.shape == (10000, 1, 28, 28) and y.max() == 9


def test_no_fashion_mnist_anywhere_names_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no_debian")
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(ConfigError, match="tried: .*empty.*no_debian.*torchvision download"):
        datasets.fashion_mnist(str(tmp_path / "empty"), train=True)


def test_mnist_reads_torchvision_layout(tmp_path):
    idx_pair(tmp_path / "MNIST" / "raw", 4, train=True, gz=False)  # torchvision checks that all four files exist
    images, labels = idx_pair(tmp_path / "MNIST" / "raw", 6, train=False, gz=False, seed=1)
    x, y = datasets.mnist(str(tmp_path), train=False)
    assert np.array_equal(x[:, 0].numpy(), images) and np.array_equal(y.numpy(), labels)


def test_cifar10_reads_the_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        expected.append(data)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [1, 2, 3]}, f)
    x, y = datasets.cifar10(str(tmp_path), train=True)
    assert x.shape == (15, 3, 32, 32) and y.tolist() == [1, 2, 3] * 5
    assert np.array_equal(x[0].numpy().reshape(-1), expected[0][0])  # CHW order, as the file stores it
    x_test, _ = datasets.cifar10(str(tmp_path), train=False)
    assert np.array_equal(x_test.numpy().reshape(3, -1), expected[-1])


def test_image_folder_with_class_subfolders(tmp_path):
    for i in range(6):
        (tmp_path / f"c{i % 3}").mkdir(exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), i * 40, dtype=np.uint8)).save(tmp_path / f"c{i % 3}" / f"{i}.png")
    x, y = datasets.image_folder(str(tmp_path), True, image_size=16, channels=3)
    assert x.shape == (6, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="holds no images"):
        datasets.image_folder(str(tmp_path / "c0" / "nothing"), True, 16, 3)


def test_datamodule_scales_to_unit_interval_and_checks_shapes(tmp_path):
    idx_pair(tmp_path, 40, train=True, gz=True)
    dm = ImageDataModule("fashion_mnist", str(tmp_path), image_size=28, channels=1, batch_size=8, val_size=8)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert len(dm.train_set) == 32 and len(dm.val_set) == 8
    with pytest.raises(ConfigError, match="data.image_size=32"):
        ImageDataModule("fashion_mnist", str(tmp_path), image_size=32, channels=1).setup("fit")
    with pytest.raises(ConfigError, match="data.batch_size=0"):
        ImageDataModule("fashion_mnist", str(tmp_path), image_size=28, channels=1, batch_size=0)


def test_epoch_shuffle_is_a_function_of_seed_and_epoch_and_starts_where_told():
    a, b = EpochShuffleSampler(50, seed=1), EpochShuffleSampler(50, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == list(range(50))
    b.set_epoch(1)
    full = list(b)
    b.start = 20
    assert list(b) == full[20:]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_state_counts_the_batches_taken_not_those_read_ahead(num_workers):
    dataset = torch.utils.data.TensorDataset(torch.arange(40))
    epoch = [1]

    def loader():
        return ResumableLoader(dataset, EpochShuffleSampler(40, seed=3), 4, current_epoch=lambda: epoch[0],
                               num_workers=num_workers)

    full = [batch.tolist() for batch, in loader()]
    interrupted = loader()
    batches = iter(interrupted)
    taken = [next(batches)[0].tolist() for _ in range(3)]  # a worker has read further ahead by now
    assert interrupted.state_dict() == {"epoch": 1, "batches": 3}
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    assert taken + [batch.tolist() for batch, in resumed] == full
    resumed.load_state_dict({"epoch": 0, "batches": 10})  # a finished epoch 0: epoch 1 starts from its first batch
    assert [batch.tolist() for batch, in resumed] == full


def test_a_folder_gives_the_model_its_own_number_of_classes(tmp_path, one_thread):
    """data=folder counts its class sub-folders: a 12-class conditional model is built with 12 classes and samples
    class 11 (the 10 of a fixed num_classes would refuse it, or train into an IndexError)."""
    from test_evaluation import tiny_checkpoint
    from test_pipeline import compose_sample

    from diffusion_lab.sample import sample

    rng = np.random.default_rng(0)
    for i in range(24):
        (tmp_path / "images" / f"class{i % 12:02d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "images" / f"class{i % 12:02d}" / f"{i}.png")
    model, ckpt = tiny_checkpoint(tmp_path, ["data.conditional=true"],
                                  ["data=folder", f"data.root={tmp_path / 'images'}", "data.image_size=8", "data.channels=1"])
    assert model.num_classes == 12
    paths = sample(compose_sample([f"ckpt_path={ckpt}", "class_labels=[11]", "num_samples=1", "batch_size=1",
                                   "device=cpu", "sampler.steps=2", "trajectory_samples=1", f"output_dir={tmp_path / 'out'}"]))
    assert np.load(paths["samples"])["arr_0"].shape == (1, 8, 8, 1)
