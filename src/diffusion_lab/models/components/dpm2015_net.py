"""The network of Sohl-Dickstein et al. 2015 (Sec. 3 and App. D.2.1; tutorial 002): a lower part of
multi-scale convolution layers with, in parallel, an optional dense MLP over the whole image, and an upper
per-pixel MLP giving, for each pixel and colour, 2 x n_temporal_basis coefficients. The temporal readout
weights them with bump functions of t to give the reverse process's mean and variance coefficients. The
network does not see t before the readout.

Output (B, 2C, H, W): channels [0, C) are mu_coeff, [C, 2C) beta_coeff; the `dpm2015` process turns them into
the mean and variance of p(x_{t-1} | x_t).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.utils.errors import ConfigError


def leaky_relu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, negative_slope=0.05)


class MultiScaleConvolution(nn.Module):
    """mean over scales s of upsample_{2^s}(LeakyReLU(conv_s(avgpool_{2^s}(x)))), summed coarse to fine;
    weights N(0, (sqrt(1/filters) / filter_size^2)^2), zero bias (reference code)."""

    def __init__(self, dim: int, filters: int, num_scales: int, filter_size: int = 3):
        super().__init__()
        self.convs = nn.ModuleList()
        for _ in range(num_scales):
            conv = nn.Conv2d(dim, filters, filter_size, padding=(filter_size - 1) // 2)
            nn.init.normal_(conv.weight, std=math.sqrt(1 / filters) / filter_size**2)
            nn.init.zeros_(conv.bias)
            self.convs.append(conv)

    def forward(self, x: Tensor) -> Tensor:
        acc = 0
        for scale in reversed(range(len(self.convs))):
            acc = acc + leaky_relu(self.convs[scale](F.avg_pool2d(x, 2**scale) if scale else x))
            if scale:
                acc = F.interpolate(acc, scale_factor=2, mode="nearest")
        return acc / len(self.convs)


def dense_mlp(widths: list[int], last_activation: bool) -> nn.Sequential:
    """Linear layers with orthogonal weights and zero bias, LeakyReLU between (and after the last if asked)."""
    layers = []
    for i, (d, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(d, d_out)
        nn.init.orthogonal_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(widths) - 2 or last_activation:
            layers.append(nn.LeakyReLU(0.05))
    return nn.Sequential(*layers)


class DPM2015Net(nn.Module):
    """Defaults are the paper's MNIST/CIFAR-10 network (reference code defaults). n_hidden_dense_lower=0 or
    n_layers_dense_lower=0 drops the dense branch (then any image size works; with it the size is fixed)."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        timesteps: int,
        n_temporal_basis: int = 10,
        n_hidden_conv: int = 20,
        n_layers_conv: int = 4,
        n_scales: int = 1,
        n_hidden_dense_lower: int = 500,
        n_hidden_dense_lower_output: int = 2,
        n_layers_dense_lower: int = 4,
        n_hidden_dense_upper: int = 20,
        n_layers_dense_upper: int = 2,
        out_channels: int | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        if num_classes is not None:
            raise ConfigError("model=dpm2015 has no class conditioning; set data.conditional=false")
        if out_channels is not None and out_channels != 2 * channels:
            raise ConfigError(
                f"model=dpm2015 reads out a reverse mean and variance per pixel ({2 * channels} channels), but the "
                f"process wants {out_channels}; use it with process=dpm2015"
            )
        if timesteps < 2 or n_temporal_basis < 2:
            raise ConfigError(
                f"model=dpm2015 needs schedule.timesteps >= 2 and model.n_temporal_basis >= 2 "
                f"(got {timesteps} and {n_temporal_basis})"
            )
        if min(n_hidden_conv, n_layers_conv, n_scales, n_hidden_dense_upper, n_layers_dense_upper) < 1:
            raise ConfigError("model.n_hidden_conv, n_layers_conv, n_scales, n_hidden_dense_upper, n_layers_dense_upper must be >= 1")
        if image_size % 2 ** (n_scales - 1):
            raise ConfigError(
                f"model.n_scales={n_scales} average-pools by up to {2 ** (n_scales - 1)}, which must divide "
                f"data.image_size={image_size}"
            )
        self.channels, self.timesteps, self.n_temporal_basis = channels, timesteps, n_temporal_basis
        self.n_hidden_conv = n_hidden_conv
        self.conv = nn.Sequential(
            *(MultiScaleConvolution(channels if i == 0 else n_hidden_conv, n_hidden_conv, n_scales) for i in range(n_layers_conv))
        )
        dense = n_hidden_dense_lower > 0 and n_layers_dense_lower > 0
        self.dense_output = n_hidden_dense_lower_output if dense else 0
        self.dense = (
            dense_mlp(
                [channels * image_size**2, *[n_hidden_dense_lower] * (n_layers_dense_lower - 1),
                 n_hidden_dense_lower_output * image_size**2],
                last_activation=True,
            )
            if dense
            else None
        )
        self.upper = dense_mlp(
            [n_hidden_conv + self.dense_output, *[n_hidden_dense_upper] * (n_layers_dense_upper - 1),
             channels * 2 * n_temporal_basis],
            last_activation=False,
        )
        self.register_buffer("basis_centers", torch.linspace(-1, 1, n_temporal_basis), persistent=False)

    def temporal_basis(self, t: Tensor) -> Tensor:
        """phi_k(t) = g_k(x) / sum_j g_j(x), g_k(x) = exp(-(x - c_k)^2 / (2 w^2)), x = 2 t / (T - 1) - 1, centres c_k
        evenly spaced in [-1, 1], w half their spacing (reference code `generate_temporal_basis`). (B, K)."""
        x = 2 * t.float()[:, None] / (self.timesteps - 1) - 1
        width = (self.basis_centers[1] - self.basis_centers[0]) / 2
        g = torch.exp(-((x - self.basis_centers) ** 2) / (2 * width**2))
        return g / g.sum(dim=1, keepdim=True)

    def forward(self, x: Tensor, t: Tensor, *, x_self_cond: Tensor | None = None, class_labels: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        y = self.conv(x).permute(0, 2, 3, 1)  # (B, H, W, n_hidden_conv)
        if self.dense is not None:
            y_dense = self.dense(x.flatten(1)).reshape(b, h, w, self.dense_output)
            y = torch.cat([y / math.sqrt(self.n_hidden_conv), y_dense / math.sqrt(self.dense_output)], dim=3)
        z = self.upper(y).reshape(b, h, w, c, 2, self.n_temporal_basis)
        coeffs = torch.einsum("bhwcik,bk->bichw", z, self.temporal_basis(t).to(z.dtype))  # (B, 2, C, H, W)
        return coeffs.reshape(b, 2 * c, h, w)
