"""Reference statistics: the mean and covariance of an extractor's features over real images, in an npz with the
keys of the widely used reference evaluators (`mu` (D,), `sigma` (D, D), float64: EDM's fid.py, ADM's evaluator),
plus the extractor's name and weights hash so a file is never compared with another extractor's features."""

import zipfile
from pathlib import Path

import numpy as np
from scipy import linalg
from torch import Tensor

from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_path


def feature_stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """mu = mean_i f_i and sigma = the unbiased covariance of the features (N, D), in float64."""
    values = features.double().numpy()
    return values.mean(0), np.cov(values, rowvar=False)


def read_npz(path: str | Path, key: str, what: str) -> np.ndarray:
    """Array `key` of the npz file at `path`; ConfigError (one line) when it is not an npz or has no such array."""
    try:
        with np.load(path) as arrays:
            found = {name: arrays[name] for name in arrays.files if name == key}
            names = arrays.files
    except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as error:
        raise ConfigError(f"{path} is not an npz file ({type(error).__name__}); give a {what}") from error
    if key not in found:
        raise ConfigError(f"{path} has no array {key} (it has {', '.join(names) or 'none'}); give a {what}")
    return found[key]


def write_stats(path: str | Path, features: Tensor, extractor: str, extractor_hash: str) -> None:
    mu, sigma = feature_stats(features)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            np.savez(file, mu=mu, sigma=sigma, extractor=extractor, extractor_hash=extractor_hash)


def read_stats(path: str | Path, extractor: str, extractor_hash: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference file made by this extractor; a file with no extractor record (a reference
    evaluator's own) is taken as Inception features. ConfigError (one line) for any other file."""
    if not Path(path).is_file():
        raise ConfigError(f"ref={path} does not exist; write one with write_ref=<file> (or use an evaluator's npz)")
    what = "reference statistics file (keys mu, sigma; write one with write_ref=<file>)"
    mu, sigma = read_npz(path, "mu", what), read_npz(path, "sigma", what)
    with np.load(path) as stats:
        made_by = (str(stats["extractor"]), str(stats["extractor_hash"])) if "extractor" in stats else ("inception", None)
    if made_by[0] != extractor or made_by[1] not in (None, extractor_hash):
        raise ConfigError(f"ref={path} holds statistics of extractor {made_by[0]} (weights {made_by[1] or 'unrecorded'}), "
                          f"not of {extractor} (weights {extractor_hash}); write the reference with this extractor")
    return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) (Heusel et al. 2017, eq. 6), the square root by
    scipy's sqrtm as in pytorch-fid and ADM's evaluator (with their offset when the product is singular)."""
    if mu1.shape != mu2.shape:
        raise ConfigError(f"reference statistics of {mu2.shape[0]}-d features, samples give {mu1.shape[0]}-d features")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))
