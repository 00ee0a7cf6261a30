"""Entry-point helpers, the one config mechanism of every command-line program: `hydra_main` (Hydra apps: train.py,
sample.py, `python -m diffusion_lab.data.prepare`) and `compose_config` (programs with arguments of their own:
`python -m diffusion_lab.metrics`, the benchmarks) both read `CONFIG_DIR` with the project's resolvers registered, and
a bad input ends in one clear error line instead of a traceback."""

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.resolvers import register_resolvers

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"  # the repository's configs/ (installed editable from src/)


def user_error(error: BaseException) -> ConfigError | OmegaConfBaseException | None:
    """The ConfigError (or config-resolution error) behind `error`, following Hydra's instantiate wrapping."""
    while error is not None:
        if isinstance(error, OmegaConfBaseException) and error.__context__ is not None:
            cause = user_error(error.__context__)  # a resolver's own error, which OmegaConf wraps
            if isinstance(cause, ConfigError):
                return cause
        if isinstance(error, (ConfigError, OmegaConfBaseException)):
            return error
        error = error.__cause__ if isinstance(error, InstantiationException) else None
    return None


def one_line_errors(fn):
    """Turn ConfigError (and config-resolution errors) into `error: <message>` on stderr and exit code 2.
    HYDRA_FULL_ERROR=1 shows the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, OmegaConfBaseException, InstantiationException) as error:
            cause = user_error(error)
            if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            text = str(cause).strip()
            message = " ".join(text.split()) if isinstance(cause, ConfigError) else text.splitlines()[0]
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def hydra_main(config_name: str) -> Callable[[Callable[[DictConfig], object]], Callable[[], object]]:
    """`@hydra_main("train")`: `hydra.main` over `CONFIG_DIR/<config_name>.yaml` (or a ConfigStore node of that
    name), the task function's errors in one line."""

    def decorate(task: Callable[[DictConfig], object]) -> Callable[[], object]:
        register_resolvers()
        hydra_app = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
        return hydra_app(one_line_errors(task))

    return decorate


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """`CONFIG_DIR/<config_name>.yaml` (or a ConfigStore node) composed with Hydra overrides, as `hydra_main` composes
    it for the command line."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)
