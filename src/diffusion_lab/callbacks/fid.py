"""Every N training steps: FID (optionally KID and the NLL bound) of samples from the EMA weights, logged as
`val/fid` so that ModelCheckpoint can monitor it and hparams_search can optimize it."""

import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning import Callback, LightningModule, Trainer

from diffusion_lab.callbacks.ema import averaged_or_current
from diffusion_lab.generate import generate
from diffusion_lab.metrics.evaluate import add_real_images, sample_scores, split_images
from diffusion_lab.metrics.extractors import classifier_path_for
from diffusion_lab.metrics.nll import bits_per_dim, bound_protocol, check_bound
from diffusion_lab.metrics.scores import SampleScores
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.seeding import step_seed


class FID(Callback):
    """Every `every_n_steps` optimizer steps: `num_samples` samples with `sampler` (None: the run's own) from the
    EMA weights, shared among the ranks (rank r draws samples r, r + W, ...: exactly N in all), scored against
    the features of the `real_split` images (computed once on rank 0 and cached in `cache_dir`), by the functions
    and options (configs/metrics/common.yaml) that score sample.py's samples: `sample_scores`, `add_real_images`,
    the data set's shipped classifier where `classifier_path` is null. Logs `val/fid`
    and `val/fid_num_samples` (a small N gives a biased, higher FID: a proxy to compare runs, not the paper
    number), `val/kid_mean` when `kid`, `val/nll_bpd` over the first `nll_images` real images when > 0; appends
    each evaluation with its protocol to `<dirpath>/scores.jsonl`."""

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        batch_size: int = 250,
        sampler: Sampler | None = None,
        extractor: str = "classifier",
        classifier_path: str | None = None,
        weights_path: str | None = None,
        real_split: str = "test",
        cache_dir: str = "~/.cache/diffusion_lab/real_features",
        kid: bool = False,
        nll_images: int = 0,
        nll_variance: str = "large",
        seed: int = 0,
    ):
        for key, value, low in (("every_n_steps", every_n_steps, 1), ("num_samples", num_samples, 2),
                                ("batch_size", batch_size, 1), ("nll_images", nll_images, 0)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"callbacks.fid.{key}={value} must be an integer >= {low}")
        self.dirpath, self.every_n_steps, self.num_samples = Path(dirpath), every_n_steps, num_samples
        self.batch_size, self.sampler, self.real_split = batch_size, sampler, real_split
        self.options = {"extractor": extractor, "classifier_path": classifier_path, "weights_path": weights_path,
                        "real_split": real_split, "cache_dir": cache_dir, "batch_size": batch_size, "fid": {},
                        **({"kid": {}} if kid else {})}  # sample.py's metrics=[fid] (and kid) options
        self.nll_images, self.nll_variance, self.seed = nll_images, nll_variance, seed
        self.scores: SampleScores | None = None
        self.protocol: dict = {}
        self._last_step = -1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.nll_images:
            check_bound(pl_module.model)  # at the start, not at the first evaluation
        if self.scores is None:
            data = pl_module.run_config.get("data", {})
            self.options["classifier_path"] = classifier_path_for(self.options, data)
            self.scores = sample_scores(self.options)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module)

    def _add_real_images(self, trainer: Trainer) -> None:
        """Real features into the metrics, on global rank 0 only (the states are summed over ranks)."""
        images, _ = split_images(trainer.datamodule, self.real_split)
        self.protocol.update(real_split=self.real_split, real_size=len(images))
        if trainer.global_rank == 0:
            self.protocol.update(add_real_images(self.scores, images, self.options, self.scores.device))

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        module = averaged_or_current(trainer, pl_module)
        rank, world = trainer.global_rank, trainer.world_size
        self.scores.to(pl_module.device)
        if not self.protocol:
            self._add_real_images(trainer)
        self.scores.reset()

        sampler = self.sampler if self.sampler is not None else instantiate(pl_module.run_config["sampler"])
        model = module.model
        labels = list(range(model.num_classes)) if model.conditional else None
        share = len(range(rank, self.num_samples, world))
        if share:
            out = generate(model, sampler, share, self.batch_size, seed=step_seed(self.seed, rank, "fid"),
                           class_labels=labels)
            for batch in torch.from_numpy(out.samples).permute(0, 3, 1, 2).split(self.batch_size):
                self.scores.update(batch)
        scores = self.scores.compute(seed=self.seed)
        if self.nll_images:
            scores["nll_bpd"] = self._nll(trainer, model)

        step = trainer.global_step
        logged = {f"val/{name}": value for name, value in scores.items()} | {"val/fid_num_samples": float(self.num_samples)}
        for name, value in logged.items():  # into callback_metrics, for ModelCheckpoint and sweepers
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=False)
        for logger in trainer.loggers:  # now, whatever trainer.log_every_n_steps is
            logger.log_metrics(logged, step=step)
        if rank == 0:
            protocol = {**self.protocol, "num_samples": self.num_samples, "sampler": str(sampler),
                        "steps": sampler.steps, "network_evaluations": sampler.evaluations_used, "seed": self.seed, "weights": "ema" if module is not pl_module else "raw"}
            if self.nll_images:
                protocol.update(nll_images=self.nll_images, **bound_protocol(model.process, self.nll_variance, True))
            self.dirpath.mkdir(parents=True, exist_ok=True)
            with open(self.dirpath / "scores.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **scores, "protocol": protocol}) + "\n")
        return scores

    def _nll(self, trainer: Trainer, model: DiffusionModel) -> float:
        """Mean bound in bits/dim over the first `nll_images` real images, each rank taking every W-th one."""
        images, labels = split_images(trainer.datamodule, self.real_split)
        images, labels = images[: self.nll_images], labels[: self.nll_images]
        mine = slice(trainer.global_rank, None, trainer.world_size)
        device = trainer.lightning_module.device
        generator = torch.Generator(device).manual_seed(step_seed(self.seed, trainer.global_rank, "nll"))
        total = torch.zeros((), dtype=torch.float64, device=device)
        for x0, y in zip(images[mine].split(self.batch_size), labels[mine].split(self.batch_size)):
            x0 = x0.to(device).double() / 127.5 - 1
            total += bits_per_dim(model, x0, generator, self.nll_variance, class_labels=y.to(device)).sum()
        return float(trainer.strategy.reduce(total, reduce_op="sum")) / len(images)
