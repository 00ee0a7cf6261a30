"""`data=shards`: images and labels streamed from the litdata shards `diffusion_lab.data.prepare` writes, through
litdata's StreamingDataset and StreamingDataLoader (https://github.com/Lightning-AI/litData).

A shards folder (local, or a URL litdata reads: s3://, gs://, azure://, local:) holds `prepared.json` and one
litdata data set per split: `train`, `val` and, for data sets that have one, `test`.
"""

import functools
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from litdata import StreamingDataLoader, StreamingDataset
from torch import Tensor

from diffusion_lab.data.image_datamodule import ImageDataModule, UInt8ImageDataset, check_decodable
from diffusion_lab.utils.errors import ConfigError

FORMAT_VERSION = 1  # of prepared.json and the samples ({"image": uint8 (C, H, W), "label": int})
META_FILE = "prepared.json"
PREPARE_AGAIN = "prepare the data again into a new folder (python -m diffusion_lab.data.prepare ... out=NEW)"


def is_url(root: str) -> bool:
    return "://" in root or root.startswith("local:")


def split_dir(root: str, split: str) -> str:
    return f"{root.rstrip('/')}/{split}"


def read_meta(root: str, samples: str | None = "images") -> dict:
    """The `prepared.json` of a shards folder of `samples` (images | latents | None: either); one ConfigError line
    when there is none, when `prepare` has not finished writing it, when it is of another format version or holds
    the other kind."""
    prepare = f"make them with python -m diffusion_lab.data.prepare data=<source> out={root}"
    try:
        if is_url(root):
            from litdata.streaming.downloader import get_downloader

            with tempfile.TemporaryDirectory() as tmp:
                local = f"{tmp}/{META_FILE}"
                get_downloader(root, tmp, []).download_file(split_dir(root, META_FILE), local)
                meta = json.loads(Path(local).read_text())
        else:
            meta = json.loads((Path(root) / META_FILE).read_text())
    except Exception as error:  # noqa: BLE001 - a missing file or bucket, unreadable JSON: the same advice
        raise ConfigError(f"data.root={root} holds no prepared shards ({META_FILE}: {type(error).__name__}); "
                          f"{prepare}") from error
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"data.root={root} holds shards of format version {meta.get('format_version')}, but this "
                          f"code reads version {FORMAT_VERSION}; {prepare}")
    if not meta.get("complete"):
        raise ConfigError(f"data.root={root} is only partly prepared; run the prepare command again to finish it")
    held = "latents" if "latents" in meta else "images"
    if samples is not None and held != samples:
        choice = {"images": "data=shards", "latents": "data=latent_shards"}[held]
        raise ConfigError(f"data.root={root} holds {held} (prepared {'with' if held == 'latents' else 'without'} "
                          f"first_stage=), not {samples}; read them with {choice}")
    return meta


def check_split(input_dir: str) -> None:
    """ConfigError (one line) when a local split's index.json is unreadable, or a chunk it lists is missing or not of
    the size it lists (a copy cut short): litdata would wait on such a chunk as on a hung download."""
    if is_url(input_dir):
        return
    try:
        chunks = json.loads((Path(input_dir) / "index.json").read_text())["chunks"]
        sizes = {chunk["filename"]: int(chunk["chunk_bytes"]) for chunk in chunks}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{input_dir}/index.json is unreadable ({type(error).__name__}); {PREPARE_AGAIN}") from error
    for name, size in sizes.items():
        found = (Path(input_dir) / name).stat().st_size if (Path(input_dir) / name).is_file() else 0
        if found != size:
            raise ConfigError(f"{input_dir}/{name} holds {found} of its {size} bytes (missing or cut short); {PREPARE_AGAIN}")


def damaged(input_dir: str, error: Exception) -> ConfigError:
    return ConfigError(f"a sample of {input_dir} cannot be decoded ({type(error).__name__}: {str(error)[:100]}): the "
                       f"shards are damaged; {PREPARE_AGAIN}")


