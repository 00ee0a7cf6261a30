"""Reference statistics: the mean and covariance of an extractor's features over real images, in an npz with the
keys of the widely used reference evaluators (`mu` (D,), `sigma` (D, D), float64: EDM's fid.py, ADM's evaluator),
plus the extractor's name and weights hash so a file is never compared with another extractor's features."""

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
    stats = np.load(path)
    if "mu" not in stats or "sigma" not in stats:
        raise ConfigError(f"ref={path} holds no reference statistics (keys mu, sigma); it has {', '.join(stats.files)}")
    made_by = (str(stats["extractor"]), str(stats["extractor_hash"])) if "extractor" in stats else ("inception", None)
    if made_by[0] != extractor or made_by[1] not in (None, extractor_hash):
        raise ConfigError(f"ref={path} holds statistics of extractor {made_by[0]} (weights {made_by[1] or 'unrecorded'}), "
                          f"not of {extractor} (weights {extractor_hash}); write the reference with this extractor")
    return stats["mu"], stats["sigma"]


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
