"""Writing files so that nothing already written is lost: write to a temporary name beside the target, then rename."""

import os
from contextlib import contextmanager
from pathlib import Path

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
    """ConfigError unless `path` is a folder this process may write into, or one it may create."""
    path = Path(path).absolute()
    nearest = next(folder for folder in (path, *path.parents) if folder.exists())
    if not nearest.is_dir():
        raise ConfigError(f"{key}={path} cannot be a folder: {nearest} is a file; choose another {key}")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} cannot be written: {nearest} is read-only for this user; choose another {key}")
