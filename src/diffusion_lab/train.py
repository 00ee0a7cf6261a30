"""`train(cfg)`: build data, process, backbone, callbacks, loggers and trainer from a composed config, then fit."""

import fcntl
import logging
import os
import signal
import sys
import threading
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from diffusion_lab.builders import build_model, build_standalone_net, to_memory_format
from diffusion_lab.metrics.encoders import load_patch_encoder
from diffusion_lab.models.diffusion_module import DiffusionModule
from diffusion_lab.models.representation import RepresentationTerms
from diffusion_lab.utils.checkpoint import AtomicCheckpointIO, check_same_run, flatten, load_checkpoint, saved_step
from diffusion_lab.utils.errors import ConfigError, NonFiniteError
from diffusion_lab.utils.io import atomic_path, check_writable_folder
from diffusion_lab.utils.quiet import silence_library_noise
from diffusion_lab.utils.run_options import check_run_options


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Every entry of a group of `_target_` configs (callbacks, loggers); entries set to null are skipped."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def resolve_ckpt_path(cfg: DictConfig) -> None:
    """ckpt_path=auto: resume in place from `<output_dir>/checkpoints/last.ckpt` (else its newest checkpoint) when
    there is one (a requeued or restarted job), else start fresh."""
    if cfg.get("ckpt_path") == "auto":
        newest = newest_checkpoint(cfg)
        with open_dict(cfg):
            cfg.ckpt_path = str(newest[0]) if newest else None


@contextmanager
def claim_output_dir(cfg: DictConfig):
    """Holds `<output_dir>/.lock` (an flock, gone with the process) for the run, so two runs never interleave in one
    folder; a folder that holds checkpoints takes only a run resumed from one of them (ckpt_path=auto).
    DDP ranks > 0 share rank 0's folder and claim nothing."""
    if rank_zero_only.rank != 0:
        yield
        return
    check_writable_folder(cfg.paths.output_dir, "paths.output_dir")
    output_dir = Path(cfg.paths.output_dir).resolve()
    ckpt_path = cfg.get("ckpt_path")
    in_place = ckpt_path is not None and output_dir in Path(ckpt_path).resolve().parents
    if not in_place and any((output_dir / "checkpoints").glob("*.ckpt")):
        raise ConfigError(f"paths.output_dir={output_dir} already holds a run's checkpoints; continue it with "
                          "ckpt_path=auto, or choose another paths.output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ConfigError(f"paths.output_dir={output_dir} is in use by another run (pid {lock.read().strip() or '?'}); "
                              "wait for it to end or choose another paths.output_dir") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


@contextmanager
def ctrl_c_as_sigterm():
    """Ctrl-C (SIGINT) takes Lightning's SIGTERM path: the run stops after the optimizer step or validation batch
    in flight with a whole last.ckpt; a second Ctrl-C interrupts at once and saves nothing. Yields the signals seen."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield received
        return

    def on_sigint(signum, frame) -> None:
        received.append(signum)
        signal.signal(signal.SIGINT, previous)
        signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def newest_checkpoint(cfg: DictConfig) -> tuple[Path, int] | None:
    """`<output_dir>/checkpoints/last.ckpt` and its step; without a readable one, the checkpoint of the latest step
    there (a save of last.ckpt that failed after the best was written); None when there is none."""
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    steps = {path: saved_step(path) for path in [folder / "last.ckpt", *sorted(folder.glob("step_*.ckpt"))]}
    readable = [(path, step) for path, step in steps.items() if step is not None]
    return readable[0] if readable and readable[0][0].name == "last.ckpt" else max(readable, key=lambda r: r[1], default=None)


def last_checkpoint_note(cfg: DictConfig) -> str:
    """Which checkpoint the run folder holds and its step, for the line that ends a stopped run."""
    newest = newest_checkpoint(cfg)
    return f"{newest[0]} holds step {newest[1]}" if newest else "no checkpoint was written"


def check_resume(cfg: DictConfig) -> dict[str, Any]:
    """A resume checkpoint must exist, be readable and hold the same run as this one (`check_same_run`: the keys
    that define a run match, or resume.allow_changes names them); returns it."""
    checkpoint = load_checkpoint(cfg.ckpt_path)
    allowed = list((cfg.get("resume") or {}).get("allow_changes") or [])
    check_same_run(checkpoint, OmegaConf.to_container(cfg, resolve=True), cfg.ckpt_path, allowed)
    return checkpoint


def configure_wandb(cfg: DictConfig, resumed: dict[str, Any] | None) -> None:
    """Fix the W&B run id before anything is saved, so every checkpoint's config carries it and a resumed run
    continues the same dashboard run; jobs of one multirun are grouped by the sweep folder's name."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if not wandb_cfg:
        return
    saved = ((resumed or {}).get("config", {}).get("logger") or {}).get("wandb") or {}
    with open_dict(cfg):
        if wandb_cfg.id is None:
            wandb_cfg.id = saved.get("id") or uuid.uuid4().hex[:12]
        if not wandb_cfg.get("group") and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            wandb_cfg.group = Path(HydraConfig.get().sweep.dir).name


