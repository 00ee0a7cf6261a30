"""Runs many command lines of this project's programs, each in its own process forked from one interpreter that
imported torch, Lightning and Hydra once: a command that stops at a bad input costs a fork, not the seconds of a
fresh `import torch`. Each child runs the program as `python PROGRAM ARGS` would (`runpy`, `__main__`), with its
own stdout and stderr, and exits as Python does (an uncaught exception: its traceback on stderr, exit code 1).

    python tests/cli_forks.py < cases.json > results.json
    cases: [{"program": "sample.py" | "train.py" | "-m diffusion_lab.metrics" | ..., "args": [...]}, ...]
    results: [{"returncode": int, "seconds": float, "stdout": str, "stderr": str}, ...] (returncode -9: killed at
    the timeout)
"""

import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # per command
PARALLEL = 2


def preload() -> None:
    """The heavy imports every program shares, done once before forking (no torch computation: a fork after one
    could inherit a busy thread pool)."""
    import hydra  # noqa: F401
    import lightning  # noqa: F401
    import litdata  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import diffusion_lab.sample  # noqa: F401
    import diffusion_lab.train  # noqa: F401


def run_in_child(program: str, args: list[str]) -> int:
    """The exit code of `python PROGRAM ARGS` run in this (forked) process."""
    os.chdir(ROOT)
    try:
        if program.startswith("-m "):
            sys.argv = [program[3:], *args]
            runpy.run_module(program[3:], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [program, *args]
            runpy.run_path(str(ROOT / program), run_name="__main__")
    except SystemExit as end:
        if end.code is None or isinstance(end.code, int):
            return end.code or 0
        print(end.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - what the interpreter would print for an uncaught exception
        traceback.print_exc()
        return 1
    return 0


def start(case: dict, folder: Path) -> int:
    """Forks a child running `case` with stdout / stderr into `folder`; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for stream, name in ((sys.stdout, "stdout"), (sys.stderr, "stderr")):
            stream.flush()
            os.dup2(os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), stream.fileno())
        code = run_in_child(case["program"], case["args"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_cases(cases: list[dict]) -> list[dict]:
    """Every case, at most PARALLEL at a time; each killed after TIMEOUT_S."""
    results: list[dict | None] = [None] * len(cases)
    with tempfile.TemporaryDirectory() as tmp:
        running: dict[int, tuple[int, float]] = {}  # pid: (case index, start time)
        pending = list(range(len(cases)))
        while pending or running:
            while pending and len(running) < PARALLEL:
                index = pending.pop(0)
                (Path(tmp) / str(index)).mkdir()
                running[start(cases[index], Path(tmp) / str(index))] = (index, time.monotonic())
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                for late, (_, began) in running.items():
                    if time.monotonic() - began > TIMEOUT_S:
                        os.kill(late, signal.SIGKILL)
                time.sleep(0.02)
                continue
            index, began = running.pop(pid)
            folder = Path(tmp) / str(index)
            results[index] = {"returncode": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - began,
                              **{name: (folder / name).read_text(errors="replace") for name in ("stdout", "stderr")}}
    return results


if __name__ == "__main__":
    preload()
    json.dump(run_cases(json.load(sys.stdin)), sys.stdout)
