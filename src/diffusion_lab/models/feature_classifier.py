"""A small image classifier trained on the data set itself, whose penultimate pre-activation features serve FID /
KID / precision-recall (`metrics.extractor=classifier`) on machines with no Inception download.

    python train.py experiment=feature_classifier data=fashion_mnist
"""

from typing import Any, Callable

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn

from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.lr_schedules import optimizers_and_schedulers


class ClassifierNet(nn.Module):
    """[conv3x3-BN-ReLU x2, maxpool 2] per width, flatten, linear to `feature_dim` (the features), ReLU, dropout,
    linear to `num_labels` logits. `out_channels` / `num_classes` are the backbone builder's arguments (diffusion
    output, class conditioning): a classifier uses neither."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        num_labels: int = 10,
        widths: tuple[int, ...] = (16, 32),
        feature_dim: int = 128,
        dropout: float = 0.3,
        out_channels: int | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        if num_classes is not None:
            raise ConfigError("data.conditional=true does not apply to model=feature_classifier; set data.conditional=false")
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


class FeatureClassifierModule(LightningModule):
    """Cross-entropy training of a `ClassifierNet`. After each validation it also measures the accuracy on the
    data set's test split (`test/acc`); every checkpoint records the test accuracy of its weights, with the
    network's arguments, under `checkpoint["feature_classifier"]`."""

    def __init__(
        self,
        model: ClassifierNet,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
        run_config: dict | None = None,
    ):
        super().__init__()
        self.net = model
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.seed, self.run_config = seed, run_config or {}
        self.test_accuracy: float | None = None
        self._test_accuracy_step = -1

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=sync, batch_size=len(labels))
        self.log(f"{stage}/acc", accuracy, prog_bar=True, sync_dist=sync, batch_size=len(labels))
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    @torch.no_grad()
    def measure_test_accuracy(self) -> float:
        """Accuracy of the current weights on the data module's test split."""
        datamodule = self.trainer.datamodule
        datamodule.setup("test")
        was_training = self.net.training
        self.net.eval()
        correct = total = 0
        for images, labels in datamodule.test_dataloader():
            images, labels = images.to(self.device), labels.to(self.device)
            correct += int((self.net(images).argmax(1) == labels).sum())
            total += len(labels)
        self.net.train(was_training)
        self._test_accuracy_step = self.global_step
        return correct / total

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.test_accuracy = self.measure_test_accuracy()
            self.log("test/acc", self.test_accuracy, prog_bar=True)

    def configure_optimizers(self) -> dict:
        return optimizers_and_schedulers(self.net.parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._test_accuracy_step != self.global_step:  # e.g. max_steps stopped training between validations
            self.test_accuracy = self.measure_test_accuracy()
        checkpoint["config"] = self.run_config
        checkpoint["feature_classifier"] = {"net": self.net.config, "test_accuracy": self.test_accuracy}
