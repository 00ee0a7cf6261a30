"""Post-hoc EMA: `python -m diffusion_lab.posthoc_ema RUN sigma_rel=S out=CKPT [step=N] [max_profile_error=E]`.

From the snapshots a run trained with `callbacks=[default,posthoc_ema]` wrote, builds the power-function EMA of
length `sigma_rel` (EDM2: 0.05..0.15 typical) at `step` (default: the latest snapshot) and writes RUN's last.ckpt with
those EMA weights to `out`, for `python sample.py ckpt_path=CKPT`. A length the snapshots fit only to more than
`max_profile_error` (relative L2 error of the averaging profile; default 0.05) is refused, naming the range they reach.
"""

import sys

import torch

from diffusion_lab.ema.snapshots import reconstruct_checkpoint
from diffusion_lab.utils.cli import one_line_errors
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_path

USAGE = "usage: python -m diffusion_lab.posthoc_ema RUN sigma_rel=S out=CKPT [step=N] [max_profile_error=E]"
OPTIONS = {"sigma_rel": float, "out": str, "step": int, "max_profile_error": float}


def parse(argv: list[str]) -> tuple[str, dict]:
    """RUN and the key=value options, each converted to its type; ConfigError naming what is wrong."""
    if not argv or "=" in argv[0]:
        raise ConfigError(USAGE)
    options = {}
    for argument in argv[1:]:
        key, _, value = argument.partition("=")
        if key not in OPTIONS or not value:
            raise ConfigError(f"{argument!r}: expected one of {', '.join(f'{k}=' for k in OPTIONS)}; {USAGE}")
        try:
            options[key] = OPTIONS[key](value)
        except ValueError as error:
            raise ConfigError(f"{key}={value} is not a {OPTIONS[key].__name__}") from error
    missing = [key for key in ("sigma_rel", "out") if key not in options]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} missing; {USAGE}")
    return argv[0], options


@one_line_errors
def main(argv: list[str]) -> None:
    run, options = parse(argv)
    out = options.pop("out")
    checkpoint = reconstruct_checkpoint(run, **options)
    with atomic_path(out) as tmp:
        torch.save(checkpoint, tmp)
    record = checkpoint["posthoc_ema"]
    print(f"{out}: EMA sigma_rel={record['sigma_rel']} (gamma {record['gamma']:.2f}) at step {record['step']} from "
          f"{len(record['snapshots'])} snapshots, profile error {record['profile_error']:.2%}")


if __name__ == "__main__":
    main(sys.argv[1:])
