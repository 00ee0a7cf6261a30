"""Post-hoc EMA (Karras et al. 2024, EDM2): the power-function profile and its sigma_rel <-> gamma relation against
their closed forms, the per-step update against the weighted average it stands for, and the least-squares
reconstruction of an EMA length from snapshots of two others; the callback's resume and the command's checkpoint."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run_script
from diffusion_lab import posthoc_ema
from diffusion_lab.callbacks.posthoc_ema import PostHocEMA
from diffusion_lab.ema.power_ema import (
    SIGMA_REL_MAX,
    combine_state_dicts,
    expressible_sigma_rels,
    gamma_to_sigma_rel,
    power_ema_beta,
    profile_inner_product,
    sigma_rel_to_gamma,
    solve_posthoc_coefficients,
)
from diffusion_lab.ema.snapshots import SNAPSHOT_DIR, list_snapshots
from diffusion_lab.sample import sample
from diffusion_lab.utils.errors import ConfigError
from test_pipeline import compose_sample
from tiny_run import image_folder, tiny_overrides

TRACKED = (0.05, 0.10)  # the callback's default pair


def profile_mass_per_step(step: int, gamma: float) -> torch.Tensor:
    """The profile p_(t, gamma)(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) (EDM2 Eq. 2) integrated over each step
    (tau - 1, tau], tau = 1..t: (tau^(gamma + 1) - (tau - 1)^(gamma + 1)) / t^(gamma + 1)."""
    tau = torch.arange(1, step + 1, dtype=torch.float64)
    return (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / step ** (gamma + 1)


def track(history: torch.Tensor, gamma: float, snapshot_every: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The power-function EMA of history[0], history[1], .. (the weights after steps 1, 2, ..) updated once a step,
    and its snapshots every `snapshot_every` steps."""
    ema, snapshots = torch.zeros_like(history[0]), {}
    for step, theta in enumerate(history, start=1):
        ema = torch.lerp(ema, theta, 1 - power_ema_beta(step, gamma))
        if snapshot_every and step % snapshot_every == 0:
            snapshots[step] = ema.clone()
    return ema, snapshots


@pytest.mark.parametrize("gamma", [0.3, 2.0, 6.94, 16.97, 97.0])
def test_sigma_rel_is_the_profiles_relative_std_and_gamma_inverts_it(gamma):
    t = 1.0
    tau = torch.linspace(0, t, 200_001, dtype=torch.float64)
    profile = (gamma + 1) * tau**gamma / t ** (gamma + 1)
    mean = torch.trapezoid(tau * profile, tau)
    std = torch.trapezoid((tau - mean) ** 2 * profile, tau).sqrt()
    assert gamma_to_sigma_rel(gamma) == pytest.approx(std.item() / t, rel=1e-6)  # EDM2 Eq. 3 is what it says
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-10)


def test_the_papers_pair_of_lengths():
    # EDM2 Sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert [round(sigma_rel_to_gamma(s), 2) for s in TRACKED] == [16.97, 6.94]


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, SIGMA_REL_MAX, 0.3])
def test_a_sigma_rel_without_a_power_function_profile_is_one_error(sigma_rel):
    with pytest.raises(ConfigError, match="sigma_rel"):
        sigma_rel_to_gamma(sigma_rel)


@pytest.mark.parametrize("sigma_rel", TRACKED)
def test_the_per_step_update_is_the_weighted_average_of_the_history(sigma_rel):
    steps, gamma = 300, sigma_rel_to_gamma(sigma_rel)
    history = torch.eye(steps, dtype=torch.float64)  # theta_tau = e_tau: the EMA is its weight on each step
    weights, _ = track(history, gamma)
    torch.testing.assert_close(weights, profile_mass_per_step(steps, gamma), rtol=1e-10, atol=1e-14)
    scalars = torch.randn(steps, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ema, _ = track(scalars, gamma)
    assert ema.item() == pytest.approx((profile_mass_per_step(steps, gamma) * scalars).sum().item(), rel=1e-12)


@pytest.mark.parametrize(("t_a", "t_b"), [(300.0, 1000.0), (1000.0, 300.0), (500.0, 500.0)])
def test_profile_inner_product_is_the_integral_of_the_product(t_a, t_b):
    gamma_a, gamma_b = 6.94, 16.97
    tau = torch.linspace(0, min(t_a, t_b), 400_001, dtype=torch.float64)  # the product is 0 beyond

    def profile(t, gamma):
        return (gamma + 1) * tau**gamma / t ** (gamma + 1)

    integral = torch.trapezoid(profile(t_a, gamma_a) * profile(t_b, gamma_b), tau)
    closed = profile_inner_product(*(torch.tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b)))
    assert closed.item() == pytest.approx(integral.item(), rel=1e-4)