class ImageShards(StreamingDataset):
    """(image scaled to [-1, 1], label) of one split. Iterated, litdata deals each DDP rank, and each loader worker
    within it, a disjoint share of whole batches (equal for all ranks: at most world_size * batch_size - 1 samples
    a pass are left out), in an order that is a function of (seed, epoch): the chunks are permuted, then the
    samples within each chunk. Indexed, it reads any sample of the split. `images` / `labels` read the whole split
    into memory once (for scores and figures)."""

    def __init__(self, input_dir: str, size: int, image_shape: tuple[int, int, int], cache_dir: str | None = None,
                 shuffle: bool = False, seed: int = 0):
        check_split(input_dir)
        # a full in-chunk shuffle reads samples one by one: batch_decode=0, or each read decodes a 256-sample window
        super().__init__(input_dir, cache_dir=cache_dir, shuffle=shuffle, seed=seed, item_shuffle_window="full",
                         batch_decode=0)
        self.size, self.image_shape, self.root = size, image_shape, input_dir

    def reading(self, read: Callable[..., Any], *args) -> Any:
        """read(self, *args), one of StreamingDataset's; ConfigError when a chunk cannot be read (damaged shards)."""
        try:
            return read(self, *args)
        except (StopIteration, ConfigError):
            raise
        except Exception as error:  # noqa: BLE001 - whatever a damaged chunk makes litdata's decoders raise
            raise damaged(self.root, error) from error

    def __iter__(self) -> "ImageShards":
        return self.reading(StreamingDataset.__iter__)  # maps the first chunks, checking their headers

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.reading(StreamingDataset.__next__)

    def item(self, index) -> dict:
        """StreamingDataset's sample `index`; ConfigError when it cannot be decoded (damaged shards)."""
        return self.reading(StreamingDataset.__getitem__, index)

    def __getitem__(self, index) -> tuple[Tensor, Tensor]:
        item = self.item(index)
        return torch.tensor(item["image"], dtype=torch.float32) / 127.5 - 1, torch.tensor(item["label"])

    @functools.cached_property
    def uint8(self) -> tuple[Tensor, Tensor]:
        """Every image as uint8 (N, C, H, W) and every label, in the split's order."""
        check_decodable(self.size, self.image_shape)
        items = [self.item(index) for index in range(self.size)]
        return (torch.stack([torch.tensor(item["image"]) for item in items]),
                torch.tensor([item["label"] for item in items]))

    @property
    def images(self) -> Tensor:
        return self.uint8[0]

    @property
    def labels(self) -> Tensor:
        return self.uint8[1]


class ShardsDataModule(ImageDataModule):
    """ImageDataModule over prepared shards: the training split streams (`ImageShards` through litdata's
    StreamingDataLoader, whose `state_dict` Lightning saves in every checkpoint, so a resumed run goes on at the
    first sample not trained on, mid-epoch included); the validation split (`val_size` images, fixed by prepare)
    and the test split are read into memory, as `UInt8ImageDataset`s (val_size: only the first that many validation
    images). A folder has no test split: its held-out validation images serve as both. Flips and per-rank seeds are
    ImageDataModule's."""

    DATASETS = ("shards",)
    SAMPLES = "images"  # what the shards hold (read_meta)

    def __init__(
        self,
        root: str,
        image_size: int,
        channels: int,
        batch_size: int = 128,
        num_workers: int = 0,
        random_flip: bool = True,
        num_classes: int = 10,
        conditional: bool = False,
        seed: int = 0,
        pin_memory: bool = False,
        cache_dir: str | None = None,
        val_size: int | None = None,
    ):
        self.meta = read_meta(root, self.SAMPLES)
        if val_size is not None and (not isinstance(val_size, int) or val_size < 1):
            raise ConfigError(f"data.val_size={val_size} must be an integer >= 1, or null (all of prepare's)")
        super().__init__("shards", root, image_size, channels, batch_size, num_workers, random_flip,
                         min(val_size or self.meta["splits"]["val"], self.meta["splits"]["val"]), num_classes,
                         conditional, seed, pin_memory)
        shape = (channels, image_size, image_size)
        if tuple(self.meta["image_shape"]) != shape:
            c, h, w = self.meta["image_shape"]
            raise ConfigError(f"data.root={root} holds {h}x{w}x{c} images, but data.image_size={image_size} and "
                              f"data.channels={channels}; set them to match")
        if conditional and self.meta["num_classes"] != num_classes:
            raise ConfigError(f"data.root={root} holds {self.meta['num_classes']} classes, but "
                              f"data.num_classes={num_classes}; set them to match")
        self.image_shape, self.cache_dir = shape, cache_dir

    def shards(self, split: str, shuffle: bool = False) -> ImageShards:
        return ImageShards(split_dir(self.root, split), self.meta["splits"][split], self.image_shape, self.cache_dir,
                           shuffle=shuffle, seed=self.seed)

    def split(self, train: bool) -> ImageShards:
        """A whole split: the training one, or the test one (a folder's: its validation images)."""
        return self.shards("train" if train else "test" if "test" in self.meta["splits"] else "val")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self.shards("train", shuffle=True)
            self.val_set = UInt8ImageDataset(*(part[: self.val_size] for part in self.shards("val").uint8))
        if stage in ("test", None) and self.test_set is None:
            self.test_set = UInt8ImageDataset(*self.split(train=False).uint8)

    def train_dataloader(self) -> StreamingDataLoader:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.meta["splits"]["train"] < world_size * self.batch_size:
            raise ConfigError(f"data.batch_size={self.batch_size} times {world_size} ranks exceeds the "
                              f"{self.meta['splits']['train']} training images")
        return StreamingDataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                                   pin_memory=self.pin_memory, drop_last=True)
