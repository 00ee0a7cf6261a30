"""DiT and U-ViT: the papers' parameter counts and GFLOPs on the meta device, adaLN-Zero blocks the identity at
initialisation, shapes for every data shape and patch size, the null class and guidance, one-line errors; gradient
checkpointing equal to none for every backbone; the presets build and a tiny run trains and samples."""

import copy
from functools import partial

import numpy as np
import pytest
import torch
from conftest import CONFIGS, TINY, compose_train, needs_fashion_mnist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch.utils.flop_counter import FlopCounterMode

from diffusion_lab.builders import build_net, build_process
from diffusion_lab.models.components.cross_attention import ClassTokens
from diffusion_lab.models.components.ddpm_unet import DDPMUNet
from diffusion_lab.models.components.dit import DiT
from diffusion_lab.models.components.unet_attn import UnetAttn
from diffusion_lab.models.components.uvit import UViT
from diffusion_lab.utils.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TRANSFORMERS = {  # tiny widths: factory(channels, image_size, patch_size, out_channels, num_classes)
    "dit": lambda c, s, p, o, n: DiT(c, s, patch_size=p, depth=2, hidden_size=32, num_heads=2, out_channels=o, num_classes=n),
    "uvit": lambda c, s, p, o, n: UViT(c, s, patch_size=p, depth=3, hidden_size=32, num_heads=2, out_channels=o, num_classes=n),
}
# Fashion-MNIST, CIFAR-10, and the latents of experiment=autoencoder_fashion_mnist / autoencoder_cifar10
SHAPES = [(1, 28), (3, 32), (2, 14), (4, 8)]


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def randomize_zeros(net: torch.nn.Module) -> torch.nn.Module:
    """Fill the zero-initialised parameters (adaLN-Zero, output layer, biases) with N(0, 0.02) values, so that the
    output depends on every input."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return net


def dit_on_meta(size: str, patch_size: int) -> DiT:
    """DiT-size/patch_size for 256x256 ImageNet in the paper's setting: 32x32x4 latents, 1000 classes, learned sigma."""
    with torch.device("meta"):
        return DiT(4, 32, size=size, patch_size=patch_size, out_channels=8, num_classes=1000)


@pytest.mark.parametrize("size, params_m, gflops", [("S", 33, 6.06), ("B", 130, 23.01), ("L", 458, 80.71),
                                                    ("XL", 675, 118.64)])
def test_dit_sizes_match_the_papers_table_1(size, params_m, gflops):
    """Parameters (millions, the paper's rounding) and forward Gflops per image of DiT-size/2, Peebles & Xie 2023
    Table 1. The paper counts a multiply-add as one flop (fvcore); FlopCounterMode counts two."""
    net = dit_on_meta(size, 2)
    assert round(count(net) / 1e6) == params_m
    with torch.device("meta"):
        x, t, labels = torch.empty(1, 4, 32, 32), torch.empty(1), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        net(x, t, class_labels=labels)
    assert counter.get_total_flops() / 2 / 1e9 == pytest.approx(gflops, rel=0.02)


def test_dit_xl2_parameters_equal_the_reference_implementation():
    """facebookresearch/DiT's DiT-XL/2 has 675,129,632 parameters, its frozen 256 x 1152 sin-cos position embedding
    included; here that embedding is a buffer."""
    assert count(dit_on_meta("XL", 2)) == 675_129_632 - 256 * 1152


@pytest.mark.parametrize("kwargs, params_m", [
    (dict(channels=3, image_size=32, depth=13, hidden_size=512, num_heads=8), 44),  # U-ViT-S/2, CIFAR-10
    (dict(channels=4, image_size=32, depth=29, hidden_size=1152, num_heads=16, num_classes=1000), 501),  # U-ViT-H/2
])
def test_uvit_sizes_match_the_paper(kwargs, params_m):
    """Bao et al. 2023, Table 1 (U-ViT-S, 13 layers) and the 256x256 ImageNet latent model (U-ViT-H/2, 29 layers)."""
    with torch.device("meta"):
        net = UViT(patch_size=2, **kwargs)
    assert round(count(net) / 1e6) == params_m


def test_dit_blocks_are_the_identity_and_the_output_zero_at_initialisation():
    torch.manual_seed(0)
    net = TRANSFORMERS["dit"](1, 28, 2, 2, 10)
    tokens, c = torch.randn(2, 196, 32), torch.randn(2, 32)
    for block in net.blocks:
        assert torch.equal(block(tokens, c), tokens)
    out = net(torch.randn(2, 1, 28, 28), torch.tensor([3.0, 500.0]), class_labels=torch.tensor([1, 10]))
    assert out.shape == (2, 2, 28, 28) and not out.any()


