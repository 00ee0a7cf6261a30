"""`RepresentationTerms`: REPA and the dispersive loss on the backbone's hidden states, added to any process's
training loss by the diffusion LightningModule (docs/training.md#faster-training-repa-and-the-dispersive-loss)."""

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.representation import REPA_PROJECTOR_DIM, dispersive_loss, repa_loss, repa_projector
from diffusion_lab.models.components.features import HiddenStates, hidden_layer
from diffusion_lab.utils.errors import ConfigError


class FrozenEncoder:
    """A frozen network kept out of its owner's parameters, state dict, optimizer and EMA: not a submodule, shared
    (not copied) by deep copies such as Lightning's weight averaging makes, moved to the images' device when used."""

    def __init__(self, net: nn.Module):
        self.net = net.eval().requires_grad_(False)

    def __deepcopy__(self, memo: dict) -> "FrozenEncoder":
        return self

    @torch.no_grad()
    def __call__(self, images: Tensor, grid: int) -> Tensor:
        return self.net.to(images.device)(images, grid)


class RepresentationTerms(nn.Module):
    """repa_weight L_REPA + disp_weight L_disp on the hidden states of the backbone `net`: REPA at block `repa_depth`
    through a projector (hidden width `projector_dim`) to the width of `encoder` (metrics/encoders.py), the
    dispersive loss at block `disp_depth` (None: the last, where the DispLoss PyTorch release applies it) with
    temperature `disp_tau`. The projector trains with the backbone and is saved in checkpoints; the encoder is
    frozen and never saved. Forward hooks on those blocks record the training forward pass
    (`features.HiddenStates`); passes without gradients (sampling, validation) record nothing."""

    def __init__(self, net: nn.Module, repa_weight: float = 0.0, repa_depth: int = 2, encoder: nn.Module | None = None,
                 projector_dim: int = REPA_PROJECTOR_DIM, disp_weight: float = 0.0, disp_depth: int | None = None,
                 disp_tau: float = 1.0):
        super().__init__()
        if repa_weight < 0 or disp_weight < 0 or disp_tau <= 0:
            raise ConfigError(f"representation.repa_weight={repa_weight} and disp_weight={disp_weight} must be >= 0, "
                              f"disp_tau={disp_tau} > 0")
        if repa_weight and encoder is None:
            raise ConfigError("representation.repa_weight > 0 needs an encoder: set representation.encoder.kind and .path")
        self.repa_weight, self.disp_weight, self.disp_tau = repa_weight, disp_weight, disp_tau
        layers = {}
        if repa_weight:
            layers["repa"] = hidden_layer(net, repa_depth, "representation.repa_depth")
            self.projector = repa_projector(layers["repa"].width, encoder.width, projector_dim)
            self.encoder = FrozenEncoder(encoder)
        if disp_weight:
            layers["disp"] = hidden_layer(net, disp_depth, "representation.disp_depth")
        self.hidden_states = HiddenStates(layers)

    @property
    def needs_images(self) -> bool:
        """Whether the terms read the clean images (REPA's encoder targets)."""
        return bool(self.repa_weight)

    def forward(self, images: Tensor | None) -> dict[str, Tensor]:
        """The terms, unweighted ({"repa": L_REPA, "disp": L_disp}, those with a weight), of the training forward pass
        just run; images (B, C, H, W) in [-1, 1]: the clean images of that batch, whose encoder features REPA aligns
        the projected hidden states with."""
        hidden, terms = self.hidden_states.take(), {}
        if self.repa_weight:
            target = self.encoder(images, self.hidden_states.layers["repa"].grid)
            terms["repa"] = repa_loss(self.projector(hidden["repa"]), target).mean()
        if self.disp_weight:
            terms["disp"] = dispersive_loss(hidden["disp"], self.disp_tau)
        return terms

    def weighted(self, terms: dict[str, Tensor]) -> Tensor:
        """repa_weight L_REPA + disp_weight L_disp."""
        return sum(getattr(self, f"{name}_weight") * value for name, value in terms.items())
