"""Centre-based Separation Index (CSI).

With class means mu_c = mean{x_i : y_i = c} (each sample counts in its own class mean), the
per-sample CSI is 1[ argmin_c ||x_i - mu_c||_2 == y_i ] (ties to the lowest class in sorted
label order) and CSI is its mean. Cost O(n * C * d) through one float64 GEMM per block; rows
whose two nearest centres are within the GEMM's rounding bound are re-checked with direct
float64 differences, so the result equals the brute force exactly. Memory O(block * C).
"""
from __future__ import annotations

import numpy as np

from .._validation import check_features, check_labels
from ._knn import _gamma, _U64, resolve_backend
from ._numpy import nearest_center_numpy
from .si import ClassScores, class_means

_BLOCK_BYTES = 32 * 2**20


def class_centers(X: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Class means (C, d) float64; sums accumulate in float64 in sample order within a class."""
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=n_classes)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    sums = np.add.reduceat(X[order].astype(np.float64, copy=False), starts, axis=0)
    return sums / counts[:, None]


def _nearest_center_fast(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    n, d = X.shape
    C = centers.shape[0]
    cn = np.einsum("ij,ij->i", centers, centers)
    tol_c = _gamma(d, _U64)
    out = np.empty(n, np.int64)
    step = max(1, _BLOCK_BYTES // (8 * max(C, d)))
    for s in range(0, n, step):
        Xb = X[s:s + step].astype(np.float64, copy=False)
        xn = np.einsum("ij,ij->i", Xb, Xb)
        D = xn[:, None] + cn[None, :] - 2.0 * (Xb @ centers.T)
        best = D.argmin(axis=1)
        dmin = D[np.arange(D.shape[0]), best]
        tol = tol_c * (xn[:, None] + cn[None, :])
        # a centre whose screened distance is within both rounding bounds of the minimum might tie or win
        close = (D - tol) <= (dmin + tol[np.arange(D.shape[0]), best])[:, None]
        ambiguous = np.nonzero(close.sum(axis=1) > 1)[0]
        if ambiguous.size:
            best[ambiguous] = nearest_center_numpy(Xb[ambiguous], centers)
        out[s:s + step] = best
    return out


def _prepare(X, y, backend):
    Xv = check_features(X)
    codes, classes = check_labels(y, Xv.shape[0])
    backend = resolve_backend(backend)
    centers = class_centers(Xv, codes, classes.size)
    if backend == "numpy":
        nearest = nearest_center_numpy(Xv.astype(np.float64, copy=False), centers)
    else:
        nearest = _nearest_center_fast(Xv, centers)
    return codes, classes, nearest


def nearest_center(X, y, *, backend: str = "auto") -> np.ndarray:
    """Code (n,) of the nearest class mean of each sample, in sorted-label order."""
    return _prepare(X, y, backend)[2]


def center_separation_index_per_sample(X, y, *, backend: str = "auto") -> np.ndarray:
    """Per-sample CSI (n,) float64 0/1: is the sample's nearest class mean its own class's?"""
    codes, _, nearest = _prepare(X, y, backend)
    return (nearest == codes).astype(np.float64)


def center_separation_index(X, y, *, backend: str = "auto") -> float:
    """CSI in [0, 1]: fraction of samples whose nearest class mean is their own class's mean."""
    return float(center_separation_index_per_sample(X, y, backend=backend).mean())


def center_separation_index_per_class(X, y, *, backend: str = "auto") -> ClassScores:
    """CSI averaged over the samples of each class."""
    codes, classes, nearest = _prepare(X, y, backend)
    return class_means((nearest == codes).astype(np.float64), codes, classes)
