"""The standard extractors with randomly initialised weights in their real layouts: DINOv2 ViT-L/14 (FD_DINOv2) and the
FID Inception-v3 (FID, Inception Score, sFID), each against an independent computation on the same features."""

import json
import math
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchvision.transforms.functional import normalize

from test_evaluation import tiny_checkpoint
from test_pipeline import compose_sample
from diffusion_lab.metrics.__main__ import main as metrics_main
from diffusion_lab.metrics.dinov2 import DinoVisionTransformer
from diffusion_lab.metrics.extractors import (DINOV2_URL, DinoV2Features, InceptionFeatures, classifier_path_for,
                                              weights_hash)
from diffusion_lab.metrics.reference_stats import read_stats, write_stats
from diffusion_lab.metrics.scores import InceptionScore, SampleScores
from diffusion_lab.sample import sample
from diffusion_lab.utils.errors import ConfigError
from tiny_run import image_folder


def dinov2_vitl14_layout() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of dinov2_vitl14_pretrain.pth, written from facebookresearch/dinov2: hub/backbones.py builds
    vit_large (embed_dim 1024, depth 24, 16 heads, mlp_ratio 4) with patch 14, img_size 518, init_values 1.0 (layer
    scale), ffn_layer mlp, block_chunks 0, no register tokens; vision_transformer.py registers cls_token, pos_embed
    (1 + 37 * 37 tokens), mask_token (1, D), blocks, norm; layers/ name norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
    mlp.fc1, mlp.fc2, ls2.gamma (patch_embed.norm and head are Identity)."""
    dim, hidden = 1024, 4096
    layout = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + 37 * 37, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(24):
        block = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
                 "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "ls1.gamma": (dim,),
                 "norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,),
                 "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,), "ls2.gamma": (dim,)}
        layout.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    return layout


def test_the_vit_has_exactly_the_keys_and_shapes_of_dinov2_vitl14():
    with torch.device("meta"):
        net = DinoVisionTransformer()
    assert {name: tuple(value.shape) for name, value in net.state_dict().items()} == dinov2_vitl14_layout()
    rebuilt = DinoVisionTransformer.from_state_dict(
        {name: torch.empty(shape, device="meta") for name, shape in dinov2_vitl14_layout().items()}, "vitl14.pth")
    assert (rebuilt.embed_dim, len(rebuilt.blocks), rebuilt.blocks[0].attn.num_heads) == (1024, 24, 16)
    with pytest.raises(ConfigError, match="vitl14.pth is not a DINOv2 ViT checkpoint"):
        DinoVisionTransformer.from_state_dict({**net.state_dict(), "register_tokens": torch.empty(1, 4, 1024)}, "vitl14.pth")


def random_dinov2(embed_dim: int = 128, depth: int = 2) -> dict[str, torch.Tensor]:
    """A reduced DINOv2 ViT/14 (2 heads of 64, 518 px grid) with every parameter random, as a state dict."""
    torch.manual_seed(0)
    state = DinoVisionTransformer(embed_dim=embed_dim, depth=depth).state_dict()
    for name, value in state.items():
        if name.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight")):
            value.uniform_(0.5, 1.5)
        else:
            value.normal_(0, 1.0 if name in ("pos_embed", "cls_token") else 0.1)
    return state


@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_small.pth"
    torch.save(random_dinov2(), path)
    return str(path)


def reference_dinov2(state: dict, images: torch.Tensor) -> torch.Tensor:
    """The FD_DINOv2 features written independently: EDM2's preprocessing (gray -> RGB, bicubic antialiased resize to
    224, /255, torchvision's ImageNet normalisation), then the ViT from its state dict with torch.nn.MultiheadAttention
    (its in_proj is dinov2's qkv: rows [q; k; v], heads contiguous) and functional LayerNorm / GELU."""
    x = F.interpolate(images.repeat(1, 3, 1, 1).float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    x = normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    dim, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    tokens = torch.cat([state["cls_token"].expand(len(x), 1, dim), tokens.flatten(2).transpose(1, 2)], dim=1)
    grid, rows = math.isqrt(state["pos_embed"].shape[1] - 1), 224 // patch
    pos = state["pos_embed"][:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, scale_factor=((rows + 0.1) / grid,) * 2, mode="bicubic").permute(0, 2, 3, 1)
    tokens = tokens + torch.cat([state["pos_embed"][:, :1], pos.reshape(1, rows * rows, dim)], dim=1)
    for i in range(1 + max(int(name.split(".")[1]) for name in state if name.startswith("blocks."))):
        p = {name[len(f"blocks.{i}."):]: value for name, value in state.items() if name.startswith(f"blocks.{i}.")}
        attention = nn.MultiheadAttention(dim, dim // 64, batch_first=True)
        attention.load_state_dict({"in_proj_weight": p["attn.qkv.weight"], "in_proj_bias": p["attn.qkv.bias"],
                                   "out_proj.weight": p["attn.proj.weight"], "out_proj.bias": p["attn.proj.bias"]})
        h = F.layer_norm(tokens, (dim,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        tokens = tokens + p["ls1.gamma"] * attention(h, h, h, need_weights=False)[0]
        h = F.layer_norm(tokens, (dim,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        tokens = tokens + p["ls2.gamma"] * F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
                                                    p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return F.layer_norm(tokens, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)[:, 0]


def smooth_images(count: int, seed: int, cells: int = 4, size: int = 28) -> torch.Tensor:
    """Random cells x cells grayscale patterns, bilinearly upsampled to uint8 size x size."""
    low = torch.rand(count, 1, cells, cells, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(low, size=size, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def scipy_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)) of two feature sets, in float64 with scipy."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root.real))


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
@torch.no_grad()
def test_fd_dinov2_equals_an_independent_computation_on_the_same_features(dinov2_weights, one_thread):
    extractor = DinoV2Features(dinov2_weights)
    real, fake = smooth_images(160, seed=0), smooth_images(160, seed=1, cells=8)
    state = torch.load(dinov2_weights, weights_only=True)
    reference = [reference_dinov2(state, images).double().numpy() for images in (real, fake)]
    assert np.allclose(extractor(fake).numpy(), reference[1], atol=1e-4)  # the forward, from its own code
    scores = SampleScores(extractor, ("fid",))
    scores.add_real(extractor(real))
    for batch in fake.split(64):
        scores.update(batch)
    expected = scipy_frechet_distance(reference[1], reference[0])
    assert expected > 0.1 and scores.compute()["fid"] == pytest.approx(expected, rel=1e-3)


def test_dinov2_weights_come_from_weights_path_or_the_hub_cache_else_one_line(dinov2_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / "dinov2_vitl14_pretrain.pth"
    with pytest.raises(ConfigError, match=re.escape(f"looked in metrics.weights_path (null) and {cached}; download {DINOV2_URL}")):
        DinoV2Features()
    with pytest.raises(ConfigError, match=f"metrics.weights_path={tmp_path / 'no.pth'} is not a file; download"):
        DinoV2Features(str(tmp_path / "no.pth"))
    cached.parent.mkdir(parents=True)
    cached.write_bytes(Path(dinov2_weights).read_bytes())
    assert weights_hash(DinoV2Features()) == weights_hash(DinoV2Features(dinov2_weights))


def test_metrics_that_need_inception_outputs_refuse_other_extractors(dinov2_weights):
    with pytest.raises(ConfigError, match="metrics=is needs the Inception logits_unbiased .metrics.extractor=inception."):
        SampleScores(DinoV2Features(dinov2_weights), ("fid", "is"))


@pytest.mark.parametrize("made_by, read_as", [("dinov2", "inception"), ("inception", "dinov2"), ("classifier", "dinov2")])
def test_a_reference_of_another_extractor_is_refused(tmp_path, made_by, read_as):
    write_stats(tmp_path / "ref.npz", torch.randn(10, 3), made_by, "0123456789abcdef")
    with pytest.raises(ConfigError, match=f"statistics of extractor {made_by} .*not of {read_as}"):
        read_stats(tmp_path / "ref.npz", read_as, "0123456789abcdef")


def test_no_classifier_for_mnist_names_the_command_that_trains_one():
    mnist = {"dataset": "mnist", "image_size": 28, "channels": 1}
    with pytest.raises(ConfigError, match=re.escape("train one with `python train.py experiment=feature_classifier data=mnist`")):
        classifier_path_for({"extractor": "classifier", "classifier_path": None}, mnist)
    assert classifier_path_for({"extractor": "inception", "classifier_path": None}, mnist) is None


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Random FID Inception-v3 weights in torch-fidelity's layout (its own modules' initialisation), BatchNorm
    statistics taken from a batch so activations stay O(1), the 1008-way classifier scaled for peaked softmaxes."""
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # running statistics = those of the batch below
            module.reset_running_stats()
    batch = smooth_images(2, seed=5).repeat(1, 3, 1, 1)
    with torch.no_grad():
        net.train()(batch)
        pool = net.eval()(batch)[0]
        net.fc.weight.normal_()
        net.fc.weight.mul_(4 / (pool @ net.fc.weight.T).std())
        net.fc.bias.normal_()  # must not enter the Inception Score
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def inception_score_scipy(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """improved-gan's inception_score: exp(mean_x KL(p(y|x) || p(y))) over splits [i N / s, (i + 1) N / s)."""
    probs, n = scipy.special.softmax(logits, axis=1), len(logits)
    scores = []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        kl = scipy.stats.entropy(part, np.broadcast_to(part.mean(0), part.shape), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def reference_inception(weights_path: str, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The Inception outputs taken independently: torch-fidelity's network loaded on its own; the spatial features
    from the output of Mixed_6d (ADM's mixed_6; its first channels are its 1x1 branch, mixed_6/conv), (H, W, C)
    flattened as the TF tensor; the logits from pool_3 and the weights file's fc.weight, with no bias."""
    net = FeatureExtractorInceptionV3("reference", ["2048"], weights_path)
    mixed_6 = []
    net.Mixed_6d.register_forward_hook(lambda module, args, out: mixed_6.append(out))
    with torch.no_grad():
        pool = net(images.repeat(1, 3, 1, 1))[0].double().numpy()
    fc_weight = torch.load(weights_path, weights_only=True)["fc.weight"].double().numpy()
    spatial = mixed_6[0][:, :7].permute(0, 2, 3, 1).reshape(len(images), -1).double().numpy()
    return {"features": pool, "logits_unbiased": pool @ fc_weight.T, "spatial": spatial}


def low_rank_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance of two sets of n < D features in closed form: with A, B the centred features,
    S_a = A^T A / (n - 1) and Tr (S_a S_b)^(1/2) = ||A B^T||_* / (n - 1) (the nonzero eigenvalues of S_a S_b are those
    of M M^T, M = A B^T / (n - 1)), so no D x D square root is needed."""
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    cross = scipy.linalg.svdvals(centred_a @ centred_b.T).sum() / (len(a) - 1)
    traces = ((centred_a**2).sum() + (centred_b**2).sum()) / (len(a) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + traces - 2 * cross)


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
@torch.no_grad()
def test_inception_outputs_and_inception_score_equal_independent_computations(inception_weights):
    extractor = InceptionFeatures(inception_weights)
    fake = smooth_images(5, seed=3)
    reference = reference_inception(inception_weights, fake)
    outputs = extractor.forward_outputs(fake)
    assert {name: tuple(value.shape) for name, value in outputs.items()} == {
        "features": (5, 2048), "logits_unbiased": (5, 1008), "spatial": (5, 7 * 17 * 17)}
    for name, value in outputs.items():
        assert np.allclose(value.double().numpy(), reference[name], rtol=1e-4, atol=1e-5), name
    inception_score = InceptionScore(splits=2)  # SampleScores feeds it logits_unbiased (the slow sample.py test below)
    inception_score.update(outputs["logits_unbiased"].double())
    is_mean, is_std = inception_score_scipy(reference["logits_unbiased"], splits=2)
    assert is_mean > 1.5 and tuple(map(float, inception_score.compute())) == pytest.approx((is_mean, is_std), rel=1e-4)
    too_few = InceptionScore(splits=6)
    too_few.update(outputs["logits_unbiased"])
    with pytest.raises(ConfigError, match="metrics.is.splits=6 splits needs as many samples; got 5"):
        too_few.compute()


@pytest.mark.slow  # two Frechet distances of 2,000-d features (torchmetrics' eigenvalues): about 30 s on 2 cores
@torch.no_grad()
def test_inception_fid_and_sfid_equal_independent_computations(inception_weights):
    extractor = InceptionFeatures(inception_weights)
    real, fake = smooth_images(5, seed=2), smooth_images(5, seed=3, cells=8)
    scores = SampleScores(extractor, ("fid", "sfid"))
    for output, features in extractor.forward_outputs(real).items():
        scores.add_real(features, output)
    scores.update(fake)
    ours = scores.compute()
    reference = [reference_inception(inception_weights, images) for images in (real, fake)]
    for name, output in (("fid", "features"), ("sfid", "spatial")):
        expected = low_rank_frechet_distance(reference[1][output], reference[0][output])
        assert expected > 0.01 and ours[name] == pytest.approx(expected, rel=1e-4), name


def folder_checkpoint(root: Path) -> Path:
    """A tiny checkpoint on 8x8 grayscale folder data with 16 validation images (the real split scored against)."""
    data = ["data=folder", f"data.root={image_folder(root / 'images')}", "data.image_size=8", "data.channels=1",
            "data.val_size=16"]
    return tiny_checkpoint(root, ["sampler=ddim", "sampler.steps=2"], data=data)[1]


def test_sample_py_and_the_metrics_command_score_fd_dinov2(dinov2_weights, tmp_path, capsys, one_thread):
    options = ["metrics.extractor=dinov2", f"metrics.weights_path={dinov2_weights}", "metrics.real_split=val",
               f"metrics.cache_dir={tmp_path / 'cache'}"]
    paths = sample(compose_sample([f"ckpt_path={folder_checkpoint(tmp_path)}", "num_samples=6", "batch_size=6",
                                   "device=cpu", "metrics=[fid]", *options, f"output_dir={tmp_path / 'out'}"]))
    scored = json.loads(paths["metrics"].read_text())
    assert scored["protocol"]["extractor"] == "dinov2" and scored["fid"] > 0
    assert scored["protocol"]["extractor_hash"] == weights_hash(DinoV2Features(dinov2_weights))

    data = ["data=folder", f"data.root={tmp_path / 'images'}", "data.image_size=8", "data.channels=1", "data.val_size=16"]
    metrics_main([str(paths["samples"]), *data, *options, f"output={tmp_path / 'again.json'}"])
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["fid"] == pytest.approx(scored["fid"], rel=1e-6)  # the same samples, real split and extractor
    write_stats(tmp_path / "classifier_ref.npz", torch.randn(10, 3), "classifier", "0123456789abcdef")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        metrics_main([str(paths["samples"]), *data, *options, f"ref={tmp_path / 'classifier_ref.npz'}"])
    err = capsys.readouterr().err
    assert "statistics of extractor classifier" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("overrides, message", [
    (["metrics=[fid,is]", "metrics.is.splits=2", "metrics.extractor=dinov2"], "metrics=is needs the Inception logits_unbiased"),
    (["metrics=[fid]", "metrics.extractor=dinov2", "metrics.weights_path=absent.pth"], "weights_path=absent.pth is not a file"),
    (["metrics=[fid]", "metrics.extractor=classifier"], "train one with `python train.py experiment=feature_classifier data=folder`"),
])
def test_sample_py_refuses_a_scoring_it_cannot_do_before_sampling(dinov2_weights, tmp_path, overrides, message):
    options = [f"metrics.weights_path={dinov2_weights}", *overrides, f"metrics.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        sample(compose_sample([f"ckpt_path={folder_checkpoint(tmp_path)}", "num_samples=2", "batch_size=2", "device=cpu",
                               *options, f"output_dir={tmp_path / 'out'}"]))
    assert not (tmp_path / "out" / "samples.npz").exists()


@pytest.mark.slow  # 22 images through Inception-v3 at 299 px and a 2023-d Frechet distance on the CPU
def test_sample_py_reports_is_and_sfid_with_the_inception_extractor(inception_weights, tmp_path):
    paths = sample(compose_sample([
        f"ckpt_path={folder_checkpoint(tmp_path)}", "num_samples=6", "batch_size=6", "device=cpu",
        "metrics=[is,sfid]", "metrics.is.splits=2", "metrics.extractor=inception",
        f"metrics.weights_path={inception_weights}", "metrics.real_split=val", f"metrics.cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'out'}"]))
    scored = json.loads(paths["metrics"].read_text())
    assert all(np.isfinite(scored[name]) for name in ("is_mean", "is_std", "sfid")) and "fid" not in scored
    assert scored["is_mean"] >= 1 and scored["protocol"]["is_splits"] == 2
    assert scored["protocol"]["extractor_hash"] == weights_hash(InceptionFeatures(inception_weights))
    assert [path.name.split("-")[0] for path in (tmp_path / "cache").iterdir()] == ["inception_spatial"]  # IS: no real
