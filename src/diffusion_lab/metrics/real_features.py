"""Features of the real images, computed once per (data, extractor) and cached on disk.

The cache file is named by the extractor's name and output (`features`, or e.g. Inception's `spatial` for sFID), a
hash of its weights and a hash of the uint8 images, so a changed extractor or a changed data set never reads stale
features.
"""

import hashlib
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from diffusion_lab.metrics.extractors import weights_hash
from diffusion_lab.utils.io import atomic_path


class RealFeatures(NamedTuple):
    features: Tensor  # (N, D) float32, on the CPU
    extractor_hash: str
    data_hash: str
    cached: bool  # True when read from the cache


def data_hash(images: Tensor) -> str:
    """sha256 (first 16 hex digits) of the uint8 images and their shape."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Tensor, batch_size: int = 256, device: str | torch.device = "cpu",
                     output: str = "features") -> Tensor:
    """One output of the extractor (`extractor.outputs`) over the images, in batches, as float32 on the CPU."""
    extractor = extractor.to(device).eval()
    chunks = [extractor.forward_outputs(batch.to(device))[output].float().cpu() for batch in images.split(batch_size)]
    return torch.cat(chunks)


def real_features(
    extractor: nn.Module,
    images: Tensor,
    cache_dir: str | Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    output: str = "features",
) -> RealFeatures:
    """One output (`features` by default) of the extractor over uint8 `images` (N, C, H, W), read from `cache_dir`
    when there, else computed and written (to a temporary name, then renamed)."""
    extractor_hash, images_hash = weights_hash(extractor), data_hash(images)
    tag = extractor.name if output == "features" else f"{extractor.name}_{output}"
    path = Path(cache_dir) / f"{tag}-{extractor_hash}-{images_hash}.pt"
    if path.is_file():
        return RealFeatures(torch.load(path, map_location="cpu", weights_only=True), extractor_hash, images_hash, True)
    features = extract_features(extractor, images, batch_size, device, output)
    with atomic_path(path) as temporary:
        torch.save(features, temporary)
    return RealFeatures(features, extractor_hash, images_hash, False)
