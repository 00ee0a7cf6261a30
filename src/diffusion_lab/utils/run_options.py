"""Training options that Python or Lightning would read loosely (a string as true, an ignored key, a run of no steps,
a GPU request dropped), checked before anything is built: each wrong value is one line."""

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from diffusion_lab.utils.errors import ConfigError

SEED_RANGE = (0, 2**32 - 1)  # what numpy's seeding takes; Lightning replaces a seed outside it by 0


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_options(cfg: DictConfig) -> None:
    """The top-level keys and trainer values train.py reads, and what the command line added or chose."""
    if not isinstance(cfg.get("compile"), bool):
        raise ConfigError(f"compile={cfg.get('compile')}; give true or false")
    seed = cfg.get("seed")
    if not is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"seed={seed}; give an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if not is_int(accumulate) or accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate}; give the number of batches per optimizer step (>= 1)")
    max_steps, max_epochs = cfg.trainer.get("max_steps", -1), cfg.trainer.get("max_epochs")
    if max_steps == 0 or (max_steps in (-1, None) and max_epochs == 0):
        raise ConfigError(f"trainer.max_steps={max_steps} trainer.max_epochs={max_epochs} trains nothing; give "
                          "trainer.max_steps=N or trainer.max_epochs=N with N >= 1")
    if HydraConfig.initialized():
        check_added_keys(cfg)
        check_debug_device(cfg)


def check_added_keys(cfg: DictConfig) -> None:
    """`+key=value` that adds a top-level key no config defines: nothing reads it (a typo, or a key that belongs in a
    group, e.g. +lr=1e-4 for optimizer.lr=1e-4)."""
    if not GlobalHydra.instance().is_initialized():
        return
    groups = set(GlobalHydra.instance().config_loader().list_groups(""))
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        key = override.key_or_group
        if (override.is_add() or override.is_force_add()) and not any(c in key for c in "./") and key not in groups:
            raise ConfigError(f"{override.input_line}: nothing reads a top-level key {key!r}; the top-level keys are "
                              f"{', '.join(str(k) for k in cfg if k != key)}")


def check_debug_device(cfg: DictConfig) -> None:
    """A debug mode runs on the CPU (configs/debug/default.yaml): with trainer=gpu or ddp chosen too, say so."""
    choices = HydraConfig.get().runtime.choices
    debug, trainer = choices.get("debug"), choices.get("trainer")
    if debug not in (None, "null") and trainer in ("gpu", "ddp") and cfg.trainer.get("accelerator") == "cpu":
        raise ConfigError(f"debug={debug} runs on the CPU (it sets trainer.accelerator=cpu), but trainer={trainer} asks "
                          f"for GPUs; add trainer.accelerator=gpu to debug on a GPU, or drop trainer={trainer}")