def test_dit_output_patch_depends_only_on_its_input_patch():
    """With identity blocks (adaLN-Zero at init) each token goes from its patch to the same place of the output:
    patchify and unpatchify agree on rows, columns and channels."""
    torch.manual_seed(0)
    net = TRANSFORMERS["dit"](3, 32, 4, 3, None)
    randomize_zeros(net.final_layer)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    net(x, torch.tensor([5.0]))[0, :, 4:8, 8:12].sum().backward()  # output patch (row 1, column 2)
    touched = x.grad[0].abs().sum(0) > 0
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[4:8, 8:12] = True
    assert torch.equal(touched, expected)


@pytest.mark.parametrize("name", TRANSFORMERS)
@pytest.mark.parametrize("patch_size", [2, 4, 8])
@pytest.mark.parametrize("channels, size", SHAPES)
def test_call_shape_for_every_data_shape_and_patch_size(name, patch_size, channels, size):
    factory = TRANSFORMERS[name]
    if size % patch_size:
        with pytest.raises(ConfigError, match=f"model.patch_size={patch_size} must divide data.image_size={size}"):
            factory(channels, size, patch_size, None, None)
        return
    torch.manual_seed(0)
    net = randomize_zeros(factory(channels, size, patch_size, 2 * channels, None)).eval()  # learned variance: 2C
    x, t = torch.randn(2, channels, size, size), torch.tensor([-1.5, 0.25])  # t may be negative or fractional
    out = net(x, t, class_labels=None, x_self_cond=None)
    assert out.shape == (2, 2 * channels, size, size) and torch.isfinite(out).all()
    assert not torch.allclose(net(x, t * 100 + 7), out)  # depends on t


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_no_labels_are_the_null_class_and_a_guidance_batch_is_two_batches(name):
    """Classifier-free guidance runs the conditional and the null-class batch as one batch of twice the size: the
    output of each half must be that of its own forward."""
    torch.manual_seed(0)
    net = randomize_zeros(TRANSFORMERS[name](2, 8, 2, 4, 3)).eval()
    assert net.num_classes == 3 and not net.self_condition
    x, t = torch.randn(4, 2, 8, 8), torch.tensor([1.0, 5.0, 12.0, 29.0])
    labels, null = torch.tensor([0, 1, 2, 1]), torch.full((4,), 3)
    unconditional = net(x, t, class_labels=null)
    assert torch.allclose(net(x, t), unconditional)  # no labels = the null class (index num_classes)
    conditional = net(x, t, class_labels=labels)
    assert not torch.allclose(conditional, unconditional, atol=1e-4)
    both = net(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, null]))
    torch.testing.assert_close(both, torch.cat([conditional, unconditional]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("build, message", [
    (lambda: DiT(1, 28, hidden_size=96, num_heads=5), "model.num_heads=5 must divide model.hidden_size=96"),
    (lambda: DiT(1, 28, depth=0), "model.depth=0 must be at least 1"),
    (lambda: DiT(1, 28, size="M"), "model.size=M is not a DiT size; one of S, B, L, XL"),
    (lambda: DiT(1, 28, hidden_size=18, num_heads=3), "model.hidden_size=18 must be divisible by 4"),
    (lambda: DiT(1, 28, patch_size=3), "model.patch_size=3 must divide data.image_size=28"),
    (lambda: UViT(1, 28, depth=8), "model.depth=8 must be odd"),
    (lambda: UViT(1, 28, depth=0), "model.depth=0 must be at least 1"),
    (lambda: UViT(1, 28, hidden_size=100, num_heads=3), "model.num_heads=3 must divide model.hidden_size=100"),
])
def test_bad_shapes_are_one_line_config_errors(build, message):
    with pytest.raises(ConfigError, match=message) as error:
        build()
    assert "\n" not in str(error.value)


BACKBONES = {  # factory(gradient_checkpointing), one of its checkpointed blocks, num_classes
    "unet_attn": (partial(UnetAttn, 8, [1, 2], 1, 8, attn_heads=1, attn_dim_head=8, num_classes=3,
                          context_encoder=partial(ClassTokens, dim=8, num_tokens=2)), lambda net: net.downs[0][0]),
    "ddpm_unet": (partial(DDPMUNet, 1, 8, ch=8, ch_mult=[1, 2], attn_levels=[1], norm_groups=4, dropout=0.1,
                          num_classes=3), lambda net: net.down[0]),
    "dit": (partial(DiT, 1, 8, depth=2, hidden_size=16, num_heads=2, num_classes=3), lambda net: net.blocks[0]),
    "uvit": (partial(UViT, 1, 8, depth=3, hidden_size=16, num_heads=2, num_classes=3), lambda net: net.mid_block),
}


def forward_backward(net: torch.nn.Module, block: torch.nn.Module) -> tuple[torch.Tensor, dict, int]:
    """Output, parameter gradients and how often `block`'s forward ran, for one forward and backward pass."""
    calls = []
    hook = block.register_forward_pre_hook(lambda *args: calls.append(1))
    torch.manual_seed(1)
    out = net(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 17.5]), class_labels=torch.tensor([0, 3]))
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    hook.remove()
    return out, {name: p.grad for name, p in net.named_parameters()}, len(calls)


