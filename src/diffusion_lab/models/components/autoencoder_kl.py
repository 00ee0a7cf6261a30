"""The first stage of latent diffusion (Rombach et al. 2022, Sec. 3.1 and Appendix G): a convolutional
autoencoder whose encoder gives a diagonal Gaussian posterior q(z|x) over latents `factor` times smaller per side,
regularized towards N(0, I) by a small KL term ("KL-reg."). No perceptual or adversarial loss and no downloaded
weights: the reconstruction loss is L1 or L2 (see `AutoencoderModule`)."""

import math

import torch
from torch import Tensor, nn

from diffusion_lab.models.components.layers import check_groups
from diffusion_lab.utils.errors import ConfigError

FACTORS = (2, 4)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), logvar clamped to [-30, 20] as in LDM's DiagonalGaussianDistribution."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (the reparameterization trick, Kingma & Welling 2014)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> Tensor:
        """KL(q(z|x) || N(0, I)) = 1/2 sum(mean^2 + var - 1 - logvar) per sample (Kingma & Welling 2014, App. B)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv 3x3, twice, plus a (1x1-conv) skip: LDM's ResnetBlock without a time input."""

    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, dim), nn.SiLU(), nn.Conv2d(dim, dim_out, 3, padding=1),
            nn.GroupNorm(groups, dim_out), nn.SiLU(), nn.Conv2d(dim_out, dim_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class AutoencoderKL(nn.Module):
    """Encoder: conv, then per level `num_res_blocks` ResBlocks and a stride-2 conv (log2(factor) times), a middle
    ResBlock, norm, conv to 2 * latent_channels moments. Decoder: the mirror, with nearest x2 + conv upsampling.
    Level widths are dim * 2^level."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        factor: int = 4,
        latent_channels: int = 4,
        dim: int = 32,
        num_res_blocks: int = 1,
        groups: int = 8,
    ):
        super().__init__()
        if factor not in FACTORS:
            raise ConfigError(f"model.factor={factor} is not allowed; choose one of {', '.join(map(str, FACTORS))}")
        if image_size % factor:
            raise ConfigError(f"model.factor={factor} must divide data.image_size={image_size}")
        for key, value in (("latent_channels", latent_channels), ("dim", dim), ("num_res_blocks", num_res_blocks)):
            if value < 1:
                raise ConfigError(f"model.{key}={value} must be >= 1")
        levels = int(math.log2(factor))
        widths = [dim * 2**level for level in range(levels + 1)]
        check_groups("autoencoder_kl", "groups", groups, widths)
        self.channels, self.image_size, self.latent_channels, self.factor = channels, image_size, latent_channels, factor
        self.latent_size = image_size // factor

        encoder: list[nn.Module] = [nn.Conv2d(channels, dim, 3, padding=1)]
        width = dim
        for level, level_width in enumerate(widths):
            for _ in range(num_res_blocks):
                encoder.append(ResBlock(width, level_width, groups))
                width = level_width
            if level < levels:
                encoder.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        encoder += [ResBlock(width, width, groups), nn.GroupNorm(groups, width), nn.SiLU(),
                    nn.Conv2d(width, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = [nn.Conv2d(latent_channels, width, 3, padding=1), ResBlock(width, width, groups)]
        for level, level_width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks):
                decoder.append(ResBlock(width, level_width, groups))
                width = level_width
            if level > 0:
                decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        decoder += [nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z|x) of images x in [-1, 1] (B, C, H, W); z is (B, latent_channels, H / factor, W / factor)."""
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, C, H, W) from latents (B, latent_channels, H / factor, W / factor)."""
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """(decode(z) with z ~ q(z|x), q(z|x))."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


class FirstStage(nn.Module):
    """A frozen autoencoder as latent diffusion uses it: encode(x) = scale_factor * z with z ~ q(z|x), and
    decode(z) = D(z / scale_factor), where scale_factor = 1 / std(z) was measured on the data, so the diffusion
    process sees latents of about unit variance (Rombach et al. 2022, Sec. 4.3.2 and Appendix G)."""

    def __init__(self, autoencoder: AutoencoderKL, scale_factor: float):
        super().__init__()
        self.autoencoder = autoencoder.requires_grad_(False)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.autoencoder.latent_size
        return self.autoencoder.latent_channels, size, size

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.scale_factor * self.autoencoder.encode(x).sample(generator)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z / self.scale_factor)
