"""Shared by the scaling tests: a tiny folder data set, the overrides that shrink the default run to it, and two
probe callbacks (injected with `+callbacks.<name>._target_=tiny_run.<Class>`, `tests/` on PYTHONPATH)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from lightning import Callback
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STEPS_PER_EPOCH = 4  # 40 images - 8 held out = 32 = 4 batches of 8


def image_folder(root: Path) -> Path:
    """40 random 8x8 grayscale PNGs in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(40):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root


def tiny_overrides(data_root: Path, output_dir: Path, max_steps: int) -> list[str]:
    """The default experiment shrunk to an 8-wide U-Net on 8x8 images, CSV logs, no media, no progress bar."""
    return [
        "data=folder", f"data.root={data_root}", "data.image_size=8", "data.channels=1", "data.batch_size=8",
        "data.val_size=8", "model.dim=8", "model.dim_mults=[1,2]", "model.attn_heads=1", "model.attn_dim_head=8",
        "schedule.timesteps=20", "logger=csv", "callbacks.sample_media=null", "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null", "+trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
        f"trainer.max_steps={max_steps}", "trainer.max_epochs=-1", f"paths.output_dir={output_dir}",
        f"paths.log_dir={output_dir.parent / 'logs'}",
    ]


def run_train(args: list[str], timeout: float = 400, check: bool = True) -> subprocess.CompletedProcess:
    """`python train.py ARGS` from the repository root, with tests/ importable (for the probe callbacks)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


class SendSignal(Callback):
    """Sends `signum` to this process once, from Lightning hook `hook` when `trainer.global_step == at_step`
    (`on_train_batch_end`: after optimizer step `at_step`): a deterministic stand-in for a preemption or Ctrl-C."""

    def __init__(self, at_step: int, signum: str = "SIGTERM", hook: str = "on_train_batch_end"):
        self.at_step, self.signum, self.sent = at_step, getattr(signal, signum), False
        setattr(self, hook, self.send)

    def send(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step == self.at_step and not trainer.sanity_checking and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class PoisonBatch(Callback):
    """Fills the images of the batch of step `at_step + 1` with NaN: that step's loss is not finite."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            batch[0].fill_(float("nan"))


class StartTwin(Callback):
    """Starts a second run on this run's folder (resuming it, ckpt_path=auto) while this one trains."""

    def on_train_start(self, trainer, pl_module) -> None:
        from omegaconf import OmegaConf

        from diffusion_lab.train import train

        train(OmegaConf.create({**pl_module.run_config, "ckpt_path": "auto"}))


class RankProbe(Callback):
    """Each rank writes `<dirpath>/rank<r>.pt`: its first training batch and, at the end, its raw weights."""

    def __init__(self, dirpath: str):
        self.dirpath, self.first_batch = Path(dirpath), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = batch[0].detach().cpu().clone()

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        weights = {name: value.detach().cpu().clone() for name, value in pl_module.state_dict().items()}
        torch.save({"first_batch": self.first_batch, "weights": weights, "world_size": trainer.world_size},
                   self.dirpath / f"rank{trainer.global_rank}.pt")
