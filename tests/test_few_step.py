"""Few-step generation: the consistency function and sampler (Song et al. 2023), consistency distillation on Gaussian
toy data with the exact teacher, and each experiment's tiny run from a teacher checkpoint, sampled from its own
checkpoint alone."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from conftest import ROOT
from test_resume import assert_same_run, last_checkpoint, run
from tiny_run import image_folder, tiny_overrides
from toy_models import TinyNet, gaussian_denoiser, gaussian_ode_solution

from diffusion_lab.builders import build_model
from diffusion_lab.diffusion.consistency import Consistency, heun_step
from diffusion_lab.diffusion.edm import EDM, karras_sigmas
from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.progressive import distillation_losses
from diffusion_lab.diffusion.reflow import straightness
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.models.consistency_module import ConsistencyTrainingModule
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.models.progressive_module import ProgressiveDistillationModule
from diffusion_lab.models.reflow_module import ReflowModule
from diffusion_lab.builders import load_model
from diffusion_lab.sample import sampler_config
from diffusion_lab.samplers import Sampler
from diffusion_lab.samplers.sampling import DenoiserOutput
from diffusion_lab.utils.checkpoint import load_checkpoint
from diffusion_lab.utils.errors import ConfigError

MEAN, STD = 0.3, 0.5


class PixelMLP(nn.Module):
    """F(x, t) applied to each pixel alone: a 1x1-conv MLP of (x, t / time_scale), enough for the per-pixel flows of
    Gaussian data."""

    def __init__(self, width: int = 32, seed: int = 0, time_scale: float = 1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.time_scale = time_scale
        self.body = nn.Sequential(nn.Conv2d(2, width, 1), nn.SiLU(), nn.Conv2d(width, width, 1), nn.SiLU(),
                                  nn.Conv2d(width, 1, 1))

    def forward(self, x, t):
        return self.body(torch.cat([x, (t.to(x.dtype) / self.time_scale).reshape(-1, 1, 1, 1).expand_as(x)], 1))


def toy_data(n: int, generator: torch.Generator) -> torch.Tensor:
    return MEAN + STD * torch.randn(n, 1, 4, 4, generator=generator)


def moment_errors(x: torch.Tensor) -> tuple[float, float]:
    return abs(x.mean().item() - MEAN), abs(x.std().item() - STD)


# the consistency function and sampler ---------------------------------------------------------------------------


def test_consistency_function_is_exactly_the_identity_at_sigma_min():
    process = Consistency()
    x = torch.randn(5, 1, 4, 4) * 3
    f = process.consistency_function(PixelMLP(), x, torch.full((5,), process.sigma_min, dtype=torch.float64))
    assert torch.equal(f, x)
    c_skip, c_out, _, _ = process.preconditioning(torch.tensor([process.sigma_min, 1.0], dtype=torch.float64))
    assert c_skip[0] == 1 and c_out[0] == 0 and c_out[1] > 0


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_with_the_exact_consistency_function_draws_the_data(steps):
    """f(x, sigma) = the probability-flow ODE's point at sigma_min (closed form for Gaussian data): Alg. 1 at any step
    count draws N(MEAN, STD^2 + sigma_min^2), with one evaluation a step."""
    process = Consistency()

    def exact(x, alpha, sigma):
        x0 = gaussian_ode_solution(x, alpha, sigma, torch.ones_like(alpha), torch.full_like(sigma, process.sigma_min),
                                   MEAN, STD)
        return DenoiserOutput(x0, (x - x0) / sigma)

    sampler = Sampler("consistency", steps, "karras", sigma_min=process.sigma_min)
    alphas, sigmas = process.sampling_grid(steps)
    assert len(sigmas) == steps + 1 and sigmas[0] == process.sigma_max and sigmas[-1] == 0
    assert (sigmas[1:-1] > process.sigma_min).all() and (sigmas.diff() < 0).all()
    x_T = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    x0 = sampler(exact, x_T, alphas, sigmas, generator=torch.Generator().manual_seed(1))
    assert sampler.evaluations_used == steps == sampler.evaluations
    assert abs(x0.mean().item() - MEAN) < 4 * STD / 20000**0.5
    assert abs(x0.std().item() / (STD**2 + process.sigma_min**2) ** 0.5 - 1) < 0.02


def test_consistency_distillation_student_moves_towards_the_data(one_thread):
    """CD from the exact teacher of N(MEAN, STD^2): the one-step student's mean and std approach the data's as
    training goes on (Song et al. 2023, Alg. 2 with a Heun teacher step, EMA target mu = 0.95, pseudo-Huber)."""
    process = Consistency(num_scales=18)
    net, target = PixelMLP(seed=0), PixelMLP(seed=0).requires_grad_(False)
    teacher = gaussian_denoiser(MEAN, STD)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(0)
    alphas, sigmas = process.sampling_grid(1)
    x_T = process.sigma_max * torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for step in range(301):
        if step in (0, 100, 300):
            errors.append(moment_errors(Sampler("consistency", 1, "karras")(process.denoiser(net), x_T, alphas, sigmas)))
        loss, _ = process.training_losses(net, toy_data(64, generator), generator, target_net=target,
                                          estimate_previous=lambda x, sigma_next, sigma, z, kw: heun_step(teacher, x, sigma_next, sigma))
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(target.parameters()), list(net.parameters()), 0.05)
    (mean_0, std_0), (mean_1, std_1), (mean_2, std_2) = errors
    print(f"one-step |mean - {MEAN}|, |std - {STD}| at steps 0/100/300: {errors}")
    assert mean_2 < mean_1 < mean_0 and std_2 < std_1 < std_0
    assert mean_2 < mean_0 / 4 and std_2 < std_0 / 4


# experiments from teacher checkpoints ------------------------------------------------------------------------------


def tiny(experiment: str, images, output_dir, steps: int = 2) -> list[str]:
    base = [o for o in tiny_overrides(images, output_dir, steps) if not o.startswith("schedule.")]
    return [f"experiment={experiment}", *base, "callbacks.ema.decay=0.5", "callbacks.ema.warmup=false",
            "callbacks.ema.sigma_rel=null"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Tiny EDM, DDPM (eps, linear T = 20; v, cosine T = 8) and rectified-flow teachers (2 steps each) on a folder of
    8x8 images."""
    root = tmp_path_factory.mktemp("teachers")
    images = image_folder(root / "images")
    paths = {}
    for name, experiment, extra in (("edm", "edm_fashion_mnist", []), ("flow", "rectified_flow_fashion_mnist", []),
                                    ("ddpm", "ddpm_fashion_mnist", ["schedule.timesteps=20"]),
                                    ("ddpm_v", "ddpm_fashion_mnist", ["process.objective=v", "schedule=cosine",
                                                                      "schedule.timesteps=8"])):
        run(tiny(experiment, images, root / name) + extra)
        paths[name] = root / name / "checkpoints" / "last.ckpt"
    return images, paths


