"""Plain numpy brute force: the test oracle for every fast backend.

Distances are float64 sums of squared coordinate differences, computed one query block at a
time (memory O(block * n_ref * d)), so it is slow but obviously right. The order of neighbours is
decided by the correctly rounded distance (:func:`sqdist_cr`), the value every fast backend's
re-ranking stores: two rows at the same distance tie bit for bit whatever the order in which
their coordinates' squares were summed, and the lower index comes first.
"""
from __future__ import annotations

import numpy as np

_BLOCK_BYTES = 64 * 2**20
_SQ_REL = 2.3e-16   # per coordinate, as in _numba: error of a float64 sum of squares in any order
_SQ_ABS = 1e-322


def sqdist_cr(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Squared distances (p,) of the row pairs A[i], B[i] (p, d): the squares of the float64
    differences, each split exactly (Dekker) and summed in double-double, then rounded once, so the
    result does not depend on the order of the coordinates (the same arithmetic as the Numba
    re-ranking's ``_sqdist_cr``)."""
    hi = np.zeros(A.shape[0])
    lo = np.zeros(A.shape[0])
    for t in range(A.shape[1]):
        x = A[:, t].astype(np.float64) - B[:, t].astype(np.float64)
        p = x * x
        c = 134217729.0 * x
        xh = c - (c - x)
        xl = x - xh
        e = ((xh * xh - p) + 2.0 * xh * xl) + xl * xl
        s = hi + p
        bb = s - hi
        err = (hi - (s - bb)) + (p - bb)
        hi = s
        lo += err + e
    out = hi + lo
    fast = np.einsum("ij,ij->i", A.astype(np.float64) - B, A.astype(np.float64) - B)
    return np.where(np.isfinite(fast), out, fast)


def knn_numpy(ref: np.ndarray, query: np.ndarray | None, k: int) -> np.ndarray:
    """Indices (n_query, k) of the k nearest rows of ``ref`` for each query row.

    ``query=None`` searches ``ref`` against itself and excludes each sample by index (not by
    distance: duplicate rows stay eligible). Order is by (distance, index): ties go to the
    lowest index, as a stable sort gives.
    """
    self_search = query is None
    q = ref if self_search else query
    n_ref, d = ref.shape
    block = max(1, _BLOCK_BYTES // max(1, n_ref * d * 8))
    out = np.empty((q.shape[0], k), dtype=np.int64)
    for start in range(0, q.shape[0], block):
        stop = min(start + block, q.shape[0])
        diff = q[start:stop, None, :] - ref[None, :, :]
        dist = np.einsum("ijk,ijk->ij", diff, diff)
        if self_search:
            rows = np.arange(stop - start)
            dist[rows, start + rows] = np.inf
        # rows that may be among the k nearest given einsum's rounding get their correctly rounded distance
        kth = np.partition(dist, k - 1, axis=1)[:, k - 1]
        near = (dist <= kth[:, None] * (1.0 + _SQ_REL * (d + 2)) + _SQ_ABS * d) & np.isfinite(dist) & (dist > 0)
        qi, ri = np.nonzero(near)
        if qi.size:
            dist[qi, ri] = sqdist_cr(q[start + qi], ref[ri])
        out[start:stop] = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return out


def nearest_center_numpy(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index (n,) of the nearest centre of each row; ties go to the lowest centre index."""
    out = np.empty(X.shape[0], dtype=np.int64)
    block = max(1, _BLOCK_BYTES // max(1, centers.shape[0] * X.shape[1] * 8))
    for start in range(0, X.shape[0], block):
        diff = X[start:start + block, None, :] - centers[None, :, :]
        out[start:start + block] = np.argmin(np.einsum("ijk,ijk->ij", diff, diff), axis=1)
    return out
