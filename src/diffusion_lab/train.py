"""`train(cfg)`: build data, process, backbone, callbacks, loggers and trainer from a composed config, then fit."""

from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning import Callback, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.builders import build_net, build_process
from diffusion_lab.utils.checkpoint import AtomicCheckpointIO, load_checkpoint
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_path


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Every entry of a group of `_target_` configs (callbacks, loggers); entries set to null are skipped."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def check_resume(cfg: DictConfig) -> None:
    """A resume checkpoint must exist, be readable and hold the same network as this run."""
    checkpoint = load_checkpoint(cfg.ckpt_path)
    saved_model = checkpoint["config"].get("model", {})
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if saved_model != model:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} holds model {saved_model.get('_target_', '?')} {saved_model}, but this run's model is "
            f"{model}; resume with the same model overrides"
        )


def write_resolved_config(cfg: DictConfig, output_dir: str) -> None:
    """`<output_dir>/.hydra/config.yaml` with every interpolation resolved (Hydra writes it unresolved)."""
    with atomic_path(f"{output_dir}/.hydra/config.yaml") as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the model of `cfg`; returns (metrics logged at the end, built objects)."""
    if HydraConfig.initialized():
        with open_dict(cfg):
            cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    write_resolved_config(cfg, cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("ckpt_path"):
        check_resume(cfg)

    datamodule = instantiate(cfg.data)
    process = build_process(cfg)
    net = build_net(cfg, process)
    module = instantiate(cfg.module, _partial_=True)(
        net=net,
        process=process,
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        seed=cfg.seed,
        conditional=cfg.data.get("conditional", False),
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    callbacks: list[Callback] = instantiate_group(cfg.get("callbacks"))
    loggers: list[Logger] = instantiate_group(cfg.get("logger"))
    trainer: Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}
