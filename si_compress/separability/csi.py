"""Centre-based Separation Index (CSI).

With class means mu_c = mean{x_i : y_i = c} (each sample counts in its own class mean), the
per-sample CSI is 1[ argmin_c ||x_i - mu_c||_2 == y_i ] (ties to the lowest class in sorted
label order) and CSI is its mean. Cost: two passes over X, each near memory speed (class sums
and the NaN check; then the n x C dot products in X's precision, in Numba); rows whose two
nearest centres are within the rounding bound are re-checked with direct float64 differences,
so the result equals the float64 brute force. Memory O(16 * C * d) beyond the input: X is never
copied.
"""
from __future__ import annotations

import numpy as np

from .._validation import check_features, check_labels, raise_if_not_finite, raise_if_too_large
from ._knn import _TINY32, _TINY64, _U32, _U64, _gamma, resolve_backend
from ._numpy import nearest_center_numpy
from .si import ClassScores, class_means



def class_centers(X: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Class means (C, d) float64; sums accumulate in float64 (fixed row chunks, each in sample order)."""
    from . import _numba_csi as nc

    sums = np.empty((n_classes, X.shape[1]), np.float64)
    counts = np.empty(n_classes, np.int64)
    nc.class_sums(X, codes, n_classes, sums, counts)
    return sums / counts[:, None]


def _nearest_center_fast(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Screen every n x C distance in X's precision (one pass over X, no copy), then decide the
    rows whose two nearest means are within the rounding bound from float64 differences.

    Bound: with u the unit roundoff of X's dtype, x . fl(mu) is off x . mu by <= u |x||mu|, and
    the dot product by <= gamma_d |x||mu| (any summation order), so e_c = |mu|^2 - 2 x . mu errs
    by <= 2 (gamma_d + 2u) |x||mu| plus the float64 error of |mu|^2; the screened |x|^2 is at
    least (1 - gamma_d) |x|^2. Values that underflow round by up to half the smallest
    subnormal t instead: each of the d products, each rounded mean (t/2 |x|_1 <= t/2 sqrt(d)|x|)
    and the squared norm add absolute terms, covered by a_tol (d + sqrt(d) |x|), a_tol = 2t. Each
    bound carries a 1% margin for the float64 arithmetic on it.
    """
    from . import _numba_csi as nc

    n, d = X.shape
    C = centers.shape[0]
    u, tiny = (_U32, _TINY32) if X.dtype == np.float32 else (_U64, _TINY64)
    g = _gamma(d, u)
    c_dot = 1.01 * 2.0 * (g + 2.0 * u)
    c_sq = 1.01 / (1.0 - g)
    c_norm = 1.01 * _gamma(d, _U64)
    cn = np.einsum("ij,ij->i", centers, centers)
    M = np.empty((-(-C // nc.CBLOCK) * nc.CBLOCK, d), X.dtype)
    M[:C] = centers
    M[C:] = M[0]  # padding rows: computed, never read
    out = np.empty(n, np.int64)
    nc.nearest_center(X, M, centers, cn, c_dot, c_sq, c_norm, 1.01 * 2.0 * (tiny + _TINY64), out)
    return out


def _prepare(X, y, backend):
    backend = resolve_backend(backend)
    # the fast path finds NaN/Inf in its first pass (a non-finite class sum) instead of
    # scanning X once more up front
    Xv = check_features(X, check_finite=backend == "numpy")
    codes, classes = check_labels(y, Xv.shape[0])
    if backend == "numpy":
        Xd = Xv.astype(np.float64, copy=False)
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=classes.size)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        centers = np.add.reduceat(Xd[order], starts, axis=0) / counts[:, None]
        nearest = nearest_center_numpy(Xd, centers)
    else:
        centers = class_centers(Xv, codes, classes.size)
        if not np.isfinite(centers).all():
            raise_if_not_finite(Xv)
        raise_if_too_large(Xv)   # a min/max pass, for float64 input only (float32 cannot overflow)
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
    codes, _, nearest = _prepare(X, y, backend)
    return np.count_nonzero(nearest == codes) / codes.size


def center_separation_index_per_class(X, y, *, backend: str = "auto") -> ClassScores:
    """CSI averaged over the samples of each class."""
    codes, classes, nearest = _prepare(X, y, backend)
    return class_means((nearest == codes).astype(np.float64), codes, classes)
