"""Entry-point errors: a bad input ends a command-line program in one clear error line instead of a traceback (its
config comes from diffusion_lab/config.py)."""

import functools
import os
import sys

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

from diffusion_lab.utils.errors import ConfigError


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


def worker_message(text: str) -> str:
    """The message of an error raised in a DataLoader worker process, which torch re-raises in the main process with
    the worker's traceback as its message (`Caught ConfigError in DataLoader worker process 0. Original Traceback
    ...`, ending in the line `module.ConfigError: <message>`); any other text as it is."""
    if text.startswith("Caught ") and "Original Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text


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
            text = worker_message(str(cause).strip())
            message = " ".join(text.split()) if isinstance(cause, ConfigError) else text.splitlines()[0]
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper
