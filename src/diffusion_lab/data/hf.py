"""`data=hf`: a Hugging Face dataset saved with `datasets.Dataset.save_to_disk` (a Dataset, or a DatasetDict with a
`train` and maybe a `test` split), one image column and one label column:

    python -m diffusion_lab.data.prepare data=hf data.root=DIR out=SHARDS     # shards, then data=shards data.root=SHARDS
    python train.py data=hf data.root=DIR data.image_size=64                  # or directly, rows decoded as read

Images are decoded row by row (in the loader's workers), converted to grayscale or RGB, and resized (short side) and
center-cropped to data.image_size, as a folder's files are.
"""

import functools

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffusion_lab.data import datasets
from diffusion_lab.data.image_datamodule import ImageDataModule, check_decodable
from diffusion_lab.utils.errors import ConfigError


def load_splits(root: str) -> dict:
    """{"train": Dataset[, "test": Dataset]} of the dataset saved at `root`."""
    try:
        import datasets as hf_datasets
    except ImportError as error:
        raise ConfigError("data=hf needs the datasets package: pip install datasets") from error
    try:
        loaded = hf_datasets.load_from_disk(root)
    except FileNotFoundError as error:
        raise ConfigError(f"data.root={root} holds no dataset written by datasets' save_to_disk ({error})") from error
    if isinstance(loaded, hf_datasets.Dataset):
        return {"train": loaded}
    if "train" not in loaded:
        raise ConfigError(f"data.root={root} holds splits {', '.join(loaded)}, but no train split")
    return {split: loaded[split] for split in ("train", "test") if split in loaded}


def check_columns(dataset, image_column: str, label_column: str | None) -> None:
    for key, column in (("image_column", image_column), ("label_column", label_column)):
        if column is not None and column not in dataset.column_names:
            raise ConfigError(f"data.{key}={column} is not a column of the dataset; its columns are "
                              f"{', '.join(dataset.column_names)}")


def class_names(dataset, label_column: str | None) -> list[str] | None:
    """The names of a ClassLabel label column, else None."""
    feature = dataset.features.get(label_column) if label_column is not None else None
    return list(feature.names) if hasattr(feature, "names") else None


def labels(dataset, label_column: str | None) -> Tensor:
    """The label column (zeros without one) as int64."""
    if label_column is None:
        return torch.zeros(len(dataset), dtype=torch.int64)
    return torch.tensor(dataset[label_column], dtype=torch.int64)


def pil_image(dataset, index: int, image_column: str):
    """The PIL image of row `index` (an `Image` feature column)."""
    from PIL import Image

    image = dataset[index][image_column]
    if not isinstance(image, Image.Image):
        raise ConfigError(f"data.image_column={image_column} holds {type(image).__name__}, not images")
    return image


def row_image(dataset, index: int, image_column: str, image_size: int, channels: int, resize: bool = True) -> Tensor:
    """The image of row `index` as uint8 (C, H, W), resized and center-cropped to image_size (resize=False: it must
    be image_size x image_size already)."""
    from torchvision.transforms import functional as TF

    image = pil_image(dataset, index, image_column).convert("L" if channels == 1 else "RGB")
    if not resize and image.size != (image_size, image_size):
        raise ConfigError(f"data.image_size=null keeps each image's size, but row {index} is {image.size[0]}x"
                          f"{image.size[1]}, not {image_size}x{image_size}; set data.image_size=N to resize them")
    return TF.pil_to_tensor(datasets.resize_crop(image, image_size) if resize else image)


class HFImages(Dataset):
    """(image scaled to [-1, 1], label) of the rows `indices` of a dataset, each decoded when read. `images` decodes
    them all once (for scores and figures)."""

    def __init__(self, dataset, indices: Tensor, labels: Tensor, image_column: str, image_size: int, channels: int):
        self.dataset, self.indices, self.labels = dataset, indices, labels
        self.image_column, self.image_size, self.channels = image_column, image_size, channels

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, position: int) -> Tensor:
        return row_image(self.dataset, int(self.indices[position]), self.image_column, self.image_size, self.channels)

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        return self.image(position).float() / 127.5 - 1, self.labels[position]

    def subset(self, positions: Tensor) -> "HFImages":
        return HFImages(self.dataset, self.indices[positions], self.labels[positions], self.image_column,
                        self.image_size, self.channels)

    @functools.cached_property
    def images(self) -> Tensor:
        check_decodable(len(self), (self.channels, self.image_size, self.image_size))
        return torch.stack([self.image(position) for position in range(len(self))])


class HFDataModule(ImageDataModule):
    """ImageDataModule over a saved Hugging Face dataset: `val_size` rows of its train split held out, its test
    split (or, without one, the held-out rows) for test."""

    DATASETS = ("hf",)

    def __init__(self, dataset: str, root: str, image_size: int, channels: int, batch_size: int = 128,
                 num_workers: int = 0, random_flip: bool = True, val_size: int = 1000, num_classes: int = 10,
                 conditional: bool = False, seed: int = 0, pin_memory: bool = False, image_column: str = "image",
                 label_column: str | None = "label"):
        super().__init__(dataset, root, image_size, channels, batch_size, num_workers, random_flip, val_size,
                         num_classes, conditional, seed, pin_memory)
        self.image_column, self.label_column = image_column, label_column

    def split(self, train: bool) -> HFImages:
        splits = load_splits(self.root)
        dataset = splits["train" if train or "test" not in splits else "test"]
        check_columns(dataset, self.image_column, self.label_column)
        return HFImages(dataset, torch.arange(len(dataset)), labels(dataset, self.label_column), self.image_column,
                        self.image_size, self.channels)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if "test" not in load_splits(self.root):  # the train split's held-out rows serve as the test split
            self.test_set = self.val_set
