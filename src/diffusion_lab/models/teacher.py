"""The teacher of a distillation run: a trained checkpoint of this project, loaded by path (`teacher_ckpt=PATH`) as
its own model object, frozen, and kept out of the student's state dict, parameters and copies."""

import torch
from torch import Tensor, nn

from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.builders import load_model
from diffusion_lab.utils.checkpoint import load_checkpoint
from diffusion_lab.utils.errors import ConfigError


class Frozen:
    """Holds a frozen model outside nn.Module registration: not saved in the student's checkpoints (it is reloaded
    from its own path on resume), not optimised or averaged, and shared, not copied, by the EMA callback's deepcopy."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    def __deepcopy__(self, memo: dict) -> "Frozen":
        return self


def load_teacher(path: str | None, processes: tuple[str, ...], student: DiffusionModel, experiment: str) -> Frozen:
    """The EMA model of the checkpoint at `path`, frozen. One-line ConfigError for no path, a missing or foreign
    file, a process not in `processes`, or a teacher of another sample shape or classes than the student."""
    if not path:
        raise ConfigError(f"experiment={experiment} needs a teacher: add teacher_ckpt=PATH (a {' or '.join(processes)} "
                          "checkpoint of this project, e.g. <run>/checkpoints/last.ckpt)")
    teacher = load_model(load_checkpoint(path, key="teacher_ckpt"), "ema", torch.device("cpu"), f"teacher_ckpt={path}")
    if teacher.process_name not in processes:
        raise ConfigError(f"teacher_ckpt={path} is a {teacher.process_name} checkpoint; experiment={experiment} distils "
                          f"a {' or '.join(processes)} teacher")
    if teacher.sample_shape != student.sample_shape or teacher.num_classes != student.num_classes:
        raise ConfigError(f"teacher_ckpt={path} samples shape {teacher.sample_shape} with classes {teacher.num_classes}, but "
                          f"the student {student.sample_shape} with {student.num_classes}; use the teacher's data config")
    return Frozen(teacher)


def init_from_teacher(student: DiffusionModel, teacher: DiffusionModel, path: str) -> None:
    """Copy the teacher's backbone weights into the student's (Song et al. 2023 and Salimans & Ho 2022 start the
    student from the teacher); a backbone of another shape is a one-line ConfigError."""
    try:
        student.copy_backbone_from(teacher)
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ConfigError(f"the student's backbone differs from the teacher's (teacher_ckpt={path}): {detail[:200]}; "
                          "give the student the teacher's model overrides") from error


class ProbeNetwork(nn.Module):
    """A fixed nonlinear F(x, t) = sin(3 x + t) + x cos(t) on every output channel: two processes turn it into the
    same denoiser only if they feed and read a network alike (`check_same_parameterisation`)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.dtype_anchor = nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=False)

    def forward(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        t = t.reshape(-1, 1, 1, 1)
        out = torch.sin(3 * x + t) + x * torch.cos(t)
        return out.repeat(1, -(-self.out_channels // x.shape[1]), 1, 1)[:, : self.out_channels]


def check_same_parameterisation(student: DiffusionModel, teacher: DiffusionModel, alphas: Tensor, sigmas: Tensor,
                                path: str) -> None:
    """A student started from its teacher's weights must read the network as its teacher does: the same input
    scaling, time input and output meaning (Salimans & Ho 2022 copy the teacher, parameterisation included), else the
    first steps re-fit the network instead of distilling it. Checked by the x_0 of both processes' denoisers over one
    `ProbeNetwork` at the noise levels (alphas, sigmas) (the final data level excluded); a mismatch is one ConfigError
    line."""
    probe = ProbeNetwork(student.output_channels)
    x = torch.randn(2, *student.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for alpha, sigma in zip(alphas[sigmas > 0], sigmas[sigmas > 0]):
        level = (alpha.reshape(1), sigma.reshape(1))
        ours = student.denoiser(False, net=probe)(x, *level).x0
        theirs = teacher.denoiser(False, net=probe)(x, *level).x0
        if not torch.allclose(ours, theirs, rtol=1e-6, atol=1e-8):
            raise ConfigError(
                f"teacher_ckpt={path} is a {teacher.describe()} model, whose network the student's process "
                f"({student.describe()}) reads differently (at sigma / alpha = {float(sigma / alpha):.4g}); the "
                "student starts from its teacher's weights, so give it the teacher's process and schedule overrides "
                "(an EDM teacher: experiment=progressive_distillation_edm)")

