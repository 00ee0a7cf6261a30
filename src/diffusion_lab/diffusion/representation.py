"""The two losses on a backbone's hidden states that make diffusion training converge faster.

- REPA (Yu et al. 2025, "Representation Alignment for Generation", Eq. 8; sihyun-yu/REPA `loss.py`): a small MLP
  h_phi projects the hidden tokens h_n of an early block, and -1/N sum_n cos(h_phi(h_n), y_n) aligns them with a
  frozen encoder's patch features y_n of the clean image.
- Dispersive loss (Wang & He 2025, "Diffuse and Disperse", Eq. 6; raywang4/DispLoss, the InfoNCE-L2 variant): an
  InfoNCE loss with no positive pairs that spreads the batch's hidden states apart; no parameters, no encoder.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPA_PROJECTOR_DIM = 2048  # REPA's projector_dim


def repa_projector(width: int, encoder_width: int, hidden: int = REPA_PROJECTOR_DIM) -> nn.Sequential:
    """h_phi: Linear-SiLU-Linear-SiLU-Linear from the backbone's width to the encoder's (REPA's `build_mlp`)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, encoder_width))


def repa_loss(projected: Tensor, target: Tensor) -> Tensor:
    """Per sample -1/N sum_n <h_n / |h_n|, y_n / |y_n|> over the N tokens of projected (B, N, D) and target (B, N, D):
    the negative cosine similarity of REPA, -1 where each projection points along its target."""
    return -(F.normalize(projected.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1).mean(1)


def dispersive_loss(hidden: Tensor, tau: float = 1.0) -> Tensor:
    """log (1/B^2) sum_{i,j} exp(-|z_i - z_j|^2 / (tau D)) over the B hidden states flattened to z_i in R^D: the
    paper's L_disp with the squared L2 distance, scaled by 1/D and summed over all B^2 pairs (i = j included) as
    the authors' PyTorch release does. Between 0 (all z_i equal) and -log B (all far apart)."""
    z = hidden.flatten(1).float()
    pairs = -F.pdist(z).pow(2) / (tau * z.shape[1])  # i < j; each unordered pair counts twice, i = j gives 0
    logits = torch.cat([pairs, pairs, pairs.new_zeros(len(z))])
    return torch.logsumexp(logits, dim=0) - 2 * math.log(len(z))