@pytest.mark.parametrize("teacher", ["edm", "ddpm"])
def test_consistency_distillation_runs_and_its_checkpoint_samples(teachers, teacher, tmp_path, one_thread):
    images, paths = teachers
    # a DDPM network reads its inputs otherwise, and knows no level below its table's smallest (0.0709 for its schedule)
    extra = ["module.init_student=false", "process.sigma_min=0.08"] if teacher == "ddpm" else []
    run(tiny("consistency_distillation", images, tmp_path / "cd", 3) + [f"teacher_ckpt={paths[teacher]}", *extra])
    checkpoint = last_checkpoint(tmp_path / "cd")
    assert not any(name.startswith("teacher") for name in checkpoint["state_dict"])  # reloaded from its path
    assert any(name.startswith("target_net.") for name in checkpoint["current_model_state"])  # resumes exactly
    model = load_model(checkpoint, "ema", torch.device("cpu"))
    assert model.process.name == "consistency"
    chosen = OmegaConf.load(ROOT / "configs" / "sampler" / "consistency.yaml")  # sample.py sampler=consistency
    assert instantiate(sampler_config(checkpoint["config"], chosen)).options["sigma_min"] == model.process.sigma_min
    for steps in (1, 2, 4):
        x = model.sample(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                         Sampler("consistency", steps, "karras", sigma_min=model.process.sigma_min))
        assert x.shape == (2, 1, 8, 8) and x.isfinite().all()


