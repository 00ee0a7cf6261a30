"""`ImageDataModule`: train / validation / test splits of an image data set, scaled to [-1, 1]."""

import functools
from typing import Callable

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from diffusion_lab.data import datasets
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.seeding import step_seed

DATASETS = ("fashion_mnist", "mnist", "cifar10", "folder")


DECODE_LIMIT_BYTES = 4 * 2**30  # the most a lazy split's `images` decodes into memory


def held_out(length: int, val_size: int) -> tuple[Tensor, Tensor]:
    """(validation, training) indices: the first val_size of a fixed permutation of range(length) are held out."""
    if not 0 <= val_size < length:
        raise ConfigError(f"data.val_size={val_size} must be in 0..{length - 1}")
    order = torch.randperm(length, generator=torch.Generator().manual_seed(1234))
    return order[:val_size], order[val_size:]


def check_decodable(length: int, shape: tuple[int, ...]) -> None:
    """One line instead of running out of memory when `length` images of `shape` exceed DECODE_LIMIT_BYTES."""
    size = length * torch.Size(shape).numel()
    if size > DECODE_LIMIT_BYTES:
        raise ConfigError(
            f"a split of {length} images ({size / 2**30:.1f} GiB decoded) is more than the "
            f"{DECODE_LIMIT_BYTES / 2**30:.0f} GiB held in memory for scores and figures; compare against "
            "metrics.real_split=val (data.val_size images)"
        )


