"""Score any samples.npz: `python -m diffusion_lab.metrics SAMPLES.npz data=NAME [metrics=[fid,kid,prec_recall,is,sfid]]
[metrics.extractor=inception|dinov2|classifier] [ref=STATS.npz | write_ref=STATS.npz] [output=metrics.json]`.

Without `ref` the samples are compared with the data set's real split (metrics.real_split), and `write_ref` saves
the real split's (mu, sigma); with `ref` the FID is taken against that file's statistics (reference_stats).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.metrics.evaluate import check_sample_count, data_split, extractor_from, score_samples, write_merged
from diffusion_lab.metrics.extractors import classifier_path_for, data_option, weights_hash
from diffusion_lab.metrics.real_features import extract_features, real_features
from diffusion_lab.metrics.reference_stats import feature_stats, frechet_distance, read_npz, read_stats, write_stats
from diffusion_lab.metrics.scores import SAMPLE_METRICS
from diffusion_lab.config import compose_config
from diffusion_lab.utils.cli import one_line_errors
from diffusion_lab.utils.errors import ConfigError

OPTIONS = ("ref", "write_ref", "output")


def load_samples(path: str | Path, data: DictConfig, options: dict) -> torch.Tensor:
    """uint8 (N, C, H, W) of a samples.npz (arr_0: uint8 (N, H, W, C)); ConfigError unless it fits the data set and
    holds enough samples for the selected metrics."""
    if not Path(path).is_file():
        raise ConfigError(f"{path} does not exist; give a samples.npz (sample.py writes one)")
    samples = read_npz(path, "arr_0", "samples.npz (sample.py writes one)")
    expected = (data.image_size, data.image_size, data.channels)
    if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[1:] != expected:
        raise ConfigError(f"{path}: arr_0 is {samples.dtype} {samples.shape}; data={data_option(data)} "
                          f"needs uint8 (N, {', '.join(map(str, expected))}), pixel values 0..255")
    check_sample_count(options, len(samples), f"{path} holds {len(samples)} sample(s)")
    return torch.from_numpy(samples).permute(0, 3, 1, 2)


def score(samples_path: str, cfg: DictConfig) -> dict:
    """The scores of samples.npz and their protocol (see module docstring)."""
    data, options = cfg.data, OmegaConf.to_container(cfg.metrics, resolve=True)
    if cfg.get("ref") and cfg.get("write_ref"):
        raise ConfigError("ref= compares with statistics already written, write_ref= writes the real split's: give one")
    samples = load_samples(samples_path, data, options)
    options["classifier_path"] = classifier_path_for(options, data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.get("ref"):
        others = [name for name in SAMPLE_METRICS if name in options and name != "fid"]
        if others:
            raise ConfigError(f"ref= gives the FID alone (statistics hold no features); drop {' / '.join(others)}")
        extractor = extractor_from(options)
        mu, sigma = read_stats(cfg.ref, extractor.name, weights_hash(extractor))
        fake = feature_stats(extract_features(extractor, samples, options["batch_size"], device))
        return {"fid": frechet_distance(*fake, mu, sigma), "protocol": {
            "num_samples": len(samples), "reference": str(cfg.ref), "extractor": extractor.name,
            "extractor_hash": weights_hash(extractor), "samples": str(Path(samples_path).resolve())}}
    images, _ = data_split(data, options["real_split"])
    result = score_samples(samples, images, options, device, cfg.seed)
    result["protocol"]["samples"] = str(Path(samples_path).resolve())
    if cfg.get("write_ref"):
        extractor = extractor_from(options)
        real = real_features(extractor, images, Path(options["cache_dir"]).expanduser(), options["batch_size"], device)
        write_stats(cfg.write_ref, real.features, extractor.name, real.extractor_hash)
    return result


@one_line_errors
def main(argv: list[str]) -> None:
    if not argv or "=" in argv[0]:
        raise ConfigError("usage: python -m diffusion_lab.metrics SAMPLES.npz data=NAME [metrics=[fid,kid]] [ref=FILE]")
    overrides = [f"+{a}" if a.startswith(("data=", *(f"{o}=" for o in OPTIONS))) else a for a in argv[1:]]
    if not any(a.startswith("metrics=") for a in overrides):
        overrides.append("metrics=[fid]")
    try:
        cfg = compose_config("sample", ["+paths=default", *overrides])
    except HydraException as error:  # an unknown option or a bad override: Hydra's message, on one line
        raise ConfigError(" ".join(str(error).split("Config search path")[0].split())) from error
    if "data" not in cfg:
        raise ConfigError("data=NAME is needed: the data set the samples are compared with (e.g. data=fashion_mnist)")
    result = score(argv[0], cfg)
    if cfg.get("output"):
        result = write_merged(Path(cfg.output), result, "choose another output=")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
