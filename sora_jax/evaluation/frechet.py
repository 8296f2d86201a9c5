"""The Fréchet distance between Gaussians fitted to two sets of features (the formula behind FID and FVD).

  d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

The trace of the matrix square root is computed without a general (non-symmetric) square root:
S_1 S_2 is similar to the symmetric positive semi-definite A = S_1^(1/2) S_2 S_1^(1/2), so
tr((S_1 S_2)^(1/2)) = sum_i sqrt(lambda_i(A)). Two symmetric eigendecompositions give it in float64 with
no complex round-off to discard, and rank-deficient covariances (fewer samples than feature
dimensions, common in small evaluations) need no regularising offset: tiny negative eigenvalues from
round-off are clipped to zero. The tests compare it with scipy.linalg.sqrtm.
"""
from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N - 1) covariance of features [N, D] in float64.

    Raises:
      ValueError: for fewer than 2 samples or non-finite features.
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Fréchet statistics need features of shape [N >= 2, D]; got {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or inf; the feature extractor's input is broken.")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance (squared, as FID reports it) between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} and {mu2.shape}, covariances "
                         f"{sigma1.shape} and {sigma2.shape}.")
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    d = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(d, 0.0)  # round-off can leave -1e-12 for identical distributions


def frechet_distance_of(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))
