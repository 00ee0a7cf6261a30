"""FID, KID, precision/recall, Inception Score and sFID of generated images against cached real features, through
torchmetrics.

The extractor runs once per image; torchmetrics' `FrechetInceptionDistance` (Heusel et al. 2017) and
`KernelInceptionDistance` (Binkowski et al. 2018) receive its features through an identity `feature` module,
so their states, distributed reduction and formulas are torchmetrics' own. sFID is the same Frechet distance over
the extractor's `spatial` output, IS a function of its `logits_unbiased` (METRIC_INPUTS). Real features are loaded
on global rank 0 only: the states are summed / gathered over ranks, so every real image counts once and every sample
(each rank scoring its own share) counts once.
"""

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from diffusion_lab.metrics.precision_recall import PrecisionRecall
from diffusion_lab.utils.errors import ConfigError

SAMPLE_METRICS = ("fid", "kid", "prec_recall", "is", "sfid")
METRIC_INPUTS = {"fid": "features", "kid": "features", "prec_recall": "features", "is": "logits_unbiased", "sfid": "spatial"}


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


class InceptionScore(Metric):
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), p(y|x) the softmax of the logits, p(y) its mean over
    a split; the mean and (population) std over `splits` contiguous splits [i N / splits, (i + 1) N / splits) in
    sample order, as improved-gan's `inception_score` (ADM's evaluator: splits of 5000, i.e. 10 at N = 50,000)."""

    full_state_update = False

    def __init__(self, splits: int = 10):
        super().__init__()
        if splits < 1:
            raise ConfigError(f"metrics.is.splits={splits}; it must be >= 1 (10 as in Salimans et al.)")
        self.splits = splits
        self.add_state("logits", [], dist_reduce_fx="cat")

    def update(self, logits: Tensor) -> None:
        self.logits.append(logits)

    def compute(self) -> tuple[Tensor, Tensor]:
        logits = dim_zero_cat(self.logits).double()
        if len(logits) < self.splits:
            raise ConfigError(f"the Inception Score over metrics.is.splits={self.splits} splits needs as many samples; "
                              f"got {len(logits)}")
        bounds = [i * len(logits) // self.splits for i in range(self.splits + 1)]
        scores = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            log_p = logits[start:end].log_softmax(1)  # log p(y|x)
            log_marginal = log_p.logsumexp(0) - torch.log(torch.tensor(end - start, dtype=log_p.dtype))  # log p(y)
            scores.append((log_p.exp() * (log_p - log_marginal)).sum(1).mean().exp())
        scores = torch.stack(scores)
        return scores.mean(), scores.std(unbiased=False)


class SampleScores(nn.Module):
    """Real features go in with `add_real(features[, output])`, generated images with `update(images)`; `compute()`
    gives {fid, kid_mean, kid_std, precision, recall, is_mean, is_std, sfid} for the metrics asked. KID uses subsets
    of min(kid_subset_size, N); IS `is_splits` splits."""

    def __init__(
        self,
        extractor: nn.Module,
        metrics: tuple[str, ...] = ("fid",),
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        k: int = 3,
        is_splits: int = 10,
    ):
        super().__init__()
        for name in metrics:
            if name not in SAMPLE_METRICS:
                raise ConfigError(f"metrics={name!r} is not a sample metric; choose from {', '.join(SAMPLE_METRICS)}")
            if METRIC_INPUTS[name] not in extractor.outputs:
                raise ConfigError(f"metrics={name} needs the Inception {METRIC_INPUTS[name]} (metrics.extractor=inception); "
                                  f"metrics.extractor={extractor.name} gives {', '.join(extractor.outputs)} only")
        self.extractor = extractor
        feature = FeatureInput(extractor.num_features)
        builders = {
            "fid": lambda: FrechetInceptionDistance(feature=feature, reset_real_features=False),
            "kid": lambda: KernelDistance(feature, kid_subsets, kid_subset_size),
            "prec_recall": lambda: PrecisionRecall(k=k),
            "is": lambda: InceptionScore(is_splits),
            "sfid": lambda: FrechetInceptionDistance(feature=FeatureInput(extractor.outputs["spatial"]),
                                                     reset_real_features=False),
        }
        self.metrics = nn.ModuleDict({name: builders[name]() for name in metrics})

    @property
    def real_inputs(self) -> tuple[str, ...]:
        """The extractor outputs of real images that the metrics compare with (IS needs none)."""
        return tuple(dict.fromkeys(METRIC_INPUTS[name] for name in self.metrics if name != "is"))

    def add_real(self, features: Tensor, output: str = "features") -> None:
        """Add real features (N, D) of one extractor output; in a distributed run, on one rank only (see the module
        docstring)."""
        for name, metric in self.metrics.items():
            if name != "is" and METRIC_INPUTS[name] == output:
                metric.update(features.to(self.device, torch.float64), real=True)

    @property
    def device(self) -> torch.device:
        """Where the metric states are (they follow `.to(device)`)."""
        return next(iter(self.metrics.values())).device

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """Add generated uint8 images (B, C, H, W)."""
        outputs = self.extractor.forward_outputs(images.to(self.device))
        for name, metric in self.metrics.items():
            features = outputs[METRIC_INPUTS[name]].to(torch.float64)
            if name == "is":
                metric.update(features)
            else:
                metric.update(features, real=False)

    @torch.no_grad()
    def compute(self, seed: int = 0) -> dict[str, float]:
        scores = {}
        for name, metric in self.metrics.items():
            if name in ("fid", "sfid"):
                scores[name] = float(metric.compute())
            elif name == "is":
                is_mean, is_std = metric.compute()
                scores["is_mean"], scores["is_std"] = float(is_mean), float(is_std)
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
