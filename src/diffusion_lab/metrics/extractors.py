"""Feature extractors for FID / KID / precision-recall: uint8 images (B, C, H, W) -> features (B, D).

- `inception`: the 2048-d pool features of the FID Inception-v3 (Heusel et al. 2017), torch-fidelity's port of
  the TensorFlow graph as torchmetrics uses it; grayscale is repeated to 3 channels.
- `classifier`: the penultimate pre-activation features of the project's own classifier trained on the data
  set (`python train.py experiment=feature_classifier`), for scoring with no download; the package ships one for
  Fashion-MNIST (metrics/weights/README.md), the default where no `classifier_path` is given.
"""

import hashlib
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from diffusion_lab.utils.errors import ConfigError

EXTRACTORS = ("inception", "classifier")
SHIPPED_CLASSIFIERS = {"fashion_mnist": Path(__file__).parent / "weights" / "fashion_mnist_classifier.pt"}  # at 28x28x1
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


def weights_hash(module: nn.Module) -> str:
    """sha256 (first 16 hex digits) over the module's state dict, names and values, in a fixed order."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def inception_cache() -> Path:
    """Where torch-fidelity (through torchmetrics) keeps the FID Inception weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


class InceptionFeatures(nn.Module):
    """FID Inception-v3 pool features (2048-d); weights from `weights_path`, else the torch hub cache (never a
    download: the machine may be offline)."""

    name = "inception"
    num_features = 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        if weights_path is not None and not Path(weights_path).is_file():
            raise ConfigError(f"metrics.weights_path={weights_path} is not a file; download {INCEPTION_URL} there")
        if weights_path is None and not inception_cache().is_file():
            raise ConfigError(f"the FID Inception weights are absent: looked in metrics.weights_path (null) and "
                              f"{inception_cache()}; download {INCEPTION_URL} to either, or use metrics.extractor=classifier")
        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
        )

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return self.inception(images)


class ClassifierFeatures(nn.Module):
    """Penultimate pre-activation features of a `FeatureClassifier` checkpoint (images scaled to [-1, 1])."""

    name = "classifier"

    def __init__(self, checkpoint_path: str):
        super().__init__()
        from diffusion_lab.models.feature_classifier import ClassifierNet
        from diffusion_lab.utils.checkpoint import load_checkpoint, submodule_state

        if checkpoint_path is None:
            raise ConfigError(
                f"metrics.classifier_path=null and no classifier ships for this data set (shipped: "
                f"{', '.join(SHIPPED_CLASSIFIERS)} at 28x28); train one with `python train.py "
                "experiment=feature_classifier data=<data set>` and pass its checkpoint"
            )
        checkpoint = load_checkpoint(checkpoint_path, key="metrics.classifier_path")
        if "feature_classifier" not in checkpoint:
            raise ConfigError(f"metrics.classifier_path={checkpoint_path} is not a feature_classifier checkpoint")
        record = checkpoint["feature_classifier"]
        self.net = ClassifierNet(**record["net"])
        self.net.load_state_dict(submodule_state(checkpoint["state_dict"], "net"))
        self.net.eval().requires_grad_(False)
        self.test_accuracy = record["test_accuracy"]
        self.num_features = self.net.feature_dim

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)  # never leaves evaluation mode (BatchNorm statistics stay fixed)

    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(images.float() / 127.5 - 1)


def shipped_classifier(data_config: Mapping) -> str | None:
    """The shipped classifier weights of a data config's data set at its native 28x28 grayscale, else None."""
    path = SHIPPED_CLASSIFIERS.get(data_config.get("dataset"))
    native = data_config.get("image_size") == 28 and data_config.get("channels") == 1
    return str(path) if path is not None and native else None


def ship_classifier(checkpoint_path: str, out_path: str, command: str) -> None:
    """What `ClassifierFeatures` reads of a feature_classifier checkpoint (the net's weights and arguments, its test
    accuracy, the training command), as a small weights_only-loadable file."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = {name: value for name, value in checkpoint["state_dict"].items() if name.startswith("net.")}
    torch.save({"config": {"command": command, "data": checkpoint["config"]["data"]["dataset"]}, "state_dict": state,
                "feature_classifier": checkpoint["feature_classifier"]}, out_path)


def build_extractor(extractor: str, weights_path: str | None = None, classifier_path: str | None = None) -> nn.Module:
    """The extractor named by `metrics.extractor`."""
    if extractor == "inception":
        return InceptionFeatures(weights_path)
    if extractor == "classifier":
        return ClassifierFeatures(classifier_path)
    raise ConfigError(f"metrics.extractor={extractor!r} is not an extractor; choose one of {', '.join(EXTRACTORS)}")
