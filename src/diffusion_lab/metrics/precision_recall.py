"""Improved precision and recall (Kynkaanniemi et al. 2019): k-nearest-neighbour manifolds in feature space."""

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def knn_radii(features: Tensor, k: int, batch_size: int = 1024) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    return torch.cat(
        [torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(batch_size)]
    )


def coverage(manifold: Tensor, radii: Tensor, queries: Tensor, batch_size: int = 1024) -> Tensor:
    """Fraction of `queries` inside the manifold: within radii[i] of some manifold point i   (Eq. 1-2)."""
    inside = [
        (torch.cdist(chunk, manifold) <= radii[None, :]).any(dim=1) for chunk in queries.split(batch_size)
    ]
    return torch.cat(inside).double().mean()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """precision = share of fake samples on the real manifold; recall = share of real samples on the fake one."""
    real, fake = real.double(), fake.double()
    precision = coverage(real, knn_radii(real, k), fake)
    recall = coverage(fake, knn_radii(fake, k), real)
    return float(precision), float(recall)


class PrecisionRecall(Metric):
    """`precision_recall` as a torchmetrics Metric over features, gathered from all ranks before computing."""

    full_state_update = False

    def __init__(self, k: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.k = k
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        (self.real_features if real else self.fake_features).append(features)

    def compute(self) -> tuple[Tensor, Tensor]:
        precision, recall = precision_recall(dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features), self.k)
        return torch.tensor(precision), torch.tensor(recall)

    def reset(self) -> None:
        """Forget the fake features; the real ones stay (as torchmetrics' reset_real_features=False)."""
        real_features = self.real_features
        super().reset()
        self.real_features = real_features
