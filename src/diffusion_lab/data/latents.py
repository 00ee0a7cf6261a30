"""Latents encoded once, for `data=latent_shards`: `prepare ... first_stage=PATH` encodes every image of every split
with a frozen first stage and writes litdata shards of its posterior moments (EDM2's `dataset_tool.py encode` stores
the same: mean and spread, so training still draws z ~ q(z|x) at every step):

    python -m diffusion_lab.data.prepare data=cifar10 first_stage=AE.ckpt out=LATENTS               # one device
    python -m diffusion_lab.data.prepare data=folder data.root=DIR data.image_size=256 first_stage=SD_VAE_DIR \
        out=LATENTS trainer=ddp trainer.devices=8                                                  # 8 devices

PATH is an autoencoder checkpoint of this project (experiment=autoencoder_*) or a diffusers AutoencoderKL folder
(save_pretrained). Each sample is {"moments": (2 * latent_channels, h, w) = (mean, logvar) of q(z|x) of the image as
prepared (unflipped, unscaled), in `latent_dtype`, "label": int}. The ranks (Lightning Fabric, as sample.py) each
encode one contiguous share of a split and write their own chunks; litdata merges the ranks' indexes in rank order,
so the latents keep the split's order. The first stage is copied into LATENTS/first_stage.ckpt (a checkpoint in the
project autoencoder's format), which stage 2 decodes samples with.
"""

import hashlib
import time
from pathlib import Path

import torch
from lightning.fabric import Fabric
from litdata.streaming.writer import BinaryWriter
from rich.progress import Progress
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.models.components.autoencoder_kl import FirstStage
from diffusion_lab.utils.errors import ConfigError

FIRST_STAGE_FILE = "first_stage.ckpt"
LATENT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def weights_sha256(first_stage: FirstStage) -> str:
    """SHA-256 of a first stage's weights and scale factor (its state dict: names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, value in sorted(first_stage.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latent_record(first_stage: FirstStage, config: dict, path: str, dtype: str) -> dict:
    """What prepared.json records of the latents: the first stage's identity, scale factor and latent shape."""
    if dtype not in LATENT_DTYPES:
        raise ConfigError(f"latent_dtype={dtype} is not allowed; choose one of {', '.join(LATENT_DTYPES)}")
    return {
        "stored": "moments: (mean, logvar) of q(z|x), unscaled, unflipped",
        "shape": list(first_stage.latent_shape),
        "dtype": dtype,
        "scale_factor": float(first_stage.scale_factor),
        "first_stage": {"path": str(Path(path).expanduser().resolve()), "config": config,
                        "weights_sha256": weights_sha256(first_stage)},
    }


class SourceImages(Dataset):
    """(uint8 image (C, H, W), label) of `indices` through a prepare sample function (decoded in loader workers)."""

    def __init__(self, fn, indices: list[int]):
        self.fn, self.indices = fn, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        sample = self.fn(self.indices[position])
        return torch.from_numpy(sample["image"]), sample["label"]


def encode_split(fabric: Fabric, first_stage: FirstStage, fn, indices: list[int], out_dir: Path, batch_size: int,
                 num_workers: int, dtype: str, chunk_bytes: str) -> None:
    """Write the latents of `indices` (decoded by `fn`) into the litdata data set `out_dir`, rank r encoding the
    r-th contiguous share; an unfinished `out_dir` is written again from the start."""
    rank, world_size = fabric.global_rank, fabric.world_size
    if len(indices) < world_size:
        raise ConfigError(f"{out_dir.name} has {len(indices)} images, fewer than the {world_size} encoding processes")
    start, stop = rank * len(indices) // world_size, (rank + 1) * len(indices) // world_size
    if rank == 0 and out_dir.exists():
        for leftover in out_dir.iterdir():  # chunks of a stopped run: their ranks' shares are encoded again
            leftover.unlink()
    fabric.barrier()
    writer = BinaryWriter(str(out_dir), chunk_bytes=chunk_bytes)
    loader = DataLoader(SourceImages(fn, indices[start:stop]), batch_size=batch_size, num_workers=num_workers)
    began, position = time.perf_counter(), start
    with Progress(disable=rank != 0) as progress, torch.inference_mode():
        task = progress.add_task(f"{out_dir.name}: rank 0's {stop - start} of {len(indices)} images, {world_size} "
                                 "process(es)", total=stop - start)
        for images, labels in loader:
            posterior = first_stage.autoencoder.encode(images.to(fabric.device).float() / 127.5 - 1)
            moments = torch.cat([posterior.mean, posterior.logvar], dim=1).to(LATENT_DTYPES[dtype]).cpu().numpy()
            for sample_moments, label in zip(moments, labels.tolist()):
                writer[position] = {"moments": sample_moments, "label": label}
                position += 1
            progress.advance(task, len(images))
    writer.done()
    writer.merge()  # rank 0 merges every rank's index into index.json once all are written; the others wait for it
    fabric.barrier()
    if rank == 0:
        seconds = time.perf_counter() - began
        print(f"{out_dir.name}: {len(indices)} images encoded in {seconds:.1f} s ({len(indices) / seconds:.1f} "
              f"images/s on {world_size} process(es))")
