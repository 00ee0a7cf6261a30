"""The network of the feature classifier (models/feature_classifier.py): a small CNN whose penultimate
pre-activation features serve FID / KID / precision-recall (`metrics.extractor=classifier`)."""

from torch import Tensor, nn

from diffusion_lab.utils.errors import ConfigError


class ClassifierNet(nn.Module):
    """[conv3x3-BN-ReLU x2, maxpool 2] per width, flatten, linear to `feature_dim` (the features), ReLU, dropout,
    linear to `num_labels` logits."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        num_labels: int = 10,
        widths: tuple[int, ...] = (16, 32),
        feature_dim: int = 128,
        dropout: float = 0.3,
    ):
        super().__init__()
        if image_size % 2 ** len(widths):
            raise ConfigError(
                f"model.widths={list(widths)} halves the image {len(widths)} times, but data.image_size={image_size} "
                f"is not divisible by {2 ** len(widths)}"
            )
        self.config = {"channels": channels, "image_size": image_size, "num_labels": num_labels,
                       "widths": list(widths), "feature_dim": feature_dim, "dropout": dropout}
        self.feature_dim = feature_dim
        layers, width_in = [], channels
        for width in widths:
            for i in range(2):
                layers += [nn.Conv2d(width_in if i == 0 else width, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            width_in = width
        side = image_size // 2 ** len(widths)
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(widths[-1] * side * side, feature_dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, num_labels))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate pre-activation features (B, feature_dim) of images in [-1, 1]."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
