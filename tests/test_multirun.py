"""Sweeps: a `-m` grid runs one job per value, each in its own folder, each its own W&B run grouped by the sweep;
the optuna and SLURM launcher configs compose."""

import pytest
import yaml
from hydra import compose, initialize_config_dir

from diffusion_lab.config import register_resolvers
from tiny_run import ROOT, image_folder, run_train, tiny_overrides


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_grid_runs_one_job_per_value(tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(image_folder(tmp_path / "images"), tmp_path / "unused", max_steps=2)
                 if not o.startswith("paths.output_dir")]
    run_train(["-m", *overrides, "schedule=linear,cosine", f"hydra.sweep.dir={sweep_dir}", "logger=wandb",
               "+logger.csv._target_=lightning.pytorch.loggers.CSVLogger", "+logger.csv.save_dir=${paths.output_dir}"])
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [job.name for job in jobs] == ["0", "1"]
    configs = [yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) for job in jobs]
    assert [c["schedule"]["name"] for c in configs] == ["linear", "cosine"]
    assert all((job / "checkpoints" / "last.ckpt").is_file() for job in jobs)
    assert [c["paths"]["output_dir"] for c in configs] == [str(job) for job in jobs]
    wandb = [c["logger"]["wandb"] for c in configs]
    assert wandb[0]["id"] != wandb[1]["id"]
    assert wandb[0]["group"] == wandb[1]["group"] == sweep_dir.name
    # each job its own (offline) W&B run, finished: two run folders
    assert all(len(list((job / "wandb").glob("offline-run-*"))) == 1 for job in jobs)


@pytest.mark.parametrize("overrides", [["hparams_search=optuna"], ["hydra/launcher=slurm"]])
def test_sweeper_and_launcher_configs_compose(overrides):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper" if "optuna" in overrides[0] else "hydra_plugins.hydra_submitit_launcher")
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides, return_hydra_config=True)
    if "optuna" in overrides[0]:
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
        assert cfg.optimized_metric == "val/loss"
    else:
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
