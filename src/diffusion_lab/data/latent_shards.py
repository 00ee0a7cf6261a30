"""`data=latent_shards`: the latents `prepare ... first_stage=PATH` encoded once (data/latents.py), streamed by litdata
as `data=shards` streams images; stage 2 of latent diffusion trains on them without running the encoder.

Batches are (posterior moments (mean, logvar), labels): DiffusionModule draws z ~ q(z|x) from them at each step
(from its (seed, rank, step) generator) and scales it by the first stage's scale factor, as it does from the images
through the encoder. Flips (data.random_flip) mirror the moments, as EDM2 does with its stored latents: a close but
not exact stand-in for encoding the mirrored image.
"""

import functools

import torch
from litdata import StreamingDataset
from torch import Tensor
from torch.utils.data import Dataset

from diffusion_lab.data.latents import weights_sha256
from diffusion_lab.data.shards import ShardsDataModule, split_dir
from diffusion_lab.utils.errors import ConfigError


class LatentShards(StreamingDataset):
    """(posterior moments (2 * latent_channels, h, w) as float32, label) of one split, dealt to ranks and loader
    workers as `ImageShards` is. `split` reads the whole split into memory."""

    def __init__(self, input_dir: str, size: int, cache_dir: str | None = None, shuffle: bool = False, seed: int = 0):
        super().__init__(input_dir, cache_dir=cache_dir, shuffle=shuffle, seed=seed, item_shuffle_window="full",
                         batch_decode=0)
        self.size = size  # of the whole split (len() is a rank's share under DDP)

    def __getitem__(self, index) -> tuple[Tensor, Tensor]:
        item = super().__getitem__(index)
        return torch.as_tensor(item["moments"]).float(), torch.tensor(item["label"])

    @functools.cached_property
    def split(self) -> "LatentSplit":
        items = [StreamingDataset.__getitem__(self, index) for index in range(self.size)]
        return LatentSplit(torch.stack([torch.as_tensor(item["moments"]) for item in items]),
                           torch.tensor([item["label"] for item in items]))


class LatentSplit(Dataset):
    """(posterior moments as float32, label) of a split held in memory (in the stored dtype). It has no images."""

    def __init__(self, moments: Tensor, labels: Tensor):
        self.moments, self.labels = moments, labels

    def __len__(self) -> int:
        return len(self.moments)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.moments[index].float(), self.labels[index]

    @property
    def images(self) -> Tensor:
        raise ConfigError("data=latent_shards holds latents, not images: scores and figures against real images "
                          "(callbacks.fid, callbacks.loss_by_timestep, metrics=) need the image data (data=shards or "
                          "the source data set)")


class LatentShardsDataModule(ShardsDataModule):
    """ShardsDataModule over latent shards: the training split streams (exact mid-epoch resume, disjoint DDP shares,
    as for images); the validation split (its first val_size) and the test split are held in memory as moments."""

    SAMPLES = "latents"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["latents"]["shape"])

    def shards(self, split: str, shuffle: bool = False) -> LatentShards:
        return LatentShards(split_dir(self.root, split), self.meta["splits"][split], self.cache_dir, shuffle=shuffle,
                            seed=self.seed)

    def split(self, train: bool) -> LatentSplit:
        """A whole split: the training one, or the test one (a folder's: its validation latents)."""
        return self.shards("train" if train else "test" if "test" in self.meta["splits"] else "val").split

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self.shards("train", shuffle=True)
            val = self.shards("val").split
            self.val_set = LatentSplit(val.moments[: self.val_size], val.labels[: self.val_size])
        if stage in ("test", None) and self.test_set is None:
            self.test_set = self.split(train=False)

    def check_first_stage(self, model) -> None:
        """One line unless `model` (a DiffusionModel) diffuses these latents: its sample shape must be the latents'
        and its first stage (weights and scale factor) the one prepare encoded them with."""
        encoded_with = self.meta["latents"]["first_stage"]
        if not model.latent:
            raise ConfigError(f"data.root={self.root} holds latents, but the model diffuses pixels; give it the first "
                              f"stage they were encoded with (first_stage_ckpt={self.root}/first_stage.ckpt)")
        if tuple(model.sample_shape) != self.latent_shape:
            raise ConfigError(
                f"latents shape mismatch: data.root={self.root} holds latents of shape {self.latent_shape} (C, H, W), "
                f"but the model diffuses {tuple(model.sample_shape)} (its first stage's latents); train with the "
                f"first stage they were encoded with ({encoded_with['path']}), or encode them again with this one")
        if weights_sha256(model.first_stage) != encoded_with["weights_sha256"]:
            raise ConfigError(
                f"the run's first stage is not the one the latents in data.root={self.root} were encoded with "
                f"({encoded_with['path']}): other weights or scale factor; leave out first_stage_ckpt= / vae_path= to "
                "decode with the one recorded there, or encode the data again with this one")
