"""The tutorial backbones: parameter counts against the reference implementations, one call shape at 28x28x1 and
32x32x3 wherever the design allows, clear ConfigErrors where it does not."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_lab.models.components.ddpm_unet import DDPMUNet
from diffusion_lab.models.components.dpm2015_net import DPM2015Net
from diffusion_lab.models.components.simple_unet import SimpleUNet
from diffusion_lab.models.components.small_unet import SmallUNet
from diffusion_lab.utils.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")

# tiny widths for CPU; each entry: (factory(channels, image_size, out_channels, num_classes), sizes it runs at)
TINY = {
    "ddpm_unet": (lambda c, s, o, n: DDPMUNet(c, s, ch=16, ch_mult=[1, 2, 2], norm_groups=8, out_channels=o, num_classes=n), (28, 32)),
    "simple_unet": (lambda c, s, o, n: SimpleUNet(c, s, dims=[8, 16, 16, 16], time_dim=16, out_channels=o, num_classes=n), (28, 32)),
    "small_unet": (lambda c, s, o, n: SmallUNet(c, s, dim=4, time_emb_dim=8, out_channels=o, num_classes=n), (28,)),
    "dpm2015": (
        lambda c, s, o, n: DPM2015Net(c, s, timesteps=50, n_hidden_conv=8, n_layers_conv=2, n_scales=2,
                                      n_hidden_dense_lower=16, out_channels=o, num_classes=n),
        (28, 32),
    ),
}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "ch_mult, expected",
    # trainable parameters of the reference implementation (w86763777/pytorch-ddpm, tutorial 004's model)
    [([1, 2, 2, 2], 35_746_307), ([1, 2, 2, 1], 26_841_859)],
)
def test_ddpm_unet_parameter_count_matches_reference(ch_mult, expected):
    with torch.device("meta"):
        net = DDPMUNet(channels=3, image_size=32, ch=128, ch_mult=ch_mult, attn_levels=[1], num_res_blocks=2, dropout=0.1)
    assert count(net) == expected


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_call_shape(name, channels, size):
    factory, sizes = TINY[name]
    if size not in sizes:
        with pytest.raises(ConfigError, match="image_size"):
            factory(channels, size, None, None)
        return
    torch.manual_seed(0)
    out_channels = 2 * channels  # e.g. a learned variance, or dpm2015's mean and variance coefficients
    net = factory(channels, size, out_channels, None).eval()
    x, t = torch.randn(2, channels, size, size), torch.tensor([0.0, 7.5])  # t may be fractional
    out = net(x, t, x_self_cond=None, class_labels=None)
    assert out.shape == (2, out_channels, size, size) and torch.isfinite(out).all()
    assert not torch.equal(net(x, t + 3), out)  # depends on t (ddpm_unet starts near zero: 1e-5 output gain)


@pytest.mark.parametrize("name", ["ddpm_unet", "simple_unet", "small_unet"])
def test_class_conditioning_with_null_class(name):
    factory, sizes = TINY[name]
    torch.manual_seed(0)
    net = factory(1, 28, None, 3).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([4.0, 4.0])
    null = net(x, t, class_labels=torch.tensor([3, 3]))
    assert torch.allclose(net(x, t), null)  # no labels = the null class (index num_classes)
    # a fresh class embedding is random, so a real class changes the output
    assert not torch.equal(net(x, t, class_labels=torch.tensor([0, 1])), null)


def test_dpm2015_refuses_classes_and_other_processes():
    with pytest.raises(ConfigError, match="class"):
        DPM2015Net(1, 28, timesteps=10, num_classes=10)
    with pytest.raises(ConfigError, match="process=dpm2015"):
        DPM2015Net(1, 28, timesteps=10, out_channels=1)


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: DDPMUNet(1, 28, ch=16, ch_mult=[1, 2, 2, 2], norm_groups=8), "image_size=28"),
        (lambda: DDPMUNet(3, 32, ch=16, ch_mult=[1, 2], norm_groups=32), "norm_groups=32"),
        (lambda: DDPMUNet(3, 32, ch=16, ch_mult=[1, 2], attn_levels=[2], norm_groups=8), "attn_levels"),
        (lambda: SmallUNet(3, 32), "image_size=32"),
        (lambda: DPM2015Net(3, 30, timesteps=10, n_scales=3), "n_scales=3"),
    ],
)
def test_impossible_shapes_raise_config_error(build, key):
    with pytest.raises(ConfigError, match=key):
        build()


def test_simple_unet_pads_to_its_multiple_and_crops():
    """At 28x28 the net sees the zero-padded 32x32 image: its output is that of the padded input, cropped."""
    torch.manual_seed(0)
    net = TINY["simple_unet"][0](1, 28, None, None).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3.0, 9.0])
    assert torch.allclose(net(x, t), net(F.pad(x, (0, 4, 0, 4)), t)[..., :28, :28], atol=1e-6)


def test_dpm2015_temporal_basis_is_the_reference_bump_basis():
    """phi_k(t) at integer t: Gaussian bumps over linspace(-1, 1, T), centres linspace(-1, 1, K), width half the
    centre spacing, normalized over k (reference code `generate_temporal_basis`)."""
    timesteps, k = 50, 10
    net = DPM2015Net(1, 8, timesteps=timesteps, n_temporal_basis=k, n_hidden_dense_lower=0)
    centres = [-1 + 2 * j / (k - 1) for j in range(k)]
    width = (centres[1] - centres[0]) / 2
    for t in (0, 17, 49):
        x = -1 + 2 * t / (timesteps - 1)
        g = torch.tensor([math.exp(-((x - c) ** 2) / (2 * width**2)) for c in centres])
        torch.testing.assert_close(net.temporal_basis(torch.tensor([float(t)]))[0], g / g.sum())

