"""The tutorial presets (`experiment=`): each composes, trains under debug=fast and samples from its checkpoint with
its own sampler (tiny widths, small stand-in data sets); and the tutorials' DDPM step formulas agree."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.samplers.sampling import ddpm
from diffusion_lab.config import register_resolvers

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
register_resolvers()

DPM2015_TINY = ["model.n_hidden_conv=8", "model.n_layers_conv=2", "model.n_hidden_dense_lower=16", "model.n_layers_dense_lower=2"]
PRESETS = {  # preset: tiny-width overrides (each preset's own recipe otherwise)
    "ddpm_fashion_mnist_tutorial": ["model.dim=8", "model.dim_mults=[1,2]", "model.attn_heads=1", "model.attn_dim_head=8"],
    "ddpm_mnist_simple": ["model.dims=[8,16,16,16]", "model.time_dim=16"],
    "dpm2015_mnist": DPM2015_TINY,
    "dpm2015_cifar10": DPM2015_TINY,
    "ddpm_small_fashion_mnist": ["model.dim=4", "model.time_emb_dim=8"],
    "ddpm_cifar10": ["model.ch=16", "model.ch_mult=[1,2]", "model.norm_groups=8"],
}
QUIET = ["logger=csv", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "+trainer.enable_progress_bar=false",
         "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "schedule.timesteps=20",
         "callbacks.sample_media.num_samples=2", "callbacks.sample_media.trajectory_samples=1"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file of unsigned bytes (LeCun's MNIST format)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Random stand-ins for MNIST (torchvision's raw layout), Fashion-MNIST (IDX files in the root) and CIFAR-10
    (the python batches), 40 training images each: no download."""
    root, rng = tmp_path_factory.mktemp("data"), np.random.default_rng(0)
    (root / "MNIST" / "raw").mkdir(parents=True)
    (root / "cifar-10-batches-py").mkdir()
    for split, n in (("train", 40), ("t10k", 8)):
        for folder in (root / "MNIST" / "raw", root):
            write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
            write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 8)]:
        batch = {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(root / "cifar-10-batches-py" / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def compose_config(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_under_debug_fast_and_samples(preset, data_root, tmp_path):
    from diffusion_lab.sample import sample
    from diffusion_lab.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose_config("train.yaml", [f"experiment={preset}", "debug=fast", *QUIET, *PRESETS[preset],
                                            f"data.root={data_root}", f"paths.output_dir={tmp_path / 'run'}"])
        metrics, _ = train(cfg)
        assert np.isfinite(metrics["train/loss"])
        ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
        out = tmp_path / "samples"
        sample(compose_config("sample.yaml", [f"ckpt_path={ckpt}", "num_samples=2", "batch_size=2", "trajectory_samples=1",
                                              f"output_dir={out}", "sampler.steps=5"]))
    finally:
        torch.set_num_threads(threads)
    samples = np.load(out / "samples.npz")["arr_0"]
    assert samples.dtype == np.uint8 and samples.shape == (2, cfg.data.image_size, cfg.data.image_size, cfg.data.channels)


def test_presets_carry_the_tutorials_recipes():
    expected = {  # preset: (model target, process target, T, optimizer, lr, batch size)
        "ddpm_fashion_mnist_tutorial": ("UnetAttn", "GaussianDiffusion", 300, "Adam", 1e-3, 128),
        "ddpm_mnist_simple": ("SimpleUNet", "GaussianDiffusion", 1000, "Adam", 1e-3, 64),
        "dpm2015_mnist": ("DPM2015Net", "DPM2015Diffusion", 1000, "RMSprop", 1e-3, 512),
        "dpm2015_cifar10": ("DPM2015Net", "DPM2015Diffusion", 1000, "RMSprop", 1e-3, 512),
        "ddpm_small_fashion_mnist": ("SmallUNet", "GaussianDiffusion", 200, "Adam", 1e-3, 128),
        "ddpm_cifar10": ("DDPMUNet", "GaussianDiffusion", 1000, "Adam", 2e-4, 128),
    }
    for preset, (model, process, timesteps, optimizer, lr, batch_size) in expected.items():
        cfg = compose_config("train.yaml", [f"experiment={preset}"])
        assert cfg.model._target_.endswith(model) and cfg.process._target_.endswith(process), preset
        assert (cfg.schedule.timesteps, cfg.optimizer._target_.split(".")[-1], cfg.optimizer.lr, cfg.data.batch_size) == (
            timesteps, optimizer, lr, batch_size), preset
    tutorial = compose_config("train.yaml", ["experiment=ddpm_fashion_mnist_tutorial"])
    assert (tutorial.schedule.beta_start, tutorial.schedule.beta_end, tutorial.process.loss_type, tutorial.process.objective) == (
        1e-4, 0.02, "huber", "eps")
    cifar = compose_config("train.yaml", ["experiment=ddpm_cifar10"])
    assert (cifar.trainer.max_steps, cifar.trainer.gradient_clip_val, cifar.callbacks.ema.decay) == (800_000, 1.0, 0.9999)
    assert (cifar.lr_scheduler.warmup_steps, cifar.model.dropout, cifar.data.random_flip) == (5000, 0.1, True)


class FixedEps(nn.Module):
    """An eps-prediction 'network' with a known output depending on x_t."""

    def __init__(self, pattern: torch.Tensor):
        super().__init__()
        self.pattern = nn.Parameter(pattern, requires_grad=False)

    def forward(self, x, t, **kwargs):
        return 0.3 * x + self.pattern


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("t", [199, 57, 1])
def test_tutorial_ddpm_steps_agree(variance, t):
    """Tutorial 004 steps through the predicted x_0 and the posterior mean (what the ddpm sampler does); tutorials
    001/003 use the eps form mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t), plus sigma_t z with
    sigma_t^2 = beta_t (tutorial 003's option 1) or beta_tilde_t (option 2). With the same eps and z they agree."""
    T = 200
    betas = beta_schedule("linear", T, 1e-4, 0.02)
    process = GaussianDiffusion(betas)
    g = torch.Generator().manual_seed(t)
    x_t = torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64)
    z = torch.randn(x_t.shape, generator=g, dtype=torch.float64)
    net = FixedEps(torch.randn(1, 1, 6, 6, generator=g)).double()

    alphas, sigmas = process.sampling_grid(T, "uniform")  # every timestep, T-1..0, then the data
    i = T - 1 - t  # the step from t to t - 1
    steps = []
    ddpm(process.denoiser(net, clip_denoised=False), x_t, alphas[i:], sigmas[i:], variance=variance,
         callback=lambda state: steps.append(state["x"]), noise_sampler=lambda like: z)

    beta, alpha_bar = betas[t], torch.cumprod(1 - betas, 0)[t]
    alpha_bar_prev = torch.cumprod(1 - betas, 0)[t - 1]
    eps = net(x_t, None)
    mu = (x_t - beta / (1 - alpha_bar).sqrt() * eps) / (1 - beta).sqrt()
    sigma2 = beta if variance == "beta" else beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    torch.testing.assert_close(steps[0], mu + sigma2.sqrt() * z, rtol=1e-10, atol=1e-10)
