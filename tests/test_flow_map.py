"""Flow maps (MeanFlow, shortcut models) against the exact map of Gaussian data N(mu, s^2 I), whose flow on
z_t = (1 - t) x_0 + t eps is affine: the MeanFlow target of the exact map is the map, the JVP is the finite
difference for every backbone, the shortcut's two half steps are the exact step, one step of the exact map samples
the data; the one-line errors of a second time; and a short run resumes exactly and samples."""

import math

import pytest
import torch
from torch import nn

from test_resume import assert_same_run, last_checkpoint, run
from tiny_run import image_folder, run_train, tiny_overrides

from diffusion_lab.builders import load_model, second_time_option
from diffusion_lab.diffusion.flow_map import time_derivative
from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.diffusion.meanflow import MeanFlow
from diffusion_lab.diffusion.shortcut import Shortcut, self_consistency_target
from diffusion_lab.models.components.ddpm_unet import DDPMUNet
from diffusion_lab.models.components.dit import DiT
from diffusion_lab.models.components.unet_attn import UnetAttn
from diffusion_lab.models.components.uvit import UViT
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.samplers import Sampler
from diffusion_lab.samplers.denoiser import SamplerError
from diffusion_lab.utils.errors import ConfigError

SHAPE = (1, 4, 4)
MU = torch.linspace(-0.6, 0.8, math.prod(SHAPE), dtype=torch.float64).reshape(SHAPE)
S = 0.5


