"""Starting the processes of a command: one per device through Lightning Fabric (sampling, latent encoding)."""

import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig

from diffusion_lab.utils.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """The device of `device=NAME`: auto (CUDA when there is one, else the CPU), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def launch(cfg: DictConfig) -> Fabric:
    """One process per device through Lightning Fabric: over `trainer=` (its accelerator, devices, num_nodes and
    strategy, e.g. trainer=ddp trainer.devices=8) when chosen, else one process on `device`."""
    trainer = cfg.get("trainer")
    if trainer is None:
        device = resolve_device(cfg.device)
        fabric = Fabric(accelerator=device.type, devices=[device.index] if device.index is not None else 1)
    else:
        fabric = Fabric(accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.get("num_nodes", 1),
                        strategy=trainer.get("strategy", "auto"))
    fabric.launch()
    return fabric
