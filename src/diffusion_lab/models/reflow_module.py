"""Reflow (Liu et al. 2023): flow matching on (noise, sample) pairs that a rectified-flow teacher draws with its ODE.
The pairs are drawn once, at the start of fit, and cached as torch.save shards under `pairs_dir` (the run folder), so
a resumed run reuses them; under DDP each rank draws every world_size-th shard and then reads them all; the student (a flow-matching DiffusionModel, started from the teacher's weights) then
trains on flow matching's loss over those couplings (`FlowMatching.training_losses` with the pair's noise). Repeating it with the student as teacher gives k-reflow."""

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from diffusion_lab.models.diffusion_module import DiffusionModule
from diffusion_lab.models.teacher import init_from_teacher, load_teacher
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_path
from diffusion_lab.utils.seeding import step_seed


class ReflowModule(DiffusionModule):
    """Trains model.net on `num_pairs` teacher pairs (eps, x_0 = teacher_sampler's ODE solution from eps), drawn in
    shards of `shard_size` from seeds of (seed, "reflow", shard). Each training batch draws its pairs at random from
    the cache; the data set sets only the epoch length and the batch size."""

    batches_hold_training_images = False  # it trains on the teacher's samples

    def __init__(self, model, *args, teacher_ckpt: str | None = None, teacher_sampler: Sampler | None = None,
                 num_pairs: int = 50000, shard_size: int = 5000, pairs_dir: str = "reflow_pairs",
                 init_student: bool = True, **kwargs):
        super().__init__(model, *args, **kwargs)
        if model.process_name != "flow_matching":
            raise ConfigError(f"experiment=reflow trains process=flow_matching, not process {model.process_name}")
        if self.cache_latents:
            raise ConfigError("module.cache_latents=true: reflow trains on the teacher's pairs, not on encoded images")
        if not (isinstance(num_pairs, int) and isinstance(shard_size, int) and num_pairs >= 1 and shard_size >= 1):
            raise ConfigError(f"module.num_pairs={num_pairs}, module.shard_size={shard_size} must be integers >= 1")
        if not isinstance(teacher_sampler, Sampler):
            raise ConfigError(f"module.teacher_sampler={teacher_sampler} is not a sampler config; give e.g. "
                              "{_target_: diffusion_lab.samplers.Sampler, algorithm: heun, steps: 50, spacing: uniform}")
        self.teacher = load_teacher(teacher_ckpt, ("flow_matching",), model, "reflow")
        self.teacher_ckpt, self.teacher_sampler = str(teacher_ckpt), teacher_sampler
        self.num_pairs, self.shard_size, self.pairs_dir = num_pairs, shard_size, Path(pairs_dir)
        if init_student:
            init_from_teacher(model, self.teacher.model, teacher_ckpt)
        self.pairs: dict[str, Tensor] = {}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.model.to(self.device)
        self.draw_pairs(self.trainer.global_rank, self.trainer.world_size, self.trainer.strategy.barrier)

    def draw_pairs(self, rank: int, world_size: int, barrier: Callable[[], None]) -> None:
        """Rank `rank` draws (or finds) shards rank, rank + world_size, ...; after `barrier` every rank reads all."""
        sizes = [min(self.shard_size, self.num_pairs - start) for start in range(0, self.num_pairs, self.shard_size)]
        own = {index: self.shard(index, sizes[index]) for index in range(rank, len(sizes), world_size)}
        barrier()
        shards = [own[index] if index in own else self.shard(index, size) for index, size in enumerate(sizes)]
        self.pairs = {key: torch.cat([shard[key] for shard in shards]) for key in ("noise", "samples", "labels")}

    @torch.no_grad()
    def shard(self, index: int, size: int) -> dict[str, Tensor]:
        """Shard `index` of the pair cache, read from `pairs_dir/shard_{index:05d}.pt` when it was drawn by this
        teacher and sampler, else drawn and written there (atomically)."""
        path = self.pairs_dir / f"shard_{index:05d}.pt"
        origin = {"teacher_ckpt": self.teacher_ckpt, "sampler": repr(self.teacher_sampler), "size": size}
        if path.is_file():
            shard = torch.load(path, map_location="cpu", weights_only=True)
            if shard["origin"] != origin:
                raise ConfigError(f"{path} holds pairs of {shard['origin']}, not of {origin}; remove "
                                  f"{self.pairs_dir} or choose another module.pairs_dir")
            return shard
        teacher = self.teacher.model
        generator = torch.Generator(self.device).manual_seed(step_seed(self.seed, "reflow", index))
        noise = torch.randn((size, *teacher.sample_shape), generator=generator, device=self.device)
        labels = (torch.randint(0, teacher.num_classes, (size,), generator=generator, device=self.device)
                  if teacher.conditional else torch.zeros(size, dtype=torch.long, device=self.device))
        samples = torch.cat([
            teacher.sample(noise[i : i + 256], self.teacher_sampler, generator=generator, clip_denoised=False,
                           class_labels=labels[i : i + 256] if teacher.conditional else None)
            for i in range(0, size, 256)
        ])
        shard = {"noise": noise.cpu(), "samples": samples.cpu(), "labels": labels.cpu(), "origin": origin}
        with atomic_path(path) as tmp:
            torch.save(shard, tmp)
        return shard

    def _losses(self, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randint(0, self.num_pairs, (len(batch[0]),), generator=generator, device=generator.device).cpu()
        noise, samples = (self.pairs[key][index].to(self.device) for key in ("noise", "samples"))
        labels = self.pairs["labels"][index].to(self.device) if self.model.conditional else None
        return self.model.loss(samples, generator, labels, noise=noise)