@pytest.mark.parametrize("name", BACKBONES)
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(name):
    """Training mode with checkpointing recomputes each block in the backward pass (its forward runs twice) and gives
    the outputs and gradients of the same weights without it; dropout (ddpm_unet) draws the same masks again."""
    factory, block_of = BACKBONES[name]
    torch.manual_seed(0)
    plain = randomize_zeros(factory(gradient_checkpointing=False)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing = True
    out, grads, calls = forward_backward(plain, block_of(plain))
    out_ckpt, grads_ckpt, calls_ckpt = forward_backward(checkpointed, block_of(checkpointed))
    assert (calls, calls_ckpt) == (1, 2)
    torch.testing.assert_close(out_ckpt, out, atol=1e-6, rtol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for key in grads:
        torch.testing.assert_close(grads_ckpt[key], grads[key], atol=1e-6, rtol=1e-6, msg=key)
    assert forward_backward(checkpointed.eval(), block_of(checkpointed))[2] == 1  # evaluation: no recomputation


def compose_experiment(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train.yaml", overrides=overrides)


@pytest.mark.parametrize("preset, shape, patch_size, depth, width", [
    ("dit_fashion_mnist", (1, 28, 28), 2, 6, 192),  # CPU-sized
    ("dit_cifar10", (3, 32, 32), 2, 12, 384),  # DiT-S
    ("latent_dit_cifar10", (4, 8, 8), 1, 12, 384),  # DiT-S on the latents of experiment=autoencoder_cifar10
])
def test_presets_build_a_class_conditional_dit_with_learned_sigma(preset, shape, patch_size, depth, width):
    overrides = [f"experiment={preset}"]
    if preset.startswith("latent"):  # the first stage's config as a checkpoint of experiment=autoencoder_cifar10 holds it
        autoencoder = compose_experiment(["experiment=autoencoder_cifar10"]).model
        fields = ",".join(f"{key}:{autoencoder[key]}" for key in ("image_size", "factor", "latent_channels"))
        overrides += ["first_stage_ckpt=unused", f"first_stage={{model:{{{fields}}}}}"]
    cfg = compose_experiment(overrides)
    assert (cfg.model.size, cfg.model.patch_size, cfg.process.loss_type, cfg.data.conditional) == (
        "S", patch_size, "hybrid", True)
    process = build_process(cfg)
    net = build_net(cfg, process)
    assert isinstance(net, DiT) and net.num_classes == 10
    assert (net.patch_size, len(net.blocks), net.pos_embed.shape[-1]) == (patch_size, depth, width)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out = net.eval()(x, torch.tensor([0.0, 999.0]), class_labels=torch.tensor([3, 10]))
    assert out.shape == (2, 2 * shape[0], *shape[1:])


TINY_RUN = [override for override in TINY if not override.startswith(("model.", "schedule."))]  # less U-Net and T
TINY_DIT = ["model=dit", "model.depth=2", "model.hidden_size=16", "model.num_heads=2", "model.patch_size=4"]


@needs_fashion_mnist
@pytest.mark.parametrize("overrides", [
    ["experiment=dit_fashion_mnist", *TINY_DIT, "schedule.timesteps=20"],
    ["model=uvit", "model.depth=3", "model.hidden_size=16", "model.num_heads=2", "model.patch_size=4",
     "data.conditional=true", "model.gradient_checkpointing=true", "schedule.timesteps=20"],
    ["experiment=rectified_flow_fashion_mnist", *TINY_DIT, "data.conditional=true"],
    ["experiment=edm_fashion_mnist", *TINY_DIT, "data.conditional=true"],
], ids=["dit_fashion_mnist", "uvit", "dit_rectified_flow", "dit_edm"])
def test_tiny_transformer_trains_and_samples_with_guidance(overrides, tmp_path):
    """Three steps on real Fashion-MNIST, under DDPM, rectified flow and EDM, reach every zero-initialised weight
    (adaLN-Zero, output layer, biases); sample.py draws guided samples from the checkpoint."""
    from diffusion_lab.sample import sample
    from diffusion_lab.train import train

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train.yaml", overrides=[*TINY_RUN, *overrides, f"paths.output_dir={tmp_path / 'run'}",
                                               f"paths.data_dir={tmp_path / 'data'}", "data.val_size=16"])
    zero_at_init = [k for k, v in build_net(cfg, build_process(cfg)).state_dict().items() if not v.any()]
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    trained = next(m for m in objects["module"].modules() if isinstance(m, (DiT, UViT))).state_dict()
    assert zero_at_init and [k for k in zero_at_init if not trained[k].any()] == []
    out = tmp_path / "samples"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        sample(compose("sample.yaml", overrides=[f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                                                 "num_samples=2", "batch_size=2", "trajectory_samples=1",
                                                 "class_labels=[0,1]", "guidance_scale=3", f"output_dir={out}",
                                                 "sampler.steps=5"]))
    samples = np.load(out / "samples.npz")["arr_0"]
    assert samples.dtype == np.uint8 and samples.shape == (2, 28, 28, 1)
