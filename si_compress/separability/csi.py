"""Centre-based Separation Index (CSI).

With class means mu_c = mean{x_i : y_i = c} (each sample counts in its own class mean), the
per-sample CSI is 1[ argmin_c ||x_i - mu_c||_2 == y_i ] (ties to the lowest class in sorted
label order) and CSI is its mean. Cost: two passes over X (class sums and norms; then the n x C
float64 dot products, in Numba); rows whose two nearest centres are within the rounding bound
are re-checked with direct float64 differences, so the result equals the brute force exactly.
Memory O(16 * C * d) beyond the input: X is never copied.
"""
from __future__ import annotations

import numpy as np

from .._validation import check_features, check_labels
from ._knn import _U64, _gamma, resolve_backend
from ._numpy import nearest_center_numpy
from .si import ClassScores, class_means



def class_centers(X: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Class means (C, d) float64; sums accumulate in float64 in sample order within a class."""
    return _sums_norms(X, codes, n_classes)[0]


def _sums_norms(X, codes, n_classes):
    from . import _numba as nb

    sums = np.zeros((n_classes, X.shape[1]), np.float64)
    norms = np.empty(X.shape[0], np.float64)
    nb.class_sums_and_norms(X, codes, n_classes, sums, norms)
    counts = np.bincount(codes, minlength=n_classes)
    return sums / counts[:, None], norms


def _nearest_center_fast(X: np.ndarray, centers: np.ndarray, xn: np.ndarray) -> np.ndarray:
    """Float64 dot-product screen of all n x C distances (one pass over X, no copy), exact
    float64 recheck of rows whose two nearest centres are within the rounding bound."""
    from . import _numba as nb

    cn = np.einsum("ij,ij->i", centers, centers)
    C = centers.shape[0]
    Cp = -(-C // 8) * 8  # pad centres to whole SIMD vectors; the padding is never a candidate
    MT = np.zeros((X.shape[1], Cp))
    MT[:, :C] = centers.T
    out = np.empty(X.shape[0], np.int64)
    nb.nearest_center(X, MT, xn, cn, _gamma(X.shape[1], _U64), out)
    return out


def _prepare(X, y, backend):
    Xv = check_features(X)
    codes, classes = check_labels(y, Xv.shape[0])
    backend = resolve_backend(backend)
    if backend == "numpy":
        Xd = Xv.astype(np.float64, copy=False)
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=classes.size)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        centers = np.add.reduceat(Xd[order], starts, axis=0) / counts[:, None]
        nearest = nearest_center_numpy(Xd, centers)
    else:
        centers, xn = _sums_norms(Xv, codes, classes.size)
        nearest = _nearest_center_fast(Xv, centers, xn)
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