def snapshots_of(history: torch.Tensor, every: int) -> tuple[list[int], list[float], list[dict]]:
    """Snapshots of the EMAs of TRACKED every `every` steps: their steps, gammas and state dicts {"w": tensor}."""
    steps, gammas, states = [], [], []
    for sigma_rel in TRACKED:
        gamma = sigma_rel_to_gamma(sigma_rel)
        _, snapshots = track(history, gamma, every)
        for step, ema in snapshots.items():
            steps.append(step), gammas.append(gamma), states.append({"w": ema, "count": torch.tensor(step)})
    return steps, gammas, states


def test_a_tracked_length_is_reconstructed_to_float_rounding():
    history = torch.randn(400, 16, generator=torch.Generator().manual_seed(0)).cumsum(0)  # a random walk, float32
    steps, gammas, states = snapshots_of(history, 40)
    gamma = sigma_rel_to_gamma(0.10)
    coefficients, error = solve_posthoc_coefficients(steps, gammas, 400, gamma)
    reconstructed = combine_state_dicts(iter(states), coefficients.tolist())
    tracked, _ = track(history, gamma)
    assert reconstructed["w"].dtype == torch.float32 and error < 1e-6
    torch.testing.assert_close(reconstructed["w"], tracked)  # float32's tolerances
    assert reconstructed["count"].item() == 400  # integer tensors: the last snapshot's


def test_an_untracked_length_is_fitted_as_well_as_the_solve_says():
    # theta_tau = e_tau: the combination of the snapshots is the profile the reconstruction applies to each step
    steps_total = 600
    steps, gammas, states = snapshots_of(torch.eye(steps_total, dtype=torch.float64), 30)
    for sigma_rel in (0.03, 0.08, 0.15):
        gamma = sigma_rel_to_gamma(sigma_rel)
        coefficients, error = solve_posthoc_coefficients(steps, gammas, steps_total, gamma)
        applied = combine_state_dicts(iter(states), coefficients.tolist())["w"]
        target = profile_mass_per_step(steps_total, gamma)
        measured = ((applied - target).norm() / target.norm()).item()
        assert measured == pytest.approx(error, rel=0.1, abs=1e-4)  # the closed-form fit error is the real one
        tracked_pair = [profile_mass_per_step(steps_total, g) for g in (gammas[0], gammas[-1])]
        assert measured < 0.1 * min((p - target).norm().item() / target.norm().item() for p in tracked_pair)


def test_the_expressible_range_holds_the_tracked_lengths_and_not_the_far_ones():
    steps = [100 * k for k in range(1, 7)]
    gammas = [sigma_rel_to_gamma(s) for s in TRACKED]
    expressible = expressible_sigma_rels(steps * 2, [gammas[0]] * 6 + [gammas[1]] * 6, 600, max_error=0.05)
    assert {0.05, 0.1} <= set(expressible) and 0.005 not in expressible and 0.285 not in expressible
    assert expressible == [s for s in expressible if min(expressible) <= s <= max(expressible)]


# The callback and the command on a tiny run (tests/tiny_run.py): 10 steps, snapshots every 3 and at the end.
STEPS, EVERY = 10, 3
WITH_POSTHOC = ["callbacks=[default,posthoc_ema]", f"callbacks.posthoc_ema.every_n_steps={EVERY}"]