def moments(t: torch.Tensor, s: float = S, mu: torch.Tensor = MU) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (B, *SHAPE) and std (B, 1, 1, 1) of z_t for x_0 ~ N(mu, s^2 I)."""
    t = t.reshape(-1, 1, 1, 1)
    return (1 - t) * mu, ((1 - t) ** 2 * s**2 + t**2).sqrt()


def exact_average_velocity(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, s: float = S,
                           mu: torch.Tensor = MU) -> torch.Tensor:
    """u(z, r, t) = (z - z_r) / (t - r), z_r = m_r + sd_r / sd_t (z - m_t) the flow from t to r (r > t too: the same
    smooth function), for data N(mu, s^2 I); at r = t the velocity -mu + (t - (1 - t) s^2) / sd_t^2 (z - m_t)."""
    (m_t, sd_t), (m_r, sd_r) = moments(t, s, mu), moments(r, s, mu)
    gap = (t - r).reshape(-1, 1, 1, 1)
    velocity = -mu + (t.reshape(-1, 1, 1, 1) - (1 - t.reshape(-1, 1, 1, 1)) * s**2) / sd_t**2 * (z - m_t)
    z_r = m_r + sd_r / sd_t * (z - m_t)
    return torch.where(gap != 0, (z - z_r) / torch.where(gap != 0, gap, torch.ones_like(gap)), velocity)


class ExactMap(nn.Module):
    """exact_average_velocity (data std s) as a network of (z, time_scale t, second_time = time_scale (t - r)),
    float64."""

    def __init__(self, time_scale: float, s: float = S):
        super().__init__()
        self.time_scale, self.s, self.unused = time_scale, s, nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, z, t, *, second_time, class_labels=None, x_self_cond=None):
        return exact_average_velocity(z, (t - second_time) / self.time_scale, t / self.time_scale, self.s)


def marginal_points(t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """z_t = (1 - t) x_0 + t eps with x_0 ~ N(MU, S^2 I), float64."""
    g = torch.Generator().manual_seed(seed)
    x0 = MU + S * torch.randn(len(t), *SHAPE, generator=g, dtype=torch.float64)
    t = t.reshape(-1, 1, 1, 1)
    return (1 - t) * x0 + t * torch.randn(len(t), *SHAPE, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("jvp_mode, atol", [("exact", 1e-10), ("finite_difference", 1e-6)])
def test_meanflow_target_of_the_exact_map_is_the_map(jvp_mode, atol):
    """u_tgt = v - (t - r) d/dt u with the exact u and the marginal velocity v is u itself (the MeanFlow identity,
    Geng et al. Eq. 6), at r < t and at r = t alike; a wrong sign or direction of the JVP breaks it."""
    process = MeanFlow(jvp_mode=jvp_mode, fd_step=1e-5, equal_fraction=0.3)
    r, t = process.sample_times(64, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert (r == t).any() and (r < t).any()
    z, net = marginal_points(t), ExactMap(process.time_scale)
    velocity = exact_average_velocity(z, t, t)
    u, target = process.target(net, z, r, t, velocity)
    closed_form = exact_average_velocity(z, r, t)
    torch.testing.assert_close(u, closed_form, rtol=0, atol=1e-12)
    torch.testing.assert_close(target, closed_form, rtol=0, atol=atol)
    assert not torch.allclose(velocity[r < t], closed_form[r < t], atol=1e-3)  # the identity is not trivial here


def randomised(net: nn.Module) -> nn.Module:
    """net in float64 with every parameter perturbed (the zero-initialised layers too), so that each contributes."""
    torch.manual_seed(0)
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


BACKBONES = {  # tiny backbones: (class, options) with a second time
    "dit": (DiT, dict(channels=1, image_size=8, patch_size=2, depth=2, hidden_size=16, num_heads=2)),
    "uvit": (UViT, dict(channels=1, image_size=8, patch_size=2, depth=3, hidden_size=16, num_heads=2)),
    "unet_attn": (UnetAttn, dict(dim=8, dim_mults=[1, 2], channels=1, image_size=8, resnet_block_groups=4, attn_heads=2,
                                 attn_dim_head=8)),
    "ddpm_unet": (DDPMUNet, dict(channels=1, image_size=8, ch=8, ch_mult=[1, 2], norm_groups=4, dropout=0.5)),
}


def backbone(name: str, second_time: bool = True) -> nn.Module:
    cls, options = BACKBONES[name]
    return cls(**options, second_time=second_time)


@pytest.mark.parametrize("name", BACKBONES)
def test_jvp_equals_finite_differences_for_each_backbone(name, one_thread):
    """d/dt u(z_t, r, t) along (v, 0, 1) by forward-mode AD (attention by the math kernel) equals the central
    difference with h = 1e-6 in float64, and `finite_difference` mode equals it too; in training mode, so that
    ddpm_unet's dropout draws one mask for all three of the difference's calls."""
    process = MeanFlow()
    net = randomised(backbone(name)).train()
    g = torch.Generator().manual_seed(2)
    z, velocity = (torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    r = torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64)

    def u(z_, r_, t_):
        return process.average_velocity(net, z_, r_, t_)

    derivatives = {}
    for mode in ("exact", "finite_difference"):
        torch.manual_seed(3)
        value, derivatives[mode] = time_derivative(u, z, r, t, velocity, mode, step=1e-6)
        assert value.requires_grad and not derivatives[mode].requires_grad
    h = 1e-6
    with torch.no_grad():
        torch.manual_seed(3)
        plus = u(z + h * velocity, r, t + h)
        torch.manual_seed(3)
        central = (plus - u(z - h * velocity, r, t - h)) / (2 * h)
    scale = central.abs().max()
    assert scale > 1e-3
    torch.testing.assert_close(derivatives["exact"] / scale, central / scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(derivatives["finite_difference"], central, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", BACKBONES)
def test_meanflow_under_gradient_checkpointing_has_the_same_loss_and_gradients(name, one_thread):
    """A checkpointed network cannot replay a forward-mode pass in its backward; MeanFlow then takes u from a forward
    apart from the JVP's, with the same dropout masks: loss and gradients equal those without checkpointing."""
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = randomised(backbone(name)).train()
        net.gradient_checkpointing = checkpointing
        torch.manual_seed(5)
        loss, _ = MeanFlow(jvp_mode="exact", equal_fraction=0.0).training_losses(net, x0, torch.Generator().manual_seed(6))
        loss.sum().backward()
        results.append((loss.detach(), [p.grad for p in net.parameters()]))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    torch.testing.assert_close(loss_checkpointed, loss, rtol=1e-9, atol=0)
    for grad, grad_checkpointed in zip(grads, grads_checkpointed):
        torch.testing.assert_close(grad_checkpointed, grad, rtol=1e-7, atol=1e-12)


