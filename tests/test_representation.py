"""REPA and the dispersive loss (issue 28): each loss against its formula written out here, the hidden states of every
backbone, gradients that reach the projector and the backbone's blocks up to the aligned one and never the encoder,
the same gradients under gradient checkpointing, and one-line errors for bad options."""

import math

import pytest
import torch

from diffusion_lab.diffusion.representation import dispersive_loss, repa_loss
from diffusion_lab.metrics.dinov2 import DinoVisionTransformer
from diffusion_lab.metrics.encoders import load_patch_encoder
from diffusion_lab.models.components.classifier import ClassifierNet
from diffusion_lab.models.components.ddpm_unet import DDPMUNet
from diffusion_lab.models.components.dit import DiT
from diffusion_lab.models.components.features import HiddenStates, hidden_layer
from diffusion_lab.models.components.unet_attn import UnetAttn
from diffusion_lab.models.components.uvit import UViT
from diffusion_lab.models.representation import RepresentationTerms
from diffusion_lab.utils.errors import ConfigError

BACKBONES = {  # 16x16 grayscale; (net, the hidden states' (width, grid) at each depth)
    "dit": (lambda: DiT(1, 16, depth=3, hidden_size=16, num_heads=2, patch_size=2), [(16, 8)] * 3),
    "uvit": (lambda: UViT(1, 16, depth=3, hidden_size=16, num_heads=2, patch_size=4, num_classes=3), [(16, 4)] * 3),
    "unet_attn": (lambda: UnetAttn(8, [1, 2], 1, 16, attn_heads=1, attn_dim_head=8),
                  [(8, 16), (8, 16), (8, 8), (8, 8), (16, 8), (16, 8)]),
    "ddpm_unet": (lambda: DDPMUNet(1, 16, ch=8, ch_mult=[1, 2], norm_groups=4, num_res_blocks=1),
                  [(8, 16), (16, 8), (16, 8), (16, 8)]),
}