@pytest.mark.parametrize("extra, message", [
    ([], "needs a teacher: add teacher_ckpt=PATH"),
    (["teacher_ckpt=/nonexistent.ckpt"], "teacher_ckpt=/nonexistent.ckpt does not exist"),
    (["teacher_ckpt={flow}"], "is a flow_matching checkpoint; experiment=consistency_distillation distils"),
    (["teacher_ckpt={edm}", "model.dim=16"], "the student's backbone differs from the teacher's"),
    (["teacher_ckpt={ddpm}"], "a process gaussian objective=eps network, .*; set module.init_student=false"),
    (["teacher_ckpt={edm}", "process.sigma_data=1.0"], "set process.sigma_data to the teacher's 0.5"),
    (["teacher_ckpt={ddpm}", "module.init_student=false"],
     r"process.sigma_min=0.002 lies below the smallest noise level .* set process.sigma_min=0.0709 \(or more\)"),
])
def test_consistency_distillation_bad_teacher_is_one_config_error_line(teachers, tmp_path, extra, message):
    images, paths = teachers
    extra = [e.format(**paths) for e in extra]
    with pytest.raises(ConfigError, match=message) as error:
        run(tiny("consistency_distillation", images, tmp_path / "bad") + extra)
    assert "\n" not in str(error.value)


def test_a_ddpm_teachers_eps_is_consistent_on_the_students_lowest_pair():
    """Issue 26 item 7: a DDPM teacher's denoiser satisfies x = x_0 + sigma eps (so `heun_step` follows its ODE) at
    both levels of the student's lowest pair when the student's sigma_min is the table's smallest level; at the
    default sigma_min = 0.002, below that level, it does not (the timestep lookup clamps), which is why consistency
    distillation refuses that pairing (`check_levels`, the case above)."""
    teacher = GaussianDiffusion(beta_schedule("linear", 300))
    denoiser = teacher.denoiser(TinyNet(channels=2), clip_denoised=False)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)

    def consistent(sigma):
        out = denoiser(x, one, sigma.reshape(1))
        return torch.allclose(out.x0 + sigma * out.eps, x, rtol=0, atol=1e-10)

    smallest = teacher.path.level_range()[0]
    assert all(consistent(sigma) for sigma in Consistency(sigma_min=smallest).training_levels(18)[:2])
    assert not consistent(Consistency().training_levels(18)[0])


