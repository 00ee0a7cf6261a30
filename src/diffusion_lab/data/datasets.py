"""Image data sets as uint8 tensors (N, C, H, W) with int64 labels (N,), read from disk or downloaded.

Fashion-MNIST is read from, in order: `root` (raw IDX files, gzipped or not), the Debian package
dataset-fashion-mnist, torchvision's download. MNIST and CIFAR-10 come through torchvision's download into `root`.
"""

import functools
import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusion_lab.utils.errors import ConfigError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzipped or not, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        for folder in (directory, directory / "FashionMNIST" / "raw"):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_idx_pair(directory: Path, train: bool) -> tuple[Tensor, Tensor] | None:
    images_stem, labels_stem = IDX_FILES[train]
    images, labels = _find_idx(directory, images_stem), _find_idx(directory, labels_stem)
    if images is None or labels is None:
        return None
    x, y = read_idx(images), read_idx(labels)
    if len(x) != len(y):
        raise ConfigError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def fashion_mnist_folder(root: str, train: bool = True) -> Path | None:
    """The first of `root` and the Debian package's folder that holds Fashion-MNIST's IDX files of the split."""
    return next((folder for folder in (Path(root), DEBIAN_FASHION_MNIST)
                 if all(_find_idx(folder, stem) for stem in IDX_FILES[train])), None)


def fashion_mnist(root: str, train: bool) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST (Xiao et al. 2017), 28x28x1, 10 classes."""
    tried = [str(Path(root)), str(DEBIAN_FASHION_MNIST)]
    folder = fashion_mnist_folder(root, train)
    if folder is not None:
        return _read_idx_pair(folder, train)
    try:
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(root, train=train, download=True)
        return ds.data.unsqueeze(1).clone(), ds.targets.clone()
    except Exception as error:  # noqa: BLE001 - any download failure ends in the same advice
        tried.append(f"torchvision download into {root} ({type(error).__name__})")
    raise ConfigError(
        "Fashion-MNIST not found; tried: " + "; ".join(tried) + ". Put the IDX files in data.root, "
        "or `apt-get install dataset-fashion-mnist`, or run once with internet access"
    )


def mnist(root: str, train: bool) -> tuple[Tensor, Tensor]:
    """MNIST (LeCun et al. 1998), 28x28x1, 10 classes, through torchvision (downloaded into root/MNIST/raw)."""
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(root, train=train, download=True)
    except Exception as error:  # noqa: BLE001
        raise ConfigError(
            f"MNIST not found in {root}/MNIST/raw and the download failed ({type(error).__name__}); "
            "run once with internet access or copy the IDX files there"
        ) from error
    return ds.data.unsqueeze(1).clone(), ds.targets.clone()


def cifar10(root: str, train: bool) -> tuple[Tensor, Tensor]:
    """CIFAR-10 (Krizhevsky 2009), 32x32x3, 10 classes: torchvision's download, then the python batches read here."""
    folder = Path(root) / "cifar-10-batches-py"
    if not folder.is_dir():
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(root, train=train, download=True)
        except Exception as error:  # noqa: BLE001
            raise ConfigError(
                f"CIFAR-10 not found in {folder} and the download failed ({type(error).__name__}); "
                "run once with internet access or extract cifar-10-python.tar.gz into data.root"
            ) from error
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"CIFAR-10 file {path} is missing; delete {folder} to download it again")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch["labels"])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def folder_files(root: str) -> tuple[list[str], Tensor, list[str]]:
    """The image files under `root` (sorted), their labels and the class names: class sub-folders give the labels,
    as torchvision's ImageFolder."""
    folder = Path(root)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"data.root={root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    folders = [p.parent.relative_to(folder).as_posix() for p in files]
    classes = sorted(set(folders))
    labels = torch.tensor([classes.index(name) for name in folders])
    return [str(p) for p in files], labels, classes


def resize_crop(image, image_size: int):
    """The short side resized to image_size, then the center image_size x image_size crop (a PIL image or a
    (C, H, W) tensor)."""
    from torchvision.transforms import functional as TF

    return TF.center_crop(TF.resize(image, image_size), image_size)


def load_image(path: str, image_size: int | None, channels: int) -> Tensor:
    """One image file as uint8 (C, H, W): grayscale or RGB, resized and center-cropped to image_size (None: as is)."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        return TF.pil_to_tensor(image if image_size is None else resize_crop(image, image_size))


def _load_images(paths: list[str], image_size: int | None, channels: int) -> Tensor:
    return torch.stack([load_image(path, image_size, channels) for path in paths])


def decode_files(files: list[str], image_size: int | None, channels: int, num_workers: int = 0) -> Tensor:
    """Every file by `load_image`, as uint8 (N, C, H, W), decoded by `num_workers` DataLoader workers."""
    from torch.utils.data import DataLoader

    batches = DataLoader(files, batch_size=256, num_workers=num_workers,
                         collate_fn=functools.partial(_load_images, image_size=image_size, channels=channels))
    return torch.cat(list(batches))


def image_folder(root: str, train: bool, image_size: int, channels: int) -> tuple[Tensor, Tensor]:
    """Any folder of images (see `folder_files`), every file decoded up front. The same images serve train and
    test: hold out a validation split for scores."""
    files, labels, _ = folder_files(root)
    return decode_files(files, image_size, channels), labels
