"""FID, KID and precision/recall of generated images against cached real features, through torchmetrics.

The extractor runs once per image; torchmetrics' `FrechetInceptionDistance` (Heusel et al. 2017) and
`KernelInceptionDistance` (Binkowski et al. 2018) receive its features through an identity `feature` module,
so their states, distributed reduction and formulas are torchmetrics' own. Real features are loaded on global
rank 0 only: the states are summed / gathered over ranks, so every real image counts once and every sample
(each rank scoring its own share) counts once.
"""

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from diffusion_lab.metrics.precision_recall import PrecisionRecall
from diffusion_lab.utils.errors import ConfigError

SAMPLE_METRICS = ("fid", "kid", "prec_recall")


class FeatureInput(nn.Identity):
    """The torchmetrics `feature` module for features extracted beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


class KernelDistance(KernelInceptionDistance):
    """torchmetrics' KID with subsets of min(max_subset_size, N real, N fake) samples, N counted after the
    features of all ranks are gathered."""

    def __init__(self, feature: nn.Module, subsets: int, max_subset_size: int):
        super().__init__(feature=feature, subsets=subsets, reset_real_features=False)
        self.max_subset_size = max_subset_size

    def compute(self) -> tuple[Tensor, Tensor]:
        sizes = (len(dim_zero_cat(self.real_features)), len(dim_zero_cat(self.fake_features)))
        self.subset_size = min(self.max_subset_size, *sizes)
        return super().compute()


class SampleScores(nn.Module):
    """Real features go in with `add_real(features)`, generated images with `update(images)`; `compute()` gives
    {fid, kid_mean, kid_std, precision, recall} for the metrics asked. KID uses subsets of min(kid_subset_size, N)."""

    def __init__(
        self,
        extractor: nn.Module,
        metrics: tuple[str, ...] = ("fid",),
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        k: int = 3,
    ):
        super().__init__()
        for name in metrics:
            if name not in SAMPLE_METRICS:
                raise ConfigError(f"metrics={name!r} is not a sample metric; choose from {', '.join(SAMPLE_METRICS)}")
        self.extractor = extractor
        feature = FeatureInput(extractor.num_features)
        builders = {
            "fid": lambda: FrechetInceptionDistance(feature=feature, reset_real_features=False),
            "kid": lambda: KernelDistance(feature, kid_subsets, kid_subset_size),
            "prec_recall": lambda: PrecisionRecall(k=k),
        }
        self.metrics = nn.ModuleDict({name: builders[name]() for name in metrics})

    def add_real(self, features: Tensor) -> None:
        """Add real features (N, D); in a distributed run, on one rank only (see the module docstring)."""
        for metric in self.metrics.values():
            metric.update(features.to(self.device, torch.float64), real=True)

    @property
    def device(self) -> torch.device:
        """Where the metric states are (they follow `.to(device)`)."""
        return next(iter(self.metrics.values())).device

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """Add generated uint8 images (B, C, H, W)."""
        features = self.extractor(images.to(self.device)).to(torch.float64)
        for metric in self.metrics.values():
            metric.update(features, real=False)

    @torch.no_grad()
    def compute(self, seed: int = 0) -> dict[str, float]:
        scores = {}
        for name, metric in self.metrics.items():
            if name == "fid":
                scores["fid"] = float(metric.compute())
            elif name == "kid":
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    kid_mean, kid_std = metric.compute()
                scores["kid_mean"], scores["kid_std"] = float(kid_mean), float(kid_std)
            else:
                precision, recall = metric.compute()
                scores["precision"], scores["recall"] = float(precision), float(recall)
        return scores

    def reset(self) -> None:
        """Forget the fake features (the real ones stay)."""
        for metric in self.metrics.values():
            metric.reset()