def test_reflow_lowers_the_straightness_of_the_exact_flow(one_thread):
    """Reflow on pairs (eps, ODE(eps)) of the exact rectified flow of N(MEAN, STD^2): the student's straightness S
    (Liu et al. 2023, Def. 2.5) falls far below the teacher's, and one Euler step lands near the teacher's ODE output."""
    process = FlowMatching(time_sampling="uniform")
    teacher = gaussian_denoiser(MEAN, STD)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(4096, 1, 4, 4, generator=generator)
    alphas, sigmas = process.sampling_grid(50)
    samples = Sampler("heun", 50, "uniform")(teacher, noise.double(), alphas, sigmas).float()
    net = PixelMLP(seed=0, time_scale=process.time_scale)
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(300):
        index = torch.randint(0, len(noise), (128,), generator=generator)
        loss, _ = process.training_losses(net, samples[index], generator, noise=noise[index])
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    probe = torch.randn(2048, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s_teacher, s_student = straightness(teacher, probe), straightness(process.denoiser(net), probe)
    one_step = Sampler("euler", 1, "uniform")(process.denoiser(net), probe, *process.sampling_grid(1))
    ode = Sampler("heun", 50, "uniform")(teacher, probe, alphas, sigmas)
    print(f"straightness: teacher {s_teacher:.4f}, reflow student {s_student:.4f}; one-step |x - ODE(eps)| "
          f"{(one_step - ode).abs().mean():.4f}")
    assert s_student < s_teacher / 10
    assert (one_step - ode).abs().mean() < 0.1 and max(moment_errors(one_step)) < 0.1


def test_reflow_runs_caches_its_pairs_and_its_checkpoint_samples(teachers, tmp_path, one_thread):
    images, paths = teachers
    args = tiny("reflow", images, tmp_path / "rf", 3) + [f"teacher_ckpt={paths['flow']}", "module.num_pairs=12",
                                                          "module.shard_size=8", "module.teacher_sampler.steps=2"]
    run(args)
    shards = sorted((tmp_path / "rf" / "reflow_pairs").glob("shard_*.pt"))
    assert [s.name for s in shards] == ["shard_00000.pt", "shard_00001.pt"]
    first = torch.load(shards[0], weights_only=True)
    assert first["noise"].shape == first["samples"].shape == (8, 1, 8, 8)
    model = load_model(last_checkpoint(tmp_path / "rf"), "ema", torch.device("cpu"))
    x = model.sample(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), Sampler("euler", 1, "uniform"))
    assert x.shape == (2, 1, 8, 8) and x.isfinite().all()
    with pytest.raises(ConfigError, match="is a edm checkpoint; experiment=reflow distils a flow_matching teacher"):
        run(tiny("reflow", images, tmp_path / "bad") + [f"teacher_ckpt={paths['edm']}"])


def test_reflow_ranks_draw_disjoint_shards_and_read_the_same_pairs(teachers, tmp_path, one_thread):
    """Under DDP each rank draws every world_size-th shard before the barrier; after it, every rank holds the pairs
    a single process draws."""
    _, paths = teachers
    teacher = load_checkpoint(paths["flow"])

    def module(pairs_dir):
        return ReflowModule(load_model(teacher, "ema", torch.device("cpu")), torch.optim.Adam, teacher_ckpt=paths["flow"],
                            teacher_sampler=Sampler("euler", 2, "uniform"), num_pairs=10, shard_size=4,
                            pairs_dir=str(pairs_dir))

    single = module(tmp_path / "single")
    single.draw_pairs(0, 1, barrier=lambda: None)
    shared, drawn_before_barrier = tmp_path / "shared", []
    ranks = [module(shared) for _ in range(2)]
    ranks[1].draw_pairs(1, 2, barrier=lambda: drawn_before_barrier.append(sorted(p.name for p in shared.glob("*.pt"))))
    ranks[0].draw_pairs(0, 2, barrier=lambda: drawn_before_barrier.append(sorted(p.name for p in shared.glob("*.pt"))))
    assert drawn_before_barrier == [["shard_00001.pt"], ["shard_00000.pt", "shard_00001.pt", "shard_00002.pt"]]
    for rank in ranks:
        assert rank.pairs.keys() == single.pairs.keys()
        for key in single.pairs:
            assert torch.equal(rank.pairs[key], single.pairs[key]), key
    assert single.pairs["noise"].shape == (10, 1, 8, 8)


