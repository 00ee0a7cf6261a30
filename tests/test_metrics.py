"""Metrics: FID / KID / precision-recall against closed forms and references, the real-feature cache, and the
variational bound of an exact-noise network against its hand value."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.metrics.extractors import ClassifierFeatures, InceptionFeatures, weights_hash
from diffusion_lab.metrics.loss_by_timestep import loss_by_timestep
from diffusion_lab.metrics.nll import variational_bound
from diffusion_lab.metrics.precision_recall import precision_recall
from diffusion_lab.metrics.real_features import real_features
from diffusion_lab.metrics.scores import SampleScores
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.models.components.classifier import ClassifierNet
from diffusion_lab.utils.errors import ConfigError


def save_classifier(path, seed: int, image_size: int = 16) -> str:
    """A feature_classifier checkpoint (random weights) as FeatureClassifierModule writes it."""
    torch.manual_seed(seed)
    net = ClassifierNet(channels=1, image_size=image_size, widths=(8,), feature_dim=16)
    for module in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {f"net.{name}": value for name, value in net.state_dict().items()}
    torch.save({"config": {}, "state_dict": state, "feature_classifier": {"net": net.config, "test_accuracy": 0.5}}, path)
    return str(path)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    return ClassifierFeatures(save_classifier(tmp_path_factory.mktemp("clf") / "clf.ckpt", seed=0))


@pytest.fixture(scope="module")
def images():
    """300 smooth random 16x16 grayscale uint8 images."""
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(300, 1, 4, 4, generator=generator)
    smooth = F.interpolate(low, size=16, mode="bilinear", align_corners=False)
    return (smooth * 255).round().to(torch.uint8)


def blur(images, sigma):
    radius = 3
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).float()
    out = F.conv2d(F.pad(images.float(), (radius,) * 4, mode="reflect"), (kernel[:, None] * kernel[None, :])[None, None])
    return out.round().clamp(0, 255).to(torch.uint8)


def add_noise(images, std):
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1)) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def fid_of(extractor, real, fake, metrics=("fid",)):
    scores = SampleScores(extractor, metrics, kid_subsets=20, kid_subset_size=100)
    scores.add_real(real_features_of(extractor, real))
    for batch in fake.split(64):
        scores.update(batch)
    return scores.compute()


def real_features_of(extractor, images):
    with torch.no_grad():
        return extractor(images)


def test_fid_of_a_set_against_itself_is_zero(extractor, images):
    features = real_features_of(extractor, images).double()
    scale = torch.cov(features.T).trace().item()
    assert abs(fid_of(extractor, images, images)["fid"]) < 1e-6 * scale


def test_fid_matches_the_reference_formula(extractor, images):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy's sqrtm as pytorch-fid computes it."""
    fake = blur(images, 1.0)
    f1, f2 = (real_features_of(extractor, x).double().numpy() for x in (images, fake))
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid_of(extractor, images, fake)["fid"] == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("degrade, levels", [(blur, (0.5, 1.0, 2.0)), (add_noise, (8.0, 24.0, 64.0))])
def test_fid_grows_with_degradation(extractor, images, degrade, levels):
    fids = [fid_of(extractor, images, degrade(images, level))["fid"] for level in levels]
    assert 0 < fids[0] < fids[1] < fids[2]


def test_kid_and_precision_recall_of_a_set_against_itself(extractor, images):
    scores = fid_of(extractor, images, images, metrics=("fid", "kid", "prec_recall"))
    assert abs(scores["kid_mean"]) < 1e-2 * fid_of(extractor, images, add_noise(images, 64.0), ("kid",))["kid_mean"]
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0


def test_every_sample_is_scored_once(extractor, images):
    scores = SampleScores(extractor, ("fid", "kid", "prec_recall"))
    scores.add_real(real_features_of(extractor, images))
    for batch in images[:103].split(25):  # uneven last batch
        scores.update(batch)
    assert int(scores.metrics["fid"].fake_features_num_samples) == 103
    assert sum(len(f) for f in scores.metrics["kid"].fake_features) == 103
    assert sum(len(f) for f in scores.metrics["prec_recall"].fake_features) == 103


def test_precision_recall_matches_brute_force():
    """Kynkaanniemi et al. 2019, Eq. 1-2, by explicit loops over points."""
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 2, generator=generator), torch.randn(30, 2, generator=generator) * 1.5 + 0.5

    def manifold_share(manifold, queries, k=3):
        radii = [sorted(float((p - q).norm()) for q in manifold)[k] for p in manifold]
        inside = [any(float((x - p).norm()) <= r for p, r in zip(manifold, radii)) for x in queries]
        return sum(inside) / len(queries)

    assert precision_recall(real, fake, k=3) == pytest.approx((manifold_share(real, fake), manifold_share(fake, real)))


