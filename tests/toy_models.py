"""Small deterministic stand-ins for a trained network, shared by the sampler and process tests."""

import torch
from torch import Tensor, nn

from diffusion_lab.samplers.sampling import DenoiserOutput


class TinyNet(nn.Module):
    """A fixed random network with the backbone signature net(x, t, *, x_self_cond, class_labels): a 3x3 conv
    whose output is modulated by sinusoids of t and an optional class embedding; nonlinear in x and t."""

    def __init__(self, channels: int = 2, out_channels: int | None = None, num_classes: int | None = None,
                 self_condition: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.channels, self.num_classes, self.self_condition = channels, num_classes, self_condition
        out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels * (2 if self_condition else 1), out_channels, 3, padding=1)
        self.freq = nn.Parameter(torch.randn(out_channels) * 0.02)
        self.class_emb = nn.Embedding(num_classes + 1, out_channels) if num_classes else None
        self.double()

    def forward(self, x: Tensor, t: Tensor, *, x_self_cond: Tensor | None = None,
                class_labels: Tensor | None = None) -> Tensor:
        if self.self_condition:
            x = torch.cat([x_self_cond if x_self_cond is not None else torch.zeros_like(x), x], dim=1)
        t = t.to(x.dtype).expand(x.shape[0])
        h = torch.tanh(self.conv(x)) + 0.3 * torch.sin(t[:, None] * self.freq)[:, :, None, None]
        if self.class_emb is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long)
            h = h + self.class_emb(class_labels)[:, :, None, None]
        return h


def gaussian_denoiser(mean: float, std: float):
    """The exact denoiser of data x_0 ~ N(mean, std^2 I) at any noise level: for x = alpha x_0 + sigma eps,
    E[x_0 | x] = mean + alpha std^2 (x - alpha mean) / (alpha^2 std^2 + sigma^2) (Gaussian conditioning)."""

    def denoise(x: Tensor, alpha: Tensor, sigma: Tensor) -> DenoiserOutput:
        x0 = mean + alpha * std**2 * (x - alpha * mean) / (alpha**2 * std**2 + sigma**2)
        return DenoiserOutput(x0, (x - alpha * x0) / sigma)

    return denoise


def gaussian_ode_solution(x_T: Tensor, alpha_T: Tensor, sigma_T: Tensor, alpha: Tensor, sigma: Tensor, mean: float,
                          std: float) -> Tensor:
    """The probability-flow ODE keeps (x - alpha mean) / sqrt(alpha^2 std^2 + sigma^2) constant for Gaussian data, so
    x at (alpha, sigma) from x_T at (alpha_T, sigma_T) in closed form."""
    z = (x_T - alpha_T * mean) / (alpha_T**2 * std**2 + sigma_T**2).sqrt()
    return alpha * mean + (alpha**2 * std**2 + sigma**2).sqrt() * z


def run_sampler(sampler, process, denoiser, noise: Tensor, callback=None, generator=None) -> Tensor:
    """`sampler` from x = noise over the grid that `process` lays out for its steps and spacing."""
    alphas, sigmas = process.sampling_grid(sampler.steps, sampler.spacing)
    return sampler(denoiser, noise, alphas, sigmas, callback=callback, generator=generator)
