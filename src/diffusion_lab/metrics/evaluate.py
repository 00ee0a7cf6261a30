"""Scores of generated images and the likelihood bound of a model, each written with its protocol: what was
compared with what, by which extractor (and the hash of its weights), how the samples were drawn."""

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from diffusion_lab.metrics.extractors import build_extractor, classifier_path_for, weights_hash
from diffusion_lab.metrics.nll import bits_per_dim, bound_protocol, check_bound
from diffusion_lab.metrics.real_features import data_hash, real_features
from diffusion_lab.metrics.scores import SAMPLE_METRICS, SampleScores
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_path

REAL_SPLITS = ("train", "val", "test")


def split_images(datamodule: Any, split: str) -> tuple[Tensor, Tensor]:
    """uint8 images (N, C, H, W) and labels of one split of an `ImageDataModule`."""
    if split not in REAL_SPLITS:
        raise ConfigError(f"metrics.real_split={split!r} is not a split; choose one of {', '.join(REAL_SPLITS)}")
    datamodule.setup("test" if split == "test" else "fit")
    dataset = {"train": datamodule.train_set, "val": datamodule.val_set, "test": datamodule.test_set}[split]
    return dataset.images, dataset.labels


def data_split(data_config: Mapping, split: str) -> tuple[Tensor, Tensor]:
    """`split_images` of the data module a (saved) data config describes."""
    return split_images(instantiate(dict(data_config)), split)


def extractor_from(options: Mapping) -> nn.Module:
    return build_extractor(options["extractor"], options.get("weights_path"), options.get("classifier_path"))


def sample_scores(options: Mapping) -> SampleScores:
    """The metrics of SAMPLE_METRICS present as keys of `options` (configs/metrics, its classifier_path resolved by
    `classifier_path_for`), over the extractor they name: sample.py, `python -m diffusion_lab.metrics`, the sweep
    and the FID callback all score through this one and `add_real_images`."""
    names = tuple(name for name in SAMPLE_METRICS if name in options)
    extractor = extractor_from(options)
    kid, prec_recall, inception_score = (options.get(name) or {} for name in ("kid", "prec_recall", "is"))
    return SampleScores(extractor, names, kid.get("subsets", 100), kid.get("subset_size", 1000), prec_recall.get("k", 3),
                        inception_score.get("splits", 10))


def add_real_images(scores: SampleScores, real_images: Tensor, options: Mapping, device: torch.device) -> dict:
    """The extractor's features of `real_images` (uint8, cached in `options["cache_dir"]`) into `scores`; the
    protocol of that comparison: which split, how many images, their hash, the extractor and its weights' hash, the
    metrics' own settings."""
    cache_dir = Path(options["cache_dir"]).expanduser()
    for output in scores.real_inputs:
        real = real_features(scores.extractor, real_images, cache_dir, options["batch_size"], device, output)
        scores.add_real(real.features, output)
    return {"real_split": options["real_split"], "real_size": len(real_images), "real_data_hash": data_hash(real_images),
            "extractor": scores.extractor.name, "extractor_hash": weights_hash(scores.extractor),
            **metric_settings(scores)}


def metric_settings(scores: SampleScores) -> dict:
    """The settings of the selected metrics that change their values: IS splits, KID subsets and size, k of the
    precision / recall manifolds."""
    metrics, settings = scores.metrics, {}
    if "is" in metrics:
        settings["is_splits"] = metrics["is"].splits
    if "kid" in metrics:
        settings.update(kid_subsets=metrics["kid"].subsets, kid_subset_size=metrics["kid"].max_subset_size)
    if "prec_recall" in metrics:
        settings["prec_recall_k"] = metrics["prec_recall"].k
    return settings


def score_samples(samples: Tensor, real_images: Tensor, options: Mapping, device: torch.device, seed: int = 0) -> dict:
    """FID / KID / precision-recall / IS / sFID (`sample_scores`) of uint8 samples (N, C, H, W) against
    `real_images`, every sample scored once; the scores and their protocol."""
    scores = sample_scores(options).to(device)
    protocol = {"num_samples": len(samples), **add_real_images(scores, real_images, options, device)}
    for batch in samples.split(options["batch_size"]):
        scores.update(batch)
    return {**scores.compute(seed), "protocol": protocol}


def nll_bits_per_dim(
    model: nn.Module,
    images: Tensor,
    options: Mapping,
    device: torch.device,
    seed: int = 0,
    labels: Tensor | None = None,
) -> dict:
    """Mean (and standard error) over `images` (uint8) of the variational bound in bits/dim, with its protocol."""
    check_bound(model)
    nll = options["nll"]
    generator = torch.Generator(device).manual_seed(seed)
    totals = []
    for start in range(0, len(images), options["batch_size"]):
        x0 = images[start : start + options["batch_size"]].to(device).double() / 127.5 - 1
        batch_labels = None if labels is None else labels[start : start + len(x0)].to(device)
        totals.append(bits_per_dim(model, x0, generator, nll["variance"], nll["clip_denoised"], batch_labels).cpu())
    totals = torch.cat(totals)
    protocol = {
        "num_images": len(images),
        "real_split": options["real_split"],
        "timesteps": model.process.num_timesteps,
        "seed": seed,
        **bound_protocol(model.process, nll["variance"], nll["clip_denoised"]),
    }
    standard_error = float(totals.std() / len(totals) ** 0.5) if len(totals) > 1 else float("nan")
    return {"nll_bpd": float(totals.mean()), "nll_bpd_stderr": standard_error, "protocol": protocol}