def classifier_file(path, widths=(8,), image_size=16, seed=0) -> str:
    """A feature_classifier checkpoint of random weights, in the layout `extractors.ship_classifier` writes."""
    torch.manual_seed(seed)
    net = ClassifierNet(1, image_size, widths=widths, feature_dim=16)
    torch.save({"config": {}, "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "feature_classifier": {"net": net.config, "test_accuracy": 0.5}}, path)
    return str(path)


def test_repa_loss_is_the_mean_negative_cosine_per_sample_and_minus_one_when_aligned():
    projected, target = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    expected = [-sum(float(p @ t / (p.norm() * t.norm())) for p, t in zip(projected[b], target[b])) / 5 for b in range(3)]
    torch.testing.assert_close(repa_loss(projected, target).double(), torch.tensor(expected, dtype=torch.float64))
    aligned = projected * torch.rand(3, 5, 1, dtype=torch.float64).add(0.1)  # each token scaled by its own c > 0
    torch.testing.assert_close(repa_loss(aligned, projected), torch.full((3,), -1.0))


def test_dispersive_loss_is_the_papers_formula_and_its_gradient_spreads_the_batch():
    hidden = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    z, size, tau = hidden.detach().flatten(1), 12, 0.7
    total = sum(math.exp(-float((z[i] - z[j]).pow(2).sum()) / (tau * size)) for i in range(6) for j in range(6))
    loss = dispersive_loss(hidden, tau)
    assert float(loss.detach()) == pytest.approx(math.log(total / 36), rel=1e-6)
    assert float(dispersive_loss(torch.ones(4, 7))) == pytest.approx(0.0, abs=1e-7)  # one point: the maximum, log 1
    assert float(dispersive_loss(torch.eye(4) * 1e3)) == pytest.approx(-math.log(4))  # far apart: the minimum
    loss.backward()
    spread = lambda x: torch.pdist(x.flatten(1)).pow(2).sum()  # noqa: E731
    stepped = hidden.detach() - 0.1 * hidden.grad
    assert spread(stepped) > spread(hidden.detach())
    assert dispersive_loss(stepped, tau) < loss


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_gives_hidden_states_of_its_documented_shape(name, one_thread):
    make, shapes = BACKBONES[name]
    net = make().train()
    assert [(layer.width, layer.grid) for layer in net.hidden_layers()] == shapes
    states = HiddenStates({str(d): hidden_layer(net, d, "depth") for d in range(1, len(shapes) + 1)})
    labels = {"class_labels": torch.tensor([0, 1])} if name == "uvit" else {}
    with torch.no_grad():  # sampling records nothing
        net(torch.randn(2, 1, 16, 16), torch.rand(2), **labels)
    assert all(not recorded for recorded in states.recorded.values())
    net(torch.randn(2, 1, 16, 16), torch.rand(2), **labels)
    tokens = states.take()
    assert [tuple(tokens[str(d)].shape) for d in range(1, len(shapes) + 1)] == [(2, g * g, w) for w, g in shapes]


def test_dit_hidden_states_are_the_tokens_after_depth_blocks(one_thread):
    net = BACKBONES["dit"][0]().train()
    torch.nn.init.normal_(net.blocks[0].adaLN_modulation[-1].weight)  # blocks that are not the identity
    states = HiddenStates({"h": hidden_layer(net, 1, "depth")})
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    net(x, t)
    tokens = net.x_embedder(x).flatten(2).transpose(1, 2) + net.pos_embed
    torch.testing.assert_close(states.take()["h"], net.blocks[0](tokens, net.t_embedder(t)))


def repa_terms(net, tmp_path, depth=1, **options) -> RepresentationTerms:
    encoder = load_patch_encoder("classifier", classifier_file(tmp_path / "encoder.ckpt"))
    return RepresentationTerms(net, repa_weight=0.5, repa_depth=depth, encoder=encoder, projector_dim=32, **options)


def test_gradients_reach_the_projector_and_the_blocks_up_to_the_aligned_one_never_the_encoder(tmp_path, one_thread):
    net = BACKBONES["dit"][0]().train()
    terms = repa_terms(net, tmp_path, depth=2)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    net(images, torch.rand(4))
    loss = terms.weighted(terms(images))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in terms.projector.parameters())
    assert net.blocks[1].adaLN_modulation[-1].weight.grad.abs().sum() > 0 and net.x_embedder.weight.grad.abs().sum() > 0
    assert net.blocks[2].adaLN_modulation[-1].weight.grad is None and net.final_layer.linear.weight.grad is None
    encoder = terms.encoder.net
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    assert not any(name.startswith("encoder") for name in terms.state_dict())  # frozen, never saved


def test_terms_and_gradients_are_the_same_under_gradient_checkpointing(tmp_path, one_thread):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = DiT(1, 16, depth=3, hidden_size=16, num_heads=2, patch_size=2, gradient_checkpointing=checkpointing)
        terms = repa_terms(net.train(), tmp_path, depth=2, disp_weight=0.25)
        torch.manual_seed(1)
        images, t = torch.rand(4, 1, 16, 16) * 2 - 1, torch.rand(4)
        (net(images, t).square().mean() + terms.weighted(terms(images))).backward()
        grads.append([p.grad.clone() for p in [*net.parameters(), *terms.parameters()] if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


def test_a_second_training_forward_before_the_terms_is_refused(tmp_path, one_thread):
    net = BACKBONES["dit"][0]().train()
    terms = RepresentationTerms(net, disp_weight=0.5)
    net(torch.randn(2, 1, 16, 16), torch.rand(2))
    net(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ConfigError, match="ran 2"):
        terms(None)


def test_dinov2_encoder_in_the_real_layout_gives_patch_tokens_on_the_backbone_grid(tmp_path, one_thread):
    vit = DinoVisionTransformer(embed_dim=64, depth=1, patch_size=14, img_size=28)
    torch.save(vit.state_dict(), tmp_path / "dinov2.pth")
    encoder = load_patch_encoder("dinov2", str(tmp_path / "dinov2.pth"))
    features = encoder(torch.rand(2, 1, 16, 16) * 2 - 1, grid=3)
    assert features.shape == (2, 9, 64) and encoder.width == 64
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("make, match", [
    (lambda tmp: load_patch_encoder("classifier", str(tmp / "absent.ckpt")), "is not a file"),
    (lambda tmp: load_patch_encoder("clip", classifier_file(tmp / "c.ckpt")), "is not an encoder"),
    (lambda tmp: load_patch_encoder("dinov2", classifier_file(tmp / "c.ckpt")), "not a DINOv2 ViT checkpoint"),
    (lambda tmp: load_patch_encoder("classifier", save({"config": {}, "state_dict": {}}, tmp / "x.ckpt")),
     "not a feature_classifier checkpoint"),
    (lambda tmp: RepresentationTerms(BACKBONES["dit"][0](), disp_weight=0.5, disp_depth=4), "depths 1..3"),
    (lambda tmp: repa_terms(BACKBONES["ddpm_unet"][0](), tmp, depth=0), "depths 1..4"),
    (lambda tmp: RepresentationTerms(BACKBONES["dit"][0](), repa_weight=0.5), "needs an encoder"),
    (lambda tmp: RepresentationTerms(torch.nn.Linear(2, 2), disp_weight=0.5), "offers no hidden states"),
])
def test_bad_options_are_one_line(make, match, tmp_path):
    with pytest.raises(ConfigError, match=match) as error:
        make(tmp_path)
    assert "\n" not in str(error.value)


def save(value, path) -> str:
    torch.save(value, path)
    return str(path)