class UInt8ImageDataset(Dataset):
    """(image scaled to [-1, 1], label) from uint8 images held in memory."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index].float() / 127.5 - 1, self.labels[index]

    def subset(self, indices: Tensor) -> "UInt8ImageDataset":
        return UInt8ImageDataset(self.images[indices], self.labels[indices])


class ImageFileDataset(Dataset):
    """(image scaled to [-1, 1], label), each image decoded from its file when read (`datasets.load_image`), in
    the loader's workers: memory holds the file list, whatever the folder's size. `images` decodes the whole set
    once, for what wants uint8 tensors (real images for scores, the loss-by-timestep callback, figures)."""

    def __init__(self, files: list[str], labels: Tensor, image_size: int, channels: int):
        self.files, self.labels, self.image_size, self.channels = files, labels, image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = datasets.load_image(self.files[index], self.image_size, self.channels)
        return image.float() / 127.5 - 1, self.labels[index]

    def subset(self, indices: Tensor) -> "ImageFileDataset":
        return ImageFileDataset([self.files[i] for i in indices.tolist()], self.labels[indices], self.image_size,
                                self.channels)

    @functools.cached_property
    def images(self) -> Tensor:
        check_decodable(len(self), (self.channels, self.image_size, self.image_size))
        return datasets.decode_files(self.files, self.image_size, self.channels)


class EpochShuffleSampler(DistributedSampler):
    """A random permutation that is a pure function of (seed, epoch), cut to a multiple of `num_replicas` and dealt
    round-robin: `rank` takes every num_replicas-th index (DistributedSampler's sharding; being one, Lightning does
    not wrap it). ResumableLoader sets `epoch` and `start`, the first position of the shard to yield, each pass."""

    def __init__(self, length: int, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(length), num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(step_seed(self.seed, "shuffle", self.epoch))
        order = torch.randperm(len(self.dataset), generator=generator)[: self.total_size]
        return iter(order[self.rank : self.total_size : self.num_replicas][self.start :].tolist())


class ResumableLoader(DataLoader):
    """The training DataLoader over an EpochShuffleSampler, with its place in the data as its state: `state_dict`
    is (epoch, batches handed out), which Lightning saves with the loop state in every checkpoint and gives back
    through `load_state_dict` on resume, so a resumed epoch goes on at the first batch not trained on. Batches are
    counted here, as the trainer takes them, not in the sampler, which worker processes read ahead. Each pass
    shuffles for `current_epoch()` (the trainer's epoch: the one Lightning passes to `set_epoch` runs one ahead
    after resuming from a checkpoint saved at the end of an epoch or at max_steps)."""

    def __init__(self, dataset: Dataset, sampler: EpochShuffleSampler, batch_size: int,
                 current_epoch: Callable[[], int] | None = None, **kwargs):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.current_epoch = current_epoch or (lambda: sampler.epoch)
        self.batches_done = 0
        self._resume_at: dict[str, int] | None = None

    def __iter__(self):
        epoch, resume = self.current_epoch(), self._resume_at
        self._resume_at = None
        self.batches_done = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        self.sampler.set_epoch(epoch)
        self.sampler.start = self.batches_done * self.batch_size
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_at = dict(state_dict)


class ImageDataModule(LightningDataModule):
    """Images scaled to [-1, 1] with labels. `val_size` images of the training set are held out for validation;
    `test` is the data set's own test split. Random horizontal flips are drawn on the device after transfer,
    from a seed that depends only on (seed, rank, step). A folder that decodes to at most `in_memory_limit_mb`
    MiB is decoded up front (by `num_workers` workers) and held in memory, as the other data sets are; a larger
    one is decoded file by file as the loader reads it (`ImageFileDataset`)."""

    DATASETS = DATASETS

    def __init__(
        self,
        dataset: str,
        root: str,
        image_size: int,
        channels: int,
        batch_size: int = 128,
        num_workers: int = 0,
        random_flip: bool = True,
        val_size: int = 1000,
        num_classes: int = 10,
        conditional: bool = False,
        seed: int = 0,
        pin_memory: bool = False,
        in_memory_limit_mb: int = 1024,
    ):
        super().__init__()
        if dataset not in self.DATASETS:
            raise ConfigError(f"data.dataset={dataset!r} is not a data set; choose one of {', '.join(self.DATASETS)}")
        for key, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{key}={value} must be an integer >= {low}")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels} must be 1 or 3")
        self.dataset, self.root, self.image_size, self.channels = dataset, root, image_size, channels
        self.batch_size, self.num_workers, self.random_flip = batch_size, num_workers, random_flip
        self.val_size, self.num_classes, self.conditional, self.seed = val_size, num_classes, conditional, seed
        self.pin_memory, self.in_memory_limit_mb = pin_memory, in_memory_limit_mb
        self.train_set = self.val_set = self.test_set = None

    def split(self, train: bool) -> UInt8ImageDataset | ImageFileDataset:
        """One whole split (a folder's one split serves both), checked against image_size and channels."""
        if self.dataset == "folder":
            files, labels, _ = datasets.folder_files(self.root)
            if len(files) * self.channels * self.image_size**2 > self.in_memory_limit_mb * 2**20:
                return ImageFileDataset(files, labels, self.image_size, self.channels)
            images = datasets.decode_files(files, self.image_size, self.channels, self.num_workers)
            return UInt8ImageDataset(images, labels)
        images, labels = getattr(datasets, self.dataset)(self.root, train)
        if images.shape[1:] != (self.channels, self.image_size, self.image_size):
            found = "x".join(map(str, images.shape[2:])) + f"x{images.shape[1]}"
            raise ConfigError(
                f"data set {self.dataset} has {found} images, but data.image_size={self.image_size} and "
                f"data.channels={self.channels}; set them to match"
            )
        return UInt8ImageDataset(images, labels)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """The uint8 images (N, C, H, W) and labels of one split."""
        split = self.split(train)
        return split.images, split.labels

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            train = self.split(train=True)
            val, rest = held_out(len(train), self.val_size)
            self.train_set, self.val_set = train.subset(rest), train.subset(val)
        if stage in ("test", None) and self.test_set is None:
            self.test_set = self.split(train=False)

    def train_dataloader(self) -> ResumableLoader:
        if len(self.train_set) < self.batch_size:
            raise ConfigError(f"data.batch_size={self.batch_size} exceeds the {len(self.train_set)} training images")
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return ResumableLoader(
            self.train_set,
            EpochShuffleSampler(len(self.train_set), self.seed, world_size, rank),
            self.batch_size,
            current_epoch=(lambda: trainer.current_epoch) if trainer is not None else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """A training batch (images, labels) with random_flip: each image mirrored with probability 1/2, drawn from
        (seed, rank, step). Anything else passes as it is, also the model summary's example input (forward's
        arguments, which Lightning hands to this hook as a batch)."""
        trainer = self.trainer
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return batch
        images, labels = batch
        if self.random_flip and trainer is not None and trainer.training:
            generator = torch.Generator(images.device).manual_seed(
                step_seed(self.seed, trainer.global_rank, trainer.global_step, "flip")
            )
            flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, labels