def needs_samples(options: Mapping) -> bool:
    """Whether any selected metric scores samples (nll alone needs none)."""
    return any(name in options for name in SAMPLE_METRICS)


def fewest_samples(options: Mapping) -> dict[str, tuple[int, str]]:
    """The fewest samples each selected sample metric scores, and why: two for a covariance (FID, sFID) or a kernel
    estimate over pairs (KID), k + 1 for each sample's k-th nearest other sample (precision / recall), one per
    split (IS)."""
    k = (options.get("prec_recall") or {}).get("k", 3)
    splits = (options.get("is") or {}).get("splits", 10)
    need = {"fid": (2, "a covariance"), "sfid": (2, "a covariance"), "kid": (2, "pairs of samples"),
            "prec_recall": (k + 1, f"each sample's metrics.prec_recall.k={k}-th nearest other sample"),
            "is": (splits, f"one sample per split of metrics.is.splits={splits}")}
    return {name: need[name] for name in SAMPLE_METRICS if name in options}


def check_sample_count(options: Mapping, num_samples: int, what: str | None = None) -> None:
    """ConfigError when `num_samples` samples (`what`: how the message names them) are too few for a selected metric
    (`fewest_samples`)."""
    for name, (fewest, why) in fewest_samples(options).items():
        if num_samples < fewest:
            raise ConfigError(f"{what or f'num_samples={num_samples}'}: too few for metrics=[{name}], which needs at "
                              f"least {fewest} ({why})")


def check_scoring(options: Mapping, data_config: Mapping, num_samples: int) -> None:
    """Before any sampling: the sample count, the selected sample metrics with their extractor (its weights loaded
    once and dropped), so that a configuration error (too few samples, absent weights, IS / sFID without Inception)
    ends the command in one line before a long sampling run rather than after it."""
    if not needs_samples(options):
        return
    check_sample_count(options, num_samples)
    sample_scores({**options, "classifier_path": classifier_path_for(options, data_config)})


def write_scores(
    options: Mapping,
    output_dir: Path,
    model: nn.Module,
    samples: np.ndarray | None,
    data_config: Mapping,
    sampler: Any,
    seed: int,
    device: torch.device,
    ckpt_path: str,
) -> Path:
    """`<output_dir>/metrics.json`: the selected metrics of a checkpoint, each group with its protocol. `samples`
    are uint8 (N, H, W, C) as in samples.npz."""
    if "nll" in options:
        check_bound(model)  # before any sampling or scoring
    images, labels = data_split(data_config, options["real_split"])
    options = {**options, "classifier_path": classifier_path_for(options, data_config)}
    result: dict[str, Any] = {}
    if needs_samples(options):
        scored = score_samples(torch.from_numpy(samples).permute(0, 3, 1, 2), images, options, device, seed)
        drawn = {"network_evaluations": sampler.evaluations_used} if sampler.evaluations_used else {}  # 0: found done
        scored["protocol"].update(sampler=str(sampler), steps=sampler.steps, **drawn, seed=seed,
                                  checkpoint=str(Path(ckpt_path).resolve()))
        result.update(scored)
    if "nll" in options:
        count = options["nll"]["num_images"]
        conditional = data_config.get("conditional", False)
        bound = nll_bits_per_dim(model, images[:count], options, device, seed, labels[:count] if conditional else None)
        result.update(nll_bpd=bound["nll_bpd"], nll_bpd_stderr=bound["nll_bpd_stderr"],
                      nll_protocol={**bound["protocol"], "checkpoint": str(Path(ckpt_path).resolve())})
    path = Path(output_dir) / "metrics.json"
    write_merged(path, result, "choose another output_dir")
    return path


PROTOCOLS = ("protocol", "nll_protocol")  # the settings of the sample scores and of the likelihood bound
# settings of one metric, or of how the samples were drawn and named, that a protocol may lack; the others (what the
# samples are compared with, by which extractor, how many) every scoring records
ONE_SIDED = {"is_splits", "kid_subsets", "kid_subset_size", "prec_recall_k", "network_evaluations", "samples",
             "sampler", "steps", "seed", "checkpoint"}


def write_merged(path: Path, result: dict, elsewhere: str) -> dict:
    """Writes `result` into the metrics.json at `path` beside the scores already there, none of which is replaced:
    a score there stays, new ones join it. ConfigError (one line, nothing written) when the protocols differ in a
    setting (one that either lacks counts unless it is in ONE_SIDED); `elsewhere`: where scores of other settings
    can go. Returns what was written."""
    merged = result
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError as error:
            raise ConfigError(f"{path} is not a metrics.json ({error}); {elsewhere}, or move it away") from error
        for key in PROTOCOLS:
            there, here = saved.get(key, {}), result.get(key, {})
            differing = sorted(name for name in there.keys() | here.keys() if there.get(name) != here.get(name)
                               and (name in there and name in here or name not in ONE_SIDED))
            if differing:
                raise ConfigError(f"{path} holds scores of other settings ("
                                  + "; ".join(f"{name}: {there.get(name)} there, {here.get(name)} here" for name in differing)
                                  + f"); {elsewhere}, or delete it to score these")
        merged = {**result, **saved, **{key: {**result.get(key, {}), **saved[key]} for key in PROTOCOLS if key in saved}}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
    return merged
