"""Plain numpy brute force: the test oracle for every fast backend.

Distances are float64 sums of squared coordinate differences, computed one query block at a
time (memory O(block * n_ref * d)), so it is slow but obviously right.
"""
from __future__ import annotations

import numpy as np

_BLOCK_BYTES = 64 * 2**20


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
