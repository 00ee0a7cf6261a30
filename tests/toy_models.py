"""Small deterministic stand-ins for a trained network, shared by the sampler and process tests."""

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.gaussian import DenoiserOutput


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


def gaussian_denoiser(process, mean: float, std: float):
    """The exact denoiser of data x_0 ~ N(mean, std^2 I): E[x_0 | x_t] = mean + sqrt(a) std^2 (x_t - sqrt(a) mean)
    / (a std^2 + 1 - a), a = alpha_bar(t) (Gaussian conditioning)."""

    def denoise(x_t: Tensor, t: Tensor) -> DenoiserOutput:
        a = process.alpha_bar_at(t).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        x0 = mean + a.sqrt() * std**2 * (x_t - a.sqrt() * mean) / (a * std**2 + 1 - a)
        return DenoiserOutput(x0, process.eps_from_x0(x_t, a, x0))

    return denoise


def gaussian_ode_solution(x_T: Tensor, a_T: Tensor, a: Tensor, mean: float, std: float) -> Tensor:
    """The probability-flow ODE keeps (x_t - sqrt(a) mean) / sqrt(a std^2 + 1 - a) constant for Gaussian data, so
    x at alpha_bar = a from x_T at alpha_bar = a_T in closed form."""
    z = (x_T - a_T.sqrt() * mean) / (a_T * std**2 + 1 - a_T).sqrt()
    return a.sqrt() * mean + (a * std**2 + 1 - a).sqrt() * z