def test_real_features_cache_is_reused_and_invalidated(tmp_path, extractor, images):
    first = real_features(extractor, images, tmp_path)
    again = real_features(extractor, images, tmp_path)
    assert not first.cached and again.cached and torch.equal(first.features, again.features)
    assert len(list(tmp_path.iterdir())) == 1

    other = ClassifierFeatures(save_classifier(tmp_path / "other.ckpt", seed=1))
    changed = real_features(other, images, tmp_path / "cache")
    assert not changed.cached and changed.extractor_hash != first.extractor_hash
    assert not torch.allclose(changed.features, first.features)

    new_data = real_features(extractor, images[:100], tmp_path)
    assert not new_data.cached and new_data.data_hash != first.data_hash
    assert torch.equal(new_data.features, first.features[:100])


def test_weights_hash_follows_the_weights(extractor):
    before, bias = weights_hash(extractor), extractor.net.head[-1].bias.detach().clone()
    with torch.no_grad():
        extractor.net.head[-1].bias.add_(1.0)  # the head is not part of the features but is part of the weights
    assert weights_hash(extractor) != before
    with torch.no_grad():
        extractor.net.head[-1].bias.copy_(bias)
    assert weights_hash(extractor) == before


def test_inception_weights_path_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="metrics.weights_path"):
        InceptionFeatures(str(tmp_path / "missing.pth"))


class ExactNoise(nn.Module):
    """Predicts the exact noise of x_t for a data set of one image x0: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""

    def __init__(self, x0, alphas_cumprod):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))  # gives the denoiser a dtype
        self.x0, self.alphas_cumprod = x0, alphas_cumprod

    def forward(self, x_t, t):
        alpha_bar = self.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
        return self.scale * (x_t - alpha_bar.sqrt() * self.x0) / (1 - alpha_bar).sqrt()


def standard_normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("variance", ["small", "large"])
def test_bound_of_exact_noise_network_equals_hand_value(variance):
    """With the exact x_0 every reverse mean equals the posterior mean, so the bound is, per dimension:
    prior KL(N(sqrt(ab_T) x, 1 - ab_T) || N(0, 1)) + sum_{t>=2} 0.5 (log(s_t^2 / bt_t) + bt_t / s_t^2 - 1)
    - log P(bin of x | N(x, s_1^2)), with s_t^2 = bt_t (small) or beta_t (large) and s_1^2 = bt_2 in both."""
    betas = beta_schedule("linear", 50, 1e-4, 0.2, 0.008, False)
    process = GaussianDiffusion(betas)
    x0 = (torch.tensor([0, 1, 64, 127, 128, 200, 254, 255], dtype=torch.float64) / 127.5 - 1).reshape(1, 1, 2, 4)
    net = ExactNoise(x0, process.alphas_cumprod)
    bound = variational_bound(process, net, x0, torch.Generator().manual_seed(0), variance=variance)

    b, ab = betas.tolist(), process.alphas_cumprod.tolist()
    bt = [b[t] * (1 - (ab[t - 1] if t else 1.0)) / (1 - ab[t]) for t in range(len(b))]
    kl_steps = 0.0
    if variance == "large":
        kl_steps = sum(0.5 * (math.log(b[t] / bt[t]) + bt[t] / b[t] - 1) for t in range(1, len(b)))
    sigma = math.sqrt(bt[1])
    nats = 0.0
    for x in x0.flatten().tolist():
        prior = 0.5 * (-math.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x * x - 1)
        if x == -1 or x == 1:
            mass = standard_normal_cdf(1 / (255 * sigma))
        else:
            mass = 2 * standard_normal_cdf(1 / (255 * sigma)) - 1
        nats += prior + kl_steps - math.log(mass)
    expected_bits_per_dim = nats / (x0.numel() * math.log(2))
    assert bound.total.item() == pytest.approx(expected_bits_per_dim, rel=1e-6)


class OffsetNoise(ExactNoise):
    """Exact noise plus c * t: its l2 loss on eps is exactly (c t)^2 at timestep t."""

    def forward(self, x_t, t):
        return super().forward(x_t, t) + 0.01 * t.reshape(-1, 1, 1, 1)


def test_loss_by_timestep_buckets_hold_their_timesteps_losses():
    betas = beta_schedule("linear", 100, 1e-4, 0.02, 0.008, False)
    process = GaussianDiffusion(betas, loss_type="l2")
    x0 = torch.zeros(64, 1, 2, 2, dtype=torch.float64)
    net = OffsetNoise(x0[:1], process.alphas_cumprod)
    model = DiffusionModel(net, process, (1, 2, 2))
    losses = loss_by_timestep(model, x0, torch.Generator().manual_seed(0), buckets=4, repeats=8)
    for k, loss in enumerate(losses.tolist()):  # bucket k holds u = t / T in [k / 4, (k + 1) / 4): t in [25 k, 25 k + 24]
        assert (0.01 * 25 * k) ** 2 - 1e-9 <= loss <= (0.01 * (25 * k + 24)) ** 2 + 1e-9