def train_tiny(images, output_dir, extra: list[str] = ()) -> dict:
    from test_resume import last_checkpoint, run

    run(tiny_overrides(images, output_dir, STEPS) + WITH_POSTHOC + ["ckpt_path=auto", *extra])
    return last_checkpoint(output_dir)


def assert_identical(a, b) -> None:
    """The same nested dicts, lists and values, tensors equal bit for bit."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def snapshot_files(output_dir) -> dict[str, dict]:
    return {path.name: torch.load(path, weights_only=True) for path in (output_dir / SNAPSHOT_DIR).glob("*.pt")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def tiny_run(images, tmp_path_factory):
    """A run never interrupted: its folder and last checkpoint."""
    output_dir = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return output_dir, train_tiny(images, output_dir)
    finally:
        torch.set_num_threads(threads)


def test_the_callback_resumes_bit_for_bit(images, tiny_run, tmp_path, one_thread):
    from test_resume import assert_same_run

    straight_dir, straight = tiny_run
    resumed = tmp_path / "resumed"
    with pytest.raises(SystemExit):  # SIGTERM after step 5: last.ckpt holds the averages of step 5
        train_tiny(images, resumed, ["+callbacks.sigterm._target_=tiny_run.SendSignal", "+callbacks.sigterm.at_step=5"])
    assert sorted(snapshot_files(resumed)) == ["phema-0000003-0.050.pt", "phema-0000003-0.100.pt"]
    actual = train_tiny(images, resumed)
    assert_same_run(straight, actual)
    assert_identical(straight["callbacks"]["PostHocEMA"], actual["callbacks"]["PostHocEMA"])
    expected_files = snapshot_files(straight_dir)
    assert sorted(expected_files) == sorted(f"phema-{s:07d}-{r:.3f}.pt" for s in (3, 6, 9, 10) for r in TRACKED)
    assert_identical(expected_files, snapshot_files(resumed))


def test_a_tracked_length_rebuilt_by_the_command_is_its_snapshot_and_sample_py_takes_it(tiny_run, tmp_path):
    output_dir, last = tiny_run
    out = tmp_path / "phema.ckpt"
    posthoc_ema.main([str(output_dir), "sigma_rel=0.1", f"out={out}"])
    rebuilt = torch.load(out, weights_only=True)
    snapshot = torch.load(output_dir / SNAPSHOT_DIR / "phema-0000010-0.100.pt", weights_only=True)
    assert rebuilt["posthoc_ema"]["sigma_rel"] == 0.1 and rebuilt["posthoc_ema"]["step"] == STEPS
    assert rebuilt["state_dict"].keys() == last["state_dict"].keys()
    for name, value in snapshot["state_dict"].items():
        torch.testing.assert_close(rebuilt["state_dict"][name], value)
    assert any(not torch.equal(rebuilt["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
    paths = sample(compose_sample([f"ckpt_path={out}", "num_samples=2", "batch_size=2", "sampler=ddim",
                                   "sampler.steps=2", f"output_dir={tmp_path / 'samples'}", "device=cpu"]))
    assert np.load(paths["samples"])["arr_0"].shape == (2, 8, 8, 1)


def test_the_ema_callback_at_a_sigma_rel_tracks_what_the_snapshots_hold(images, tmp_path, one_thread):
    """callbacks.ema.sigma_rel=S: the checkpoint's EMA weights (what sample.py takes) equal the post-hoc EMA of the
    same length tracked beside them, to float rounding (the one decays in float32, the other in float64)."""
    last = train_tiny(images, tmp_path, ["callbacks.ema.decay=null", "callbacks.ema.sigma_rel=0.05"])
    snapshot = torch.load(tmp_path / SNAPSHOT_DIR / f"phema-{STEPS:07d}-0.050.pt", weights_only=True)["state_dict"]
    trained = [name for name, value in snapshot.items() if value.is_floating_point()]
    for name in trained:
        torch.testing.assert_close(last["state_dict"][name], snapshot[name])
    assert any(not torch.equal(last["state_dict"][name], last["current_model_state"][name]) for name in trained)


def test_bad_runs_and_lengths_are_one_line_errors(tiny_run, tmp_path):
    output_dir, _ = tiny_run
    (tmp_path / "bare" / "checkpoints").mkdir(parents=True)
    (tmp_path / "bare" / "checkpoints" / "last.ckpt").touch()
    cases = {
        str(tmp_path): "is not a run folder",
        str(tmp_path / "bare"): "has no post-hoc EMA snapshots",
        f"{output_dir} sigma_rel=0.3": "must be in",
        f"{output_dir} sigma_rel=0.005": "beyond what the 8 snapshots up to step 10 express",
    }
    for arguments, message in cases.items():
        run, *options = arguments.split()
        with pytest.raises(ConfigError, match=message):
            posthoc_ema.main.__wrapped__([run, *(options or ["sigma_rel=0.1"]), f"out={tmp_path / 'x.ckpt'}"])
    assert not (tmp_path / "x.ckpt").exists()
    result = run_script("-m", ["diffusion_lab.posthoc_ema", str(tmp_path), "sigma_rel=0.1", "out=x.ckpt"], check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "not a run folder" in result.stderr


def drive(callback: PostHocEMA, net: torch.nn.Module, history: torch.Tensor, batches_per_step: int = 1) -> None:
    """Lightning's hooks on `net` whose weight is history[t - 1] after optimizer step t, each step spread over
    `batches_per_step` batches (gradient accumulation: the global step moves on the last)."""
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    callback.on_train_start(trainer, net)
    for step, theta in enumerate(history, start=1):
        for batch in range(batches_per_step):
            if batch == batches_per_step - 1:
                net.weight.data.copy_(theta)
                trainer.global_step = step
            callback.on_train_batch_end(trainer, net, None, None, batch)
    callback.on_train_end(trainer, net)


def test_the_callbacks_averages_are_the_power_function_ema_of_the_optimizer_steps(tmp_path):
    history = torch.randn(20, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    callback = PostHocEMA(tmp_path, sigma_rels=TRACKED, every_n_steps=8)
    net = torch.nn.Linear(4, 3, bias=False).double()
    drive(callback, net, history, batches_per_step=2)
    for sigma_rel, average in zip(TRACKED, callback.averages):
        expected = torch.einsum("t,tij->ij", profile_mass_per_step(20, sigma_rel_to_gamma(sigma_rel)), history)
        torch.testing.assert_close(average["weight"], expected, rtol=1e-12, atol=1e-12)
    assert [(s.step, s.sigma_rel) for s in list_snapshots(tmp_path)] == [(k, r) for k in (8, 16, 20) for r in TRACKED]


def test_the_callback_refuses_what_would_mix_other_averages_in(tmp_path):
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="holds no post-hoc EMA"):  # resumed from a checkpoint trained without it
        PostHocEMA(tmp_path).on_train_start(SimpleNamespace(global_step=5, is_global_zero=True), net)
    drive(PostHocEMA(tmp_path / "earlier", every_n_steps=1), net, torch.zeros(1, 2, 2))
    with pytest.raises(ConfigError, match="snapshots of an earlier run"):
        PostHocEMA(tmp_path / "earlier").on_train_start(SimpleNamespace(global_step=0, is_global_zero=True), net)
    with pytest.raises(ConfigError, match="sigma_rels"):
        PostHocEMA(tmp_path, sigma_rels=(0.05,)).load_state_dict(PostHocEMA(tmp_path).state_dict())
    with pytest.raises(ConfigError, match="callbacks.posthoc_ema.sigma_rels"):
        PostHocEMA(tmp_path, sigma_rels=(0.05, 0.3))


def test_a_refusal_names_each_contiguous_span_of_expressible_lengths():
    """Few snapshots fit the tracked lengths and not always what lies between: the message must not join the spans."""
    from diffusion_lab.ema.snapshots import contiguous_spans

    assert contiguous_spans([0.045, 0.05, 0.055, 0.2, 0.205]) == [(0.045, 0.055), (0.2, 0.205)]
    assert contiguous_spans([0.1]) == [(0.1, 0.1)] and contiguous_spans([]) == []
