"""Files: writing so that nothing already written is lost (write to a temporary name beside the target, then rename),
whether a folder can be written, and where the torch hub cache keeps downloaded weights."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from diffusion_lab.utils.errors import ConfigError


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path next to `path`; on success renames it onto `path`, on failure removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable_folder(path: str | Path, key: str) -> None:
    """ConfigError (one line naming `key`) unless `path` is, or can be made, a folder this process writes into: not a
    file, not under a file, not read-only (tried with a temporary file in the nearest existing folder, gone at once:
    permission bits alone do not stop root). Creates nothing."""
    path = Path(path).absolute()
    nearest = next(folder for folder in (path, *path.parents) if folder.exists())
    if not nearest.is_dir():
        raise ConfigError(f"{key}={path} cannot be a folder: {nearest} is a file; choose another {key}")
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as error:
        raise ConfigError(f"{key}={path} cannot be written: {error.strerror} in {nearest}; choose another {key}") from error


def hub_checkpoint(url: str) -> Path:
    """Where `torch.hub.load_state_dict_from_url(url)` keeps its file: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
