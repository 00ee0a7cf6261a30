"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, EDM2, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Sec. 3 and App. C; the reference: NVlabs/edm2 `training/phema.py`). Torch only.

After t training steps an EMA of exponent gamma holds the weights averaged over the training time tau in (0, t] with
the profile p_(t, gamma)(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) (EDM2 Eq. 2), whose standard deviation relative
to t is sigma_rel (Eq. 3). Snapshots of a few such EMAs, combined by least squares over their profiles, give the EMA
of any other sigma_rel afterwards.
"""

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from diffusion_lab.utils.errors import ConfigError

SIGMA_REL_MAX = 12**-0.5  # sigma_rel of gamma = 0 (the uniform average): the widest profile with gamma >= 0


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = (gamma + 1)^(1/2) (gamma + 2)^-1 (gamma + 3)^(-1/2)  (EDM2 Eq. 3)."""
    return (gamma + 1) ** 0.5 / (gamma + 2) / (gamma + 3) ** 0.5


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The gamma > 0 of a sigma_rel in (0, 12^-1/2): Eq. 3 squared and inverted is the cubic
    (gamma + 2)^2 (gamma + 3) - sigma_rel^-2 (gamma + 1) = 0, whose largest real root it is (EDM2 Eq. 126, Alg. 2)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(f"sigma_rel={sigma_rel} must be in (0, {SIGMA_REL_MAX:.4f}) (a power-function EMA with gamma > 0)")
    s = sigma_rel**-2
    cubic = [7.0, 16.0 - s, 12.0 - s]  # gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s)
    companion = torch.tensor([[-c for c in cubic], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    return torch.linalg.eigvals(companion).real.max().item()


def power_ema_beta(step: int, gamma: float, steps_since_update: int = 1) -> float:
    """The decay of the update ema <- beta ema + (1 - beta) theta_t that keeps the profile p_(t, gamma):
    beta = (1 - delta / t)^(gamma + 1) with delta the steps since the last update (EDM2 Eq. 127). beta = 0 at the
    first update, so the average needs no initial value."""
    return (1 - steps_since_update / step) ** (gamma + 1)


def profile_inner_product(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """<p_a, p_b> = integral of p_(t_a, gamma_a)(tau) p_(t_b, gamma_b)(tau) over tau
    = (gamma_a + 1)(gamma_b + 1) (t_a / t_b)^e / ((gamma_a + gamma_b + 1) max(t_a, t_b)), e = gamma_b if t_a < t_b
    else -gamma_a (EDM2 Eq. 151, Algorithm 3); broadcast over its arguments."""
    exponent = torch.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent / ((gamma_a + gamma_b + 1) * torch.maximum(t_a, t_b))


def solve_posthoc_coefficients(steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float) -> tuple[Tensor, float]:
    """The coefficients x of the snapshots (EMAs of exponent gammas[i] taken at steps[i]) whose combination
    sum_i x_i p_i fits the profile p_(step, gamma) by least squares: A x = b with A_ij = <p_i, p_j> and
    b_i = <p_i, p_(step, gamma)>, then scaled to sum to 1 (EDM2 Algorithm 3, `solve_posthoc_coefficients`). Also the
    fit's relative error ||sum_i x_i p_i - p|| / ||p||, from the same inner products."""
    t_i = torch.tensor(steps, dtype=torch.float64)
    gamma_i = torch.tensor(gammas, dtype=torch.float64)
    t, g = torch.tensor(float(step), dtype=torch.float64), torch.tensor(float(gamma), dtype=torch.float64)
    gram = profile_inner_product(t_i[:, None], gamma_i[:, None], t_i[None, :], gamma_i[None, :])
    target = profile_inner_product(t_i, gamma_i, t, g)
    coefficients = torch.linalg.solve(gram, target)
    coefficients = coefficients / coefficients.sum()
    norm = profile_inner_product(t, g, t, g)
    squared_error = coefficients @ gram @ coefficients - 2 * coefficients @ target + norm
    return coefficients, (squared_error.clamp(min=0) / norm).sqrt().item()


def combine_state_dicts(state_dicts: Iterable[dict[str, Tensor]], coefficients: Sequence[float]) -> dict[str, Tensor]:
    """sum_i x_i theta_i over the snapshots' floating-point tensors (summed in float64, returned in their dtype); the
    other tensors (integer buffers) from the last snapshot. `state_dicts` may be a generator: one is read at a time."""
    total: dict[str, Tensor] = {}
    last: dict[str, Tensor] = {}
    for state_dict, coefficient in zip(state_dicts, coefficients, strict=True):
        for name, value in state_dict.items():
            if value.is_floating_point():
                total[name] = total.get(name, 0) + float(coefficient) * value.to(torch.float64)
        last = state_dict
    return {name: total[name].to(value.dtype) if value.is_floating_point() else value for name, value in last.items()}


def expressible_sigma_rels(steps: Sequence[int], gammas: Sequence[float], step: int, max_error: float) -> list[float]:
    """The sigma_rels of 0.005, 0.01, .. 0.285 whose profile at `step` the snapshots fit within relative error
    `max_error` (`solve_posthoc_coefficients`): what a reconstruction from them can give."""
    grid = [round(0.005 * k, 3) for k in range(1, 58)]
    return [s for s in grid if solve_posthoc_coefficients(steps, gammas, step, sigma_rel_to_gamma(s))[1] <= max_error]