def test_auto_jvp_falls_back_to_finite_differences_where_forward_mode_has_no_rule():
    """jvp_mode=auto: an operation without a forward-mode rule (simulated: the exact map refusing forward-mode
    inputs with PyTorch's NotImplementedError) gives the finite difference, with a warning; exact raises it."""

    def no_forward_rule(z, r, t):
        if torch._C._functorch.is_functorch_wrapped_tensor(z):
            raise NotImplementedError("Trying to use forward AD with some_op that does not support it")
        return exact_average_velocity(z, r, t)

    t = torch.tensor([0.9, 0.4], dtype=torch.float64)
    r, z = torch.tensor([0.2, 0.1], dtype=torch.float64), marginal_points(t)
    velocity = exact_average_velocity(z, t, t)
    with pytest.warns(UserWarning, match="finite differences"):
        _, auto = time_derivative(no_forward_rule, z, r, t, velocity, "auto", step=1e-5)
    _, exact = time_derivative(exact_average_velocity, z, r, t, velocity, "exact")
    torch.testing.assert_close(auto, exact, rtol=0, atol=1e-6)
    with pytest.raises(NotImplementedError, match="forward AD"):
        time_derivative(no_forward_rule, z, r, t, velocity, "exact")


def test_shortcut_target_is_two_half_steps_of_the_exact_flow():
    """(s(z_t, t, h) + s(z', t - h, h)) / 2 with the exact map is the exact average velocity over [t - 2h, t]."""
    half = torch.tensor([0.5, 0.25, 0.125, 1 / 64], dtype=torch.float64)
    t = torch.tensor([1.0, 0.75, 0.5, 3 / 32], dtype=torch.float64)
    z = marginal_points(t)
    target = self_consistency_target(exact_average_velocity, z, t, half, half)
    torch.testing.assert_close(target, exact_average_velocity(z, t - 2 * half, t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("process", [MeanFlow(jvp_mode="exact", equal_fraction=0.5), Shortcut(finest_steps=4)],
                         ids=["meanflow", "shortcut"])
def test_training_loss_of_the_exact_map_of_a_point_mass_is_zero(process):
    """Data at one point MU: each sample's conditional velocity is the marginal one, so the exact map has zero loss,
    sample for sample, in MeanFlow's identity and in the shortcut's flow matching and self-consistency (the latter
    also at the finest step, asked at d = 0, the paths being straight); data of std S have a positive loss where the
    target is the conditional velocity (MeanFlow's samples, the shortcut's flow-matching ones: the last 3/4)."""
    g = torch.Generator().manual_seed(0)
    x0 = MU.expand(64, *SHAPE).clone()
    loss, _ = process.training_losses(ExactMap(process.time_scale, s=0.0), x0, g)
    assert loss.shape == (64,) and loss.abs().max() < 1e-10
    x0 = x0 + S * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    assert (process.training_losses(ExactMap(process.time_scale), x0, g)[0][16:] > 1e-6).all()


class LabelEcho(nn.Module):
    """u = the class label (the null class 2 reads 10), whatever z, r and t."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, z, t, *, second_time, class_labels, x_self_cond=None):
        value = torch.where(class_labels == 2, 10.0, class_labels.double())
        return value.reshape(-1, 1, 1, 1).expand_as(z)


def test_guidance_folded_into_meanflow_mixes_in_the_unconditional_velocity():
    """omega v + (1 - omega) u(z_t, t, t | null) for labelled samples, v for those dropped to the null class
    (Geng et al. Eq. 19, 21): with u | null = 10 and v = 1, omega = 3 gives 3 - 20 = -17."""
    z, t = torch.zeros(3, *SHAPE, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    velocity = torch.ones_like(z)
    guided = MeanFlow(guidance_scale=3.0).guided_velocity(LabelEcho(), z, t, velocity,
                                                          {"class_labels": torch.tensor([0, 1, 2])})
    assert guided[:2].eq(-17).all() and guided[2].eq(1).all()
    assert torch.equal(MeanFlow().guided_velocity(LabelEcho(), z, t, velocity, {"class_labels": torch.tensor([0, 1, 2])}),
                       velocity)


class GaussianFamily(nn.Module):
    """The exact map of data N(mu, s^2 I) with mu and s learned (from 0 and 1): a model family holding the truth."""

    def __init__(self, time_scale: float):
        super().__init__()
        self.time_scale = time_scale
        self.mu = nn.Parameter(torch.zeros(SHAPE, dtype=torch.float64))
        self.log_s = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, z, t, *, second_time, class_labels=None, x_self_cond=None):
        r, t = (t - second_time) / self.time_scale, t / self.time_scale
        return exact_average_velocity(z, r, t, self.log_s.exp(), self.mu)


@pytest.mark.parametrize("process", [MeanFlow(jvp_mode="exact", equal_fraction=0.0), Shortcut(finest_steps=8)],
                         ids=["meanflow", "shortcut"])
@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_training_recovers_the_data_in_a_family_holding_the_exact_map(process):
    """Training the losses (conditional velocities, stop-gradient targets, the JVP) over the exact maps of N(mu, s^2 I)
    recovers the data's mu and s = 0.5 from mu = 0, s = 1; MeanFlow with r < t throughout, so that its target alone
    does it (with the sign of (t - r) du/dt flipped, s ends near 0.35)."""
    net, g = GaussianFamily(process.time_scale), torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(400):
        x0 = MU + S * torch.randn(256, *SHAPE, generator=g, dtype=torch.float64)
        loss = process.training_losses(net, x0, g)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(net.log_s.exp().item() - S) < 0.02 and (net.mu - MU).abs().max() < 0.04


def test_shortcut_steps_are_powers_of_two_on_their_grid():
    d, t = Shortcut(finest_steps=16).sample_steps(4000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(d.tolist()) == {1.0, 0.5, 0.25, 0.125}
    assert torch.equal(t / d, (t / d).round()) and (t - d >= 0).all() and (t <= 1).all()


def test_meanflow_times_put_r_below_t_and_the_asked_share_at_r_equal_t():
    r, t = MeanFlow(equal_fraction=0.75).sample_times(4000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert (r <= t).all() and ((0 < r) & (t < 1)).all()
    assert abs((r == t).double().mean().item() - 0.75) < 0.03


@pytest.mark.parametrize("process", [MeanFlow(), Shortcut()], ids=["meanflow", "shortcut"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_steps_of_the_exact_map_sample_the_data(process, steps):
    """sampler=flow_map over the exact map takes noise eps to MU + S eps, in 1, 2 or 4 steps; one Euler step of the
    same model's velocity falls on the mean instead."""
    model = DiffusionModel(ExactMap(process.time_scale), process, SHAPE)
    noise = torch.randn(2000, *SHAPE, generator=torch.Generator().manual_seed(0))
    sampler = Sampler("flow_map", steps)
    x = model.sample(noise, sampler)
    torch.testing.assert_close(x, (MU + S * noise.double()).float(), rtol=0, atol=1e-5)
    assert sampler.evaluations_used == steps
    assert abs((x - MU.float()).std().item() - S) < 0.01 and (x.mean(0) - MU).abs().max() < 0.05
    torch.testing.assert_close(model.sample(noise, Sampler("euler", 1)), MU.float().expand_as(x), rtol=0, atol=1e-5)


def test_guided_steps_of_the_exact_map_pass_the_level_through_guidance():
    """Classifier-free guidance wraps the flow-map denoiser: with a class-blind exact map, guided sampling at w = 3
    takes noise eps to MU + S eps as unguided sampling does."""
    net = ExactMap(1000.0)
    net.num_classes = 2
    model = DiffusionModel(net, MeanFlow(), SHAPE, num_classes=2)
    noise = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    x = model.sample(noise, Sampler("flow_map", 2), guidance=Guidance(3.0), class_labels=torch.tensor([0, 1] * 4))
    torch.testing.assert_close(x, (MU + S * noise.double()).float(), rtol=0, atol=1e-5)


def test_flow_map_sampler_refuses_a_process_without_a_map():
    net = DiT(1, 8, patch_size=2, depth=1, hidden_size=16, num_heads=2)
    model = DiffusionModel(net, FlowMatching(), (1, 8, 8))
    with pytest.raises(SamplerError, match="process flow_matching does not learn"):
        model.sample(torch.randn(1, 1, 8, 8), Sampler("flow_map", 1))


@pytest.mark.parametrize("name", BACKBONES)
def test_second_time_mismatch_is_one_line_and_off_adds_no_weights(name):
    """A backbone built with a second time refuses a call without one and one built without refuses one, each in
    one line; off, the state dict is that with it less the second embedding (none for U-ViT's plain sinusoidal time
    token); on, the second time changes the output."""
    with_second, plain = randomised(backbone(name)).eval(), backbone(name, second_time=False).double().eval()
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([10.0, 500.0], dtype=torch.float64)
    for net, kwargs, match in ((with_second, {}, "built with a second time"),
                               (plain, {"second_time": t}, "built without a second time")):
        with pytest.raises(ConfigError, match=match) as error:
            net(x, t, **kwargs)
        assert "\n" not in str(error.value)
    extra = set(with_second.state_dict()) - set(plain.state_dict())
    assert all(key.startswith("second_time") for key in extra) and set(plain.state_dict()) <= set(with_second.state_dict())
    assert not torch.allclose(with_second(x, t, second_time=0 * t), with_second(x, t, second_time=t))


def test_builder_refuses_a_second_time_where_it_cannot_be_given_or_taken():
    simple = {"model": {"_target_": "diffusion_lab.models.components.simple_unet.SimpleUNet"}}
    with pytest.raises(ConfigError, match="process meanflow needs a backbone that takes a second time"):
        second_time_option(simple, MeanFlow())
    dit = {"model": {"_target_": "diffusion_lab.models.components.dit.DiT", "second_time": True}}
    with pytest.raises(ConfigError, match="process flow_matching gives the network no second time"):
        second_time_option(dit, FlowMatching())
    assert second_time_option({"model": {**dit["model"], "second_time": False}}, Shortcut()) == {"second_time": True}


@pytest.mark.parametrize("experiment", ["meanflow_fashion_mnist", "shortcut_fashion_mnist"])
def test_flow_map_run_resumes_exactly_and_its_checkpoint_samples(experiment, tmp_path, one_thread):
    """A run stopped at step 3 and continued to 6 reaches bit for bit the weights, EMA and optimizer state of a run
    never interrupted (the random times, steps and JVP draw from the saved generator), and its checkpoint samples by
    sampler=flow_map in 1 and 2 steps (one evaluation each)."""
    images = image_folder(tmp_path / "images")

    def overrides(name: str, steps: int) -> list[str]:
        tiny = [o for o in tiny_overrides(images, tmp_path / name, steps) if not o.startswith("schedule.")]
        return [f"experiment={experiment}", *tiny, "callbacks.ema.decay=0.5", "callbacks.ema.warmup=false",
            "callbacks.ema.sigma_rel=null"]

    run(overrides("straight", 6))
    run(overrides("first", 3))
    run(overrides("second", 6) + [f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"])
    straight = last_checkpoint(tmp_path / "straight")
    assert_same_run(straight, last_checkpoint(tmp_path / "second"))
    model = load_model(straight, "ema", torch.device("cpu"))
    assert model.net.second_time_mlp is not None
    for steps in (1, 2):
        sampler = Sampler("flow_map", steps)
        x = model.sample(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), sampler)
        assert x.shape == (2, 1, 8, 8) and x.isfinite().all() and sampler.evaluations_used == steps


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_meanflow_under_two_rank_ddp_keeps_ranks_in_sync(tmp_path):
    """python train.py trainer=ddp (2 CPU ranks, gloo) with MeanFlow's JVP: each rank trains on its own shard and the
    all-reduced gradients leave both with the same weights, bit for bit."""
    images, probe = image_folder(tmp_path / "images"), tmp_path / "probe"
    tiny = [o for o in tiny_overrides(images, tmp_path / "run", 3) if not o.startswith("schedule.")]
    run_train(["experiment=meanflow_fashion_mnist", *tiny, "trainer=ddp", "trainer.accelerator=cpu",
               "trainer.devices=2", "trainer.sync_batchnorm=false", "+callbacks.probe._target_=tiny_run.RankProbe",
               f"+callbacks.probe.dirpath={probe}"])
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])
    assert any("second_time_mlp" in name for name in ranks[0]["weights"])
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name
