"""Fixtures: the real configs composed once and shrunk for a 2-core CPU, and small data in torchvision's layout."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffusion_lab.data.datasets import DEBIAN_FASHION_MNIST
from diffusion_lab.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")

torch.set_num_threads(min(2, torch.get_num_threads()))
register_resolvers()

# The default experiment shrunk: an 8-wide U-Net, 20 timesteps, CSV logs, few steps.
TINY = [
    "model.dim=8", "model.dim_mults=[1,2]", "model.attn_heads=1", "model.attn_dim_head=8",
    "sampler.steps=20", "data.batch_size=8", "data.val_size=16",
    "trainer.accelerator=cpu", "trainer.max_steps=3", "trainer.max_epochs=-1", "trainer.limit_val_batches=1",
    "trainer.val_check_interval=3", "logger=csv", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null",
    "+trainer.enable_progress_bar=false", "callbacks.sample_media.every_n_steps=1000",
    "callbacks.sample_media.num_samples=2", "callbacks.sample_media.trajectory_samples=1",
]

needs_fashion_mnist = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="real Fashion-MNIST absent: apt-get install dataset-fashion-mnist"
)


def has_beta_schedule(overrides: list[str]) -> bool:
    """Whether the run composed from `overrides` keeps a DDPM beta schedule (flow-matching and EDM runs have none)."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith(("experiment=", "process=", "schedule="))]
    return not any(name.startswith(("rectified_flow", "edm", "flow_matching", "meanflow", "shortcut", "null"))
                   for name in chosen)


def compose_train(overrides: list[str], output_dir: Path):
    """configs/train.yaml composed with TINY (and T=20 for a DDPM schedule), the given overrides and output_dir, as
    Hydra's compose API gives it."""
    GlobalHydra.instance().clear()
    schedule = ["schedule.timesteps=20"] if has_beta_schedule(overrides) else []
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train.yaml", overrides=[*TINY, *schedule, *overrides, f"paths.output_dir={output_dir}",
                                                f"paths.data_dir={output_dir}/data"])


def run_script(script: str, args: list[str], check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python <script> ARGS` from the repository root."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster than several competing for a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny training run on real Fashion-MNIST (3 steps), shared by the tests that read its outputs."""
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("real Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
    from diffusion_lab.train import train

    output_dir = tmp_path_factory.mktemp("run")
    cfg = compose_train(["callbacks.ema.decay=0.5", "callbacks.ema.warmup=false", "callbacks.ema.sigma_rel=null"], output_dir)
    metrics, objects = train(cfg)
    return output_dir, metrics, objects
