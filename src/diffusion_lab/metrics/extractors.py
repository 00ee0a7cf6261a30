"""Feature extractors for FID / KID / precision-recall / IS / sFID: uint8 images (B, C, H, W) -> features (B, D).

Each has a `name`, `outputs` ({output: dimension}; `features` is what FID, KID and precision-recall compare) and
`forward_outputs(images)` giving all of them from one pass; grayscale is repeated to 3 channels where the network
takes RGB.

- `inception`: torch-fidelity's port of the TensorFlow FID Inception-v3 (Heusel et al. 2017; the graph of ADM's
  evaluator), its TF1 bilinear resize to 299 included: `features` the 2048-d pool_3, `logits_unbiased` for the
  Inception Score, `spatial` for sFID.
- `dinov2`: FD_DINOv2 (Stein et al. 2023, EDM2's default): the CLS token of DINOv2 ViT-L/14 after the final norm
  (1024-d), with EDM2's preprocessing (`calculate_metrics.py`, after dgm-eval): bicubic antialiased resize to 224,
  /255, ImageNet mean/std.
- `classifier`: the penultimate pre-activation features of the project's own classifier trained on the data
  set (`python train.py experiment=feature_classifier`), for scoring with no download; the package ships one for
  Fashion-MNIST (metrics/weights/README.md), the default where no `classifier_path` is given.

Inception and DINOv2 weights come from `metrics.weights_path`, else the torch hub cache; never a download (the
machine may be offline).
"""

import hashlib
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.metrics.dinov2 import DinoVisionTransformer
from diffusion_lab.models.components.classifier import ClassifierNet
from diffusion_lab.models.components.layers import rgb
from diffusion_lab.utils.checkpoint import load_checkpoint, submodule_state
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import hub_checkpoint

