"""A Hydra callback: a run folder that cannot be created ends in one line before Hydra tries (and fails with a
traceback)."""

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.utils.cli import one_line_errors
from diffusion_lab.utils.io import check_writable_folder


class CheckOutputDir(Callback):
    """Checks `paths.output_dir` (a run) or `hydra.sweep.dir` (a multirun) is, or can become, a writable folder."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        one_line_errors(check_writable_folder)(OmegaConf.select(config, "hydra.run.dir"), "paths.output_dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        one_line_errors(check_writable_folder)(OmegaConf.select(config, "hydra.sweep.dir"), "hydra.sweep.dir")