@pytest.mark.slow
def test_reflow_resumes_exactly(teachers, tmp_path, one_thread):
    """Stopped at step 2 and resumed to 4 in another folder (drawing its pairs again there): the same student, EMA
    and optimizer state as a run never interrupted, bit for bit."""
    images, paths = teachers
    extra = [f"teacher_ckpt={paths['flow']}", "module.num_pairs=12", "module.shard_size=8", "module.teacher_sampler.steps=2"]
    run(tiny("reflow", images, tmp_path / "straight", 4) + extra)
    run(tiny("reflow", images, tmp_path / "first", 2) + extra)
    run(tiny("reflow", images, tmp_path / "second", 4) + extra
        + [f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"])
    assert_same_run(last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "second"))


PD_PROCESSES = {  # the student's process, and its backbone's time scale for PixelMLP
    "gaussian_v": (lambda: GaussianDiffusion(beta_schedule("cosine", 64), objective="v"), 64.0),
    "edm": (lambda: EDM(sigma_data=0.5), 1.0),
}


@pytest.mark.parametrize("process_name", PD_PROCESSES)
def test_progressive_distillation_two_step_student_matches_the_four_step_teacher(process_name, one_thread):
    """One stage of Salimans & Ho 2022 (Alg. 2) from the exact teacher of N(MEAN, STD^2), in the v parameterisation
    (cosine T = 64) and in EDM's: the 2-step DDIM student lands nearer the teacher's 4-step DDIM output than the
    teacher's own 2 steps do."""
    make_process, time_scale = PD_PROCESSES[process_name]
    process = make_process()
    teacher = gaussian_denoiser(MEAN, STD)
    net = PixelMLP(seed=0, time_scale=time_scale)
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(0)
    teacher_grid, student_grid = process.sampling_grid(4, "trailing"), process.sampling_grid(2, "trailing")
    for _ in range(300):
        loss, _ = distillation_losses(process.denoiser(net, False), teacher, toy_data(128, generator), *teacher_grid,
                                      generator)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    probe = torch.randn(2048, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    start = lambda grid: probe * (grid[0][0] ** 2 + grid[1][0] ** 2).sqrt()  # noqa: E731 (x_T's std, as sample())
    teacher_4 = Sampler("ddim", 4, "trailing")(teacher, start(teacher_grid), *teacher_grid)
    teacher_2 = Sampler("ddim", 2, "trailing")(teacher, start(student_grid), *student_grid)
    student_2 = Sampler("ddim", 2, "trailing")(process.denoiser(net, False), start(student_grid), *student_grid)
    student_error, teacher_error = (student_2 - teacher_4).abs().mean(), (teacher_2 - teacher_4).abs().mean()
    print(f"{process_name}: |x - teacher's 4 steps|: student 2 steps {student_error:.4f}, teacher 2 steps {teacher_error:.4f}")
    assert student_error < teacher_error / 4


@pytest.mark.parametrize("process_name", PD_PROCESSES)
def test_progressive_distillation_grids_nest(process_name):
    """The trailing grid of N steps is every other point of the 2N-step grid, from the highest noise level to the
    data, so that a student's step spans exactly two of its teacher's."""
    process = PD_PROCESSES[process_name][0]()
    for steps in (1, 2, 4, 8):
        alphas, sigmas = process.sampling_grid(steps, "trailing")
        fine_alphas, fine_sigmas = process.sampling_grid(2 * steps, "trailing")
        assert len(sigmas) == steps + 1 and sigmas[-1] == 0 and alphas[-1] == 1
        torch.testing.assert_close(sigmas, fine_sigmas[::2], rtol=0, atol=0)
        torch.testing.assert_close(alphas, fine_alphas[::2], rtol=0, atol=0)
    assert EDM().sampling_grid(1, "trailing")[1].tolist() == [80.0, 0.0]


def pd_module(path, teacher_steps: int = 4):
    """A progressive-distillation module whose student has the teacher checkpoint's own config (backbone, process,
    schedule)."""
    model = build_model(OmegaConf.create(load_checkpoint(path)["config"]))
    return ProgressiveDistillationModule(model, torch.optim.Adam, teacher_ckpt=str(path), teacher_steps=teacher_steps,
                                         steps_per_stage=1)


@pytest.mark.parametrize("teacher", ["edm", "ddpm_v"])
def test_progressive_distillation_student_starts_as_its_real_teacher(teachers, teacher):
    """From a trained EDM (or v DDPM) checkpoint, the stage-0 student is its teacher: the same x_0 at every level of
    the teacher's grid. (A v-objective DDPM student on EDM weights, the design that failed on Fashion-MNIST, is not.)"""
    _, paths = teachers
    module = pd_module(paths[teacher], teacher_steps=8 if teacher == "ddpm_v" else 4)
    module.eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    alphas, sigmas = module.model.process.sampling_grid(8 if teacher == "ddpm_v" else 4, "trailing")
    for alpha, sigma in zip(alphas[:-1], sigmas[:-1]):
        ours = module.model.denoiser(False)(x * (alpha**2 + sigma**2).sqrt().float(), alpha, sigma).x0
        theirs = module.teacher.model.denoiser(False)(x * (alpha**2 + sigma**2).sqrt().float(), alpha, sigma).x0
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # the teacher loads channels-last on a CPU


@pytest.mark.parametrize("experiment, teacher, extra", [
    ("progressive_distillation", "edm", ["schedule.timesteps=8"]),  # a v-objective DDPM student of an EDM teacher
    ("progressive_distillation", "ddpm", ["schedule.timesteps=20"]),  # an eps teacher of a v student
    ("progressive_distillation", "ddpm_v", ["schedule=linear", "schedule.timesteps=8"]),  # another beta schedule
    ("progressive_distillation_edm", "ddpm_v", []),  # an EDM student of a DDPM teacher
    ("progressive_distillation_edm", "edm", ["process.sigma_data=1.0"]),  # another sigma_data
])
def test_progressive_distillation_of_another_parameterisation_is_one_config_error_line(teachers, tmp_path, experiment,
                                                                                       teacher, extra):
    images, paths = teachers
    with pytest.raises(ConfigError, match="reads differently") as error:
        run(tiny(experiment, images, tmp_path / "bad") + [
            f"teacher_ckpt={paths[teacher]}", "module.teacher_steps=4", "sampler.steps=2", *extra])
    assert "\n" not in str(error.value)


PD_TEACHERS = {"edm": ("progressive_distillation_edm", []),
               "ddpm_v": ("progressive_distillation", ["schedule.timesteps=8"])}


@pytest.mark.parametrize("teacher", PD_TEACHERS)
def test_progressive_distillation_runs_a_checkpoint_per_stage_that_samples(teachers, teacher, tmp_path, one_thread):
    images, paths = teachers
    out = tmp_path / "pd"
    experiment, extra = PD_TEACHERS[teacher]
    run(tiny(experiment, images, out, 3) + [
        f"teacher_ckpt={paths[teacher]}", *extra, "module.teacher_steps=4", "module.steps_per_stage=1", "sampler.steps=2"])
    for name, steps in (("stage0_2steps.ckpt", 2), ("stage1_1steps.ckpt", 1)):
        checkpoint = load_checkpoint(out / "checkpoints" / name)
        assert checkpoint["config"]["sampler"]["steps"] == steps
        model = load_model(checkpoint, "ema", torch.device("cpu"))
        assert model.process.name == {"edm": "edm", "ddpm_v": "gaussian"}[teacher]  # the teacher's parameterisation
        sampler = instantiate(checkpoint["config"]["sampler"])
        x = model.sample(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), sampler)
        assert x.shape == (2, 1, 8, 8) and x.isfinite().all() and sampler.evaluations_used == steps
    assert load_checkpoint(out / "checkpoints" / "stage0_2steps.ckpt")["global_step"] == 1
    # each stage starts a fresh optimizer: of the 3 steps, the last stage (from step 1 on) took 2
    last = last_checkpoint(out)
    assert last["global_step"] == 3
    assert {int(state["step"]) for state in last["optimizer_states"][0]["state"].values()} == {2}
    with pytest.raises(ConfigError, match="must be divisible by module.teacher_steps=4"):
        run(tiny("progressive_distillation", images, tmp_path / "bad") + [
            f"teacher_ckpt={paths['ddpm_v']}", "schedule.timesteps=10", "module.teacher_steps=4", "sampler.steps=2"])


def test_consistency_loss_weighting_is_icts_or_uniform():
    """With the same draws, loss_weighting=ict is lambda = 1 / (sigma_{n+1} - sigma_n) (iCT, Sec. 3.5) times the
    uniform (lambda = 1, Song et al. 2023) loss."""
    x0 = toy_data(64, torch.Generator().manual_seed(0))
    net = PixelMLP()
    losses = {}
    for weighting in ("ict", "uniform"):
        process = Consistency(num_scales=10, loss_weighting=weighting)
        losses[weighting], u = process.training_losses(net, x0, torch.Generator().manual_seed(1), num_scales=10)
    sigmas = karras_sigmas(0.002, 80.0, 7.0, 10)
    n = (u * 8).round().long()  # u = n / (N - 2)
    torch.testing.assert_close(losses["ict"], losses["uniform"] / (sigmas[n + 1] - sigmas[n]).float())
    assert (losses["uniform"] > 0).all()
    with pytest.raises(ConfigError, match="process.loss_weighting='snr' is not allowed; choose one of ict, uniform"):
        Consistency(loss_weighting="snr")


def test_consistency_training_curriculum_doubles_from_s0_to_s1():
    """N(k) = min(s_0 2^floor(k / K'), s_1) + 1 with K' = floor(K / (log2 floor(s_1 / s_0) + 1)) (iCT, Eq. 6)."""
    module = ConsistencyTrainingModule(DiffusionModel(PixelMLP(), Consistency(), (1, 4, 4)), torch.optim.Adam,
                                       total_steps=400000)
    assert [module.num_scales(k) for k in (0, 49999, 50000, 100000, 300000, 349999, 350000, 399999)] == [
        11, 11, 21, 41, 641, 641, 1281, 1281]


def test_consistency_training_runs_and_its_checkpoint_samples(teachers, tmp_path, one_thread):
    images, _ = teachers
    run(tiny("consistency_training", images, tmp_path / "ct", 3))
    model = load_model(last_checkpoint(tmp_path / "ct"), "ema", torch.device("cpu"))
    x = model.sample(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                     Sampler("consistency", 2, "karras", sigma_min=model.process.sigma_min))
    assert x.shape == (2, 1, 8, 8) and x.isfinite().all()


@pytest.mark.slow
def test_consistency_distillation_resumes_exactly(teachers, tmp_path, one_thread):
    """Stopped at step 2 and resumed to 4, the student, its EMA, its target network and the optimizer state equal a
    run never interrupted, bit for bit; the teacher comes again from teacher_ckpt."""
    images, paths = teachers
    teacher = [f"teacher_ckpt={paths['edm']}"]
    run(tiny("consistency_distillation", images, tmp_path / "straight", 4) + teacher)
    run(tiny("consistency_distillation", images, tmp_path / "first", 2) + teacher)
    run(tiny("consistency_distillation", images, tmp_path / "second", 4) + teacher
        + [f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"])
    assert_same_run(last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "second"))


@pytest.mark.slow
def test_progressive_distillation_resumes_exactly_across_a_stage(teachers, tmp_path, one_thread):
    """Stopped at step 2 (stage 1 begun) and resumed to 4: the student, its teacher network of stage >= 1, the stage,
    EMA and optimizer equal a run never interrupted, bit for bit."""
    images, paths = teachers
    extra = [f"teacher_ckpt={paths['edm']}", "module.teacher_steps=8", "module.steps_per_stage=1", "sampler.steps=2"]
    run(tiny("progressive_distillation_edm", images, tmp_path / "straight", 4) + extra)
    run(tiny("progressive_distillation_edm", images, tmp_path / "first", 2) + extra)
    run(tiny("progressive_distillation_edm", images, tmp_path / "second", 4) + extra
        + [f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"])
    straight = last_checkpoint(tmp_path / "straight")
    assert_same_run(straight, last_checkpoint(tmp_path / "second"))
    assert int(straight["current_model_state"]["stage"]) == 2 and straight["config"]["sampler"]["steps"] == 1