def compile_net(net: nn.Module) -> nn.Module:
    """`compile=true`: torch.compile the backbone in place (`nn.Module.compile`, so state-dict keys gain no
    `_orig_mod.` prefix and checkpoints load uncompiled); where TorchDynamo is unsupported, one warning and eager."""
    if not torch._dynamo.is_dynamo_supported():
        warnings.warn("compile=true: torch.compile is not supported on this platform; training uncompiled", stacklevel=2)
        return net
    net.compile()
    return net


def check_sampler(model: nn.Module, sampler: Any) -> None:
    """The run's sampler must lay out its grid on the model's process (spacing, steps) before training starts, not
    at the first sample grid hours later."""
    sampler.check(*model.sampling_grid(sampler))


@rank_zero_only  # DDP ranks > 0 share rank 0's run folder
def write_run_record(cfg: DictConfig) -> None:
    """`<output_dir>/.hydra/`: config.yaml with every interpolation resolved and, under Hydra, the hydra.yaml and
    overrides.yaml Hydra writes itself when `hydra.output_subdir` is set; here only once the folder is this run's."""
    record = Path(cfg.paths.output_dir) / ".hydra"
    with atomic_path(record / "config.yaml") as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)
    if HydraConfig.initialized():
        for name, node in (("hydra.yaml", HydraConfig.instance().cfg), ("overrides.yaml", HydraConfig.get().overrides.task)):
            with atomic_path(record / name) as tmp:
                OmegaConf.save(node, tmp)


@contextmanager
def run_log_file(cfg: DictConfig):
    """Rank 0's Python logging, Lightning's own loggers (which do not propagate to the root) included, also goes to
    `<output_dir>/train.log` while the run lasts."""
    if rank_zero_only.rank != 0:
        yield
        return
    handler = logging.FileHandler(Path(cfg.paths.output_dir) / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")
                                       if not logging.getLogger(name).propagate]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def instantiate_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger]) -> Trainer:
    """The Lightning Trainer of `cfg.trainer`; a value it refuses (an unknown key, an accelerator this machine lacks)
    is one line."""
    try:
        return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])
    except InstantiationException as error:
        if isinstance(error.__cause__, (MisconfigurationException, TypeError, ValueError)):
            raise ConfigError(f"trainer: {str(error.__cause__).strip().splitlines()[0]}") from error
        raise


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the model of `cfg`; returns (metrics logged at the end, built objects)."""
    if HydraConfig.initialized():
        with open_dict(cfg):
            cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    check_run_options(cfg)
    silence_library_noise()
    resolve_ckpt_path(cfg)
    resumed = check_resume(cfg) if cfg.get("ckpt_path") else None  # reads only: a refused run writes nothing
    with claim_output_dir(cfg):
        configure_wandb(cfg, resumed)
        write_run_record(cfg)
        with run_log_file(cfg):
            return fit(cfg)


def build_representation(cfg: DictConfig, net: nn.Module) -> RepresentationTerms | None:
    """The representation terms of `cfg.representation` (REPA, the dispersive loss) on the backbone, REPA's encoder
    loaded from its file; None without them or with both weights 0, so that such a run is one without them."""
    options = cfg.get("representation")
    if not options or not (options.get("repa_weight") or options.get("disp_weight")):
        return None
    source = options.get("encoder") or {}
    encoder = load_patch_encoder(source.get("kind"), source.get("path")) if options.get("repa_weight") else None
    return instantiate(options, _partial_=True)(net=net, encoder=encoder)


def fit(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Build everything from `cfg` and fit; a stopped run ends in one line saying which step last.ckpt holds."""
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    diffusion = issubclass(get_class(cfg.module._target_), DiffusionModule)
    model = build_model(cfg) if diffusion else build_standalone_net(cfg)  # the autoencoder and the classifier
    if diffusion:
        check_sampler(model, instantiate(cfg.sampler))
    if cfg.compile:
        compile_net(model.net if diffusion else model)
    representation = build_representation(cfg, model.net) if diffusion else None
    module = instantiate(cfg.module, _partial_=True)(
        model=model,
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        seed=cfg.seed,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        **({"representation": representation} if representation is not None else {}),
    )
    callbacks: list[Callback] = instantiate_group(cfg.get("callbacks"))
    loggers: list[Logger] = instantiate_group(cfg.get("logger"))
    if not loggers:  # logger=none: the learning-rate monitor has nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = instantiate_trainer(cfg, callbacks, loggers)
    to_memory_format(model.net if diffusion else model, cfg.get("channels_last"), trainer.strategy.root_device)
    for logger in loggers:
        logger.log_hyperparams(flatten(OmegaConf.to_container(cfg, resolve=True)))

    try:
        with ctrl_c_as_sigterm() as received:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException as error:  # preempted or Ctrl-C: exit 128 + signal number, as the shell reports it
        signum = received[0] if received else signal.SIGTERM
        if rank_zero_only.rank == 0:
            print(f"stopped by {signal.Signals(signum).name} after step {trainer.global_step}; {last_checkpoint_note(cfg)}; "
                  f"continue with ckpt_path=auto paths.output_dir={cfg.paths.output_dir}", file=sys.stderr)
        raise SystemExit(128 + signum) from error
    except (NonFiniteError, OSError) as error:  # a NaN loss, weights or samples; OSError: a full disk, a lost mount
        raise ConfigError(f"{error}; {last_checkpoint_note(cfg)}") from error
    finally:
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()  # each multirun job is its own W&B run, finished before the next job starts
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}