EXTRACTORS = ("inception", "dinov2", "classifier")
SHIPPED_CLASSIFIERS = {"fashion_mnist": Path(__file__).parent / "weights" / "fashion_mnist_classifier.pt"}  # at 28x28x1
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def weights_hash(module: nn.Module) -> str:
    """sha256 (first 16 hex digits) over the module's state dict, names and values, in a fixed order."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_file(weights_path: str | None, url: str, network: str) -> str:
    """`metrics.weights_path` if given (it must exist), else the torch hub cache's copy of `url`; ConfigError (one
    line naming both places and the URL) when absent."""
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise ConfigError(f"metrics.weights_path={weights_path} is not a file; download {url} there")
        return str(weights_path)
    if not hub_checkpoint(url).is_file():
        raise ConfigError(f"the {network} weights are absent: looked in metrics.weights_path (null) and "
                          f"{hub_checkpoint(url)}; download {url} to either, or use metrics.extractor=classifier")
    return str(hub_checkpoint(url))


class InceptionFeatures(nn.Module):
    """FID Inception-v3 (torch-fidelity's `FeatureExtractorInceptionV3`), three outputs from one pass:
    - `features`: pool_3, 2048-d (FID);
    - `logits_unbiased`: pool_3 @ W of the 1008-way classifier, no bias, as improved-gan and ADM's evaluator feed the
      Inception Score;
    - `spatial`: ADM's `mixed_6/conv` (the 1x1 branch of Mixed_6d, after its ReLU), first 7 channels of the 17x17
      map, flattened (H, W, C) as the TF tensor is: 2023-d (sFID, Nash et al. 2021)."""

    name = "inception"
    outputs = {"features": 2048, "logits_unbiased": 1008, "spatial": 17 * 17 * 7}
    num_features = 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = weights_file(weights_path, INCEPTION_URL, "FID Inception")
        try:
            self.inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], path)
        except Exception as error:  # not a state dict of this network
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"{path} is not the FID Inception weights ({first}); download {INCEPTION_URL}") from None

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # never leaves evaluation mode (BatchNorm statistics stay fixed)

    def forward_outputs(self, images: Tensor) -> dict[str, Tensor]:
        spatial = []
        hook = self.inception.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: spatial.append(out))
        try:
            pool, logits = self.inception(rgb(images))
        finally:
            hook.remove()
        return {"features": pool, "logits_unbiased": logits, "spatial": spatial[0][:, :7].permute(0, 2, 3, 1).flatten(1)}

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_outputs(images)["features"]


class DinoV2Features(nn.Module):
    """FD_DINOv2 features: the CLS token of DINOv2 ViT-L/14 after the final norm (1024-d). Preprocessing as EDM2's
    `DINOv2Detector` (resize_mode 'torch'): bicubic antialiased resize to 224 x 224, x / 255, (x - mean) / std with
    ImageNet's mean and std. The ViT's width and depth are read from the file, so other dinov2 ViT/14 sizes load too;
    FD_DINOv2 is ViT-L/14's, and the weights hash in the protocol says which was used."""

    name = "dinov2"
    input_size = 224

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        path = weights_file(weights_path, DINOV2_URL, "DINOv2 ViT-L/14")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ConfigError(f"{path} is not a readable weights file ({type(error).__name__}); download {DINOV2_URL}") from None
        self.net = DinoVisionTransformer.from_state_dict(state, path)
        self.num_features = self.net.embed_dim
        self.outputs = {"features": self.num_features}

    def train(self, mode: bool = True) -> "DinoV2Features":
        return super().train(False)

    def forward_outputs(self, images: Tensor) -> dict[str, Tensor]:
        return {"features": self(images)}

    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(rgb(images).float(), size=(self.input_size,) * 2, mode="bicubic", antialias=True) / 255
        mean, std = (torch.tensor(values, device=x.device).view(1, 3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
        return self.net((x - mean) / std)


class ClassifierFeatures(nn.Module):
    """Penultimate pre-activation features of a `FeatureClassifier` checkpoint (images scaled to [-1, 1])."""

    name = "classifier"

    def __init__(self, checkpoint_path: str):
        super().__init__()
        if checkpoint_path is None:
            raise ConfigError(
                f"metrics.classifier_path=null and no classifier ships for this data set (shipped: "
                f"{', '.join(SHIPPED_CLASSIFIERS)} at 28x28); train one with `python train.py "
                "experiment=feature_classifier data=<data set>` and pass its checkpoint"
            )
        self.net, self.test_accuracy = load_classifier(checkpoint_path, "metrics.classifier_path")
        self.num_features = self.net.feature_dim
        self.outputs = {"features": self.num_features}

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)  # never leaves evaluation mode (BatchNorm statistics stay fixed)

    def forward_outputs(self, images: Tensor) -> dict[str, Tensor]:
        return {"features": self(images)}

    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(images.float() / 127.5 - 1)


def load_classifier(checkpoint_path: str, key: str) -> tuple[ClassifierNet, float]:
    """The frozen network of a feature_classifier checkpoint (a run's .ckpt or a shipped file) and its recorded test
    accuracy; ConfigError naming `key` for a missing file or another kind of checkpoint."""
    checkpoint = load_checkpoint(checkpoint_path, key=key)
    if "feature_classifier" not in checkpoint:
        raise ConfigError(f"{key}={checkpoint_path} is not a feature_classifier checkpoint (python train.py "
                          "experiment=feature_classifier writes one)")
    record = checkpoint["feature_classifier"]
    net = ClassifierNet(**record["net"])
    net.load_state_dict(submodule_state(checkpoint["state_dict"], "net"))
    return net.eval().requires_grad_(False), record["test_accuracy"]


def shipped_classifier(data_config: Mapping) -> str | None:
    """The shipped classifier weights of a data config's data set at its native 28x28 grayscale, else None."""
    path = SHIPPED_CLASSIFIERS.get(data_config.get("dataset"))
    native = data_config.get("image_size") == 28 and data_config.get("channels") == 1
    return str(path) if path is not None and native else None


def data_option(data_config: Mapping) -> str:
    """A data config as the command line chooses it: its data set, or for prepared shards `shards data.root=ROOT`."""
    if data_config.get("dataset"):
        return str(data_config["dataset"])
    kind = "latent_shards" if "LatentShards" in str(data_config.get("_target_")) else "shards"
    return f"{kind} data.root={data_config.get('root')}"


def classifier_path_for(options: Mapping, data_config: Mapping) -> str | None:
    """`metrics.classifier_path`, else the shipped classifier of the data set; where `metrics.extractor=classifier`
    has neither, ConfigError naming the command that trains one."""
    path = options.get("classifier_path") or shipped_classifier(data_config)
    if path is None and options.get("extractor") == "classifier":
        name, size, channels = data_option(data_config), data_config.get("image_size"), data_config.get("channels")
        raise ConfigError(
            f"no classifier ships for data={name} at {size}x{size}x{channels} (shipped: {', '.join(SHIPPED_CLASSIFIERS)} "
            f"at 28x28x1) and metrics.classifier_path=null; train one with `python train.py experiment=feature_classifier "
            f"data={name}` and pass metrics.classifier_path=<its checkpoints/last.ckpt>, or use metrics.extractor=inception"
        )
    return path


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
    if extractor == "dinov2":
        return DinoV2Features(weights_path)
    if extractor == "classifier":
        return ClassifierFeatures(classifier_path)
    raise ConfigError(f"metrics.extractor={extractor!r} is not an extractor; choose one of {', '.join(EXTRACTORS)}")
