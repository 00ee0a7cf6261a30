"""A small image classifier trained on the data set itself, whose penultimate pre-activation features serve FID /
KID / precision-recall (`metrics.extractor=classifier`) on machines with no Inception download.

    python train.py experiment=feature_classifier data=fashion_mnist
"""

from typing import Any, Callable

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn

from diffusion_lab.models.components.classifier import ClassifierNet
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.lr_schedules import optimizers_and_schedulers


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
        shape = model.config["channels"], model.config["image_size"], model.config["image_size"]
        self.example_input_array = torch.zeros(1, *shape)  # Lightning's model summary counts forward's FLOPs on it

    def forward(self, images: Tensor) -> Tensor:
        """The class logits of images."""
        return self.net(images)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        logits = self(images)
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
