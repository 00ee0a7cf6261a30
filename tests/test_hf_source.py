"""`data=hf`: a Hugging Face dataset saved with `save_to_disk` prepares into shards that hold its images and labels,
and trains directly with the same splits; bad columns and mixed sizes with no resize are one clear line."""

from pathlib import Path

import datasets as hf_datasets
import numpy as np
import pytest
import torch
from PIL import Image

from test_shards import prepare_config

from diffusion_lab.data.hf import HFDataModule
from diffusion_lab.data.image_datamodule import held_out
from diffusion_lab.data.prepare import prepare
from diffusion_lab.data.shards import ShardsDataModule
from diffusion_lab.utils.errors import ConfigError

HF = ["data=hf", "data.image_column=img", "data.label_column=y", "data.channels=1", "data.val_size=4"]


def saved_dataset(root: Path, sizes: dict[str, int], mixed: bool = False) -> tuple[Path, dict]:
    """A DatasetDict of random 8x8 grayscale PIL images (one 12x10 in train when `mixed`) with ClassLabel labels,
    saved at root; returns it with {split: (uint8 images (N, 1, 8, 8), labels)}."""
    rng = np.random.default_rng(0)
    features = hf_datasets.Features({"img": hf_datasets.Image(), "y": hf_datasets.ClassLabel(names=["a", "b", "c"])})
    splits, arrays = {}, {}
    for split, n in sizes.items():
        pixels = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        images = [Image.fromarray(p) for p in pixels]
        if mixed and split == "train":
            images[3] = Image.new("L", (12, 10))
        labels = rng.integers(0, 3, n).tolist()
        splits[split] = hf_datasets.Dataset.from_dict({"img": images, "y": labels}, features=features)
        arrays[split] = (torch.from_numpy(pixels).unsqueeze(1), torch.tensor(labels))
    hf_datasets.DatasetDict(splits).save_to_disk(str(root))
    return root, arrays


def test_shards_of_a_saved_dataset_hold_its_images_and_labels(tmp_path):
    root, source = saved_dataset(tmp_path / "hf", {"train": 20, "test": 6})
    meta = prepare(prepare_config([*HF, f"data.root={root}", "data.image_size=null", f"out={tmp_path / 'out'}",
                                   "num_workers=1"]))
    assert meta["splits"] == {"train": 16, "val": 4, "test": 6} and meta["classes"] == ["a", "b", "c"]
    shards = ShardsDataModule(str(tmp_path / "out"), image_size=8, channels=1, num_classes=3)
    shards.setup()
    val, train = held_out(20, 4)
    images, labels = source["train"]
    assert torch.equal(shards.train_set.images, images[train]) and torch.equal(shards.train_set.labels, labels[train])
    assert torch.equal(shards.val_set.images, images[val]) and torch.equal(shards.val_set.labels, labels[val])
    assert torch.equal(shards.test_set.images, source["test"][0])
    assert torch.equal(shards.test_set.labels, source["test"][1])

    direct = HFDataModule("hf", str(root), image_size=8, channels=1, val_size=4, image_column="img", label_column="y")
    direct.setup()  # data=hf without shards: the same splits, decoded row by row
    assert torch.equal(direct.train_set.images, shards.train_set.images)
    assert torch.equal(direct.val_set.labels, shards.val_set.labels)
    image, label = direct.train_set[0]
    assert torch.equal(image, shards.train_set[0][0]) and label == shards.train_set[0][1]


def test_a_missing_column_and_mixed_sizes_without_resize_are_one_line(tmp_path):
    root, _ = saved_dataset(tmp_path / "hf", {"train": 10}, mixed=True)
    with pytest.raises(ConfigError, match="data.image_column=image is not a column of the dataset; its columns are img, y"):
        prepare(prepare_config([*HF, "data.image_column=image", f"data.root={root}", f"out={tmp_path / 'a'}"]))
    with pytest.raises(ConfigError, match=r"row 3 is 12x10, not 8x8; set data.image_size=N") as error:
        prepare(prepare_config([*HF, f"data.root={root}", "data.image_size=null", f"out={tmp_path / 'b'}",
                                "num_workers=1"]))
    assert "\n" not in str(error.value)
    meta = prepare(prepare_config([*HF, f"data.root={root}", "data.image_size=8", f"out={tmp_path / 'c'}",
                                   "num_workers=1"]))  # resized and center-cropped, it prepares
    assert meta["splits"] == {"train": 6, "val": 4}
