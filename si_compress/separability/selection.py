"""Greedy forward selection of feature groups (filters) by Separation Index.

G (n, n_groups, group_dim): group g of sample i is G[i, g] (e.g. one filter's pooled map).
Squared Euclidean distances add over groups, D_S = sum_{g in S} D_g, so each step only adds
one group's distances to a running matrix instead of recomputing over the concatenation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validation import check_labels, check_positive_int, raise_if_too_large


@dataclass(frozen=True)
class SelectionResult:
    """Groups in the order chosen and the first-order SI of the concatenation after each step."""

    order: np.ndarray  # (k,) int64 group indices
    si: np.ndarray     # (k,) float64, si[t] = SI of groups order[:t+1]


def check_groups(G, *, name: str = "G") -> np.ndarray:
    arr = np.asarray(G)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a numeric array (got dtype {arr.dtype})")
    if arr.ndim != 3:
        raise ValueError(
            f"{name} must be 3-D (n_samples, n_groups, group_dim); got shape {arr.shape} "
            "(a 2-D array of single-value groups is G[:, :, None])"
        )
    n, ng, gd = arr.shape
    if n < 2:
        raise ValueError(f"{name} has {n} sample(s); at least 2 are needed")
    if ng == 0 or gd == 0:
        raise ValueError(f"{name} has empty groups (shape {arr.shape}); need at least one group of at least one value")
    arr = np.ascontiguousarray(arr, dtype=np.float32 if arr.dtype == np.float32 else np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values; remove or impute them first")
    raise_if_too_large(arr.reshape(n, -1), name)
    return arr


def group_distance_matrices(Gv: np.ndarray) -> np.ndarray:
    """D[g, i, j] = ||G[i, g] - G[j, g]||^2 (n_groups, n, n) float64 via one GEMM per group.

    Entries within the GEMM's rounding bound of 0 are recomputed from differences, so duplicate
    rows are exactly 0 apart (their ties must go to the lowest index, not to rounding noise).
    """
    return _group_distances_and_nn(Gv)[0]


def _group_distances_and_nn(Gv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``group_distance_matrices`` plus nn (n_groups, n): each sample's nearest other sample in
    each group alone (ties to the lowest index), found in the same pass as the conversion.

    All Gram matrices first (BLAS), then one Numba pass converts them in place: alternating
    BLAS and Numba calls per group leaves each library's idle threads spinning against the
    other's on a small machine (measured 2x slower).
    """
    from . import _numba as nb
    from ._knn import _U64, _gamma

    n, ng, gd = Gv.shape
    D = np.empty((ng, n, n), np.float64)
    sq = np.empty((ng, n), np.float64)
    for g in range(ng):
        F = np.ascontiguousarray(Gv[:, g, :], dtype=np.float64)
        sq[g] = np.einsum("ij,ij->i", F, F)
        # a plain GEMM with a transposed copy: numpy's F @ F.T takes syrk and then mirrors the
        # triangle, which at this shape costs more than the half of the flops it saves
        np.matmul(F, np.ascontiguousarray(F.T), out=D[g])
    nn = np.empty((ng, n), np.int64)
    nb.gram_to_sqdist(Gv, sq, D, D.view(np.int64), 2.0 * _gamma(gd, _U64), nn)
    return D, nn


def forward_select(G, y, *, max_groups: int | None = None, max_memory_bytes: int = 4 * 2**30) -> SelectionResult:
    """Greedy forward selection: each step adds the group maximising the SI of the chosen set.

    Ties go to the lowest group index; distance ties to the lowest sample index (as in
    ``separation_index``). Squared distances are float64 and add over groups, so the result is
    that of recomputing the SI of every candidate concatenation from scratch (tested against
    that recompute, and identical in the benchmark at n=2000, 64 x 64); per-group distances
    come from a float64 GEMM with the entries near 0 recomputed from differences, so only
    near-ties at float64 rounding level could be ordered differently than by a sum of
    differences.
    Memory: all per-group distance matrices are kept, 8 * n^2 * (n_groups + 1) bytes (with
    the running sum) plus 17 * n * n_groups bytes (squared norms, first-step neighbours and
    per-step hits); a problem above ``max_memory_bytes`` is refused with the
    number it would need (select from fewer samples or groups).
    """
    from . import _numba as nb

    Gv = check_groups(G)
    n, ng, gd = Gv.shape
    codes, _ = check_labels(y, n)
    k = ng if max_groups is None else min(check_positive_int(max_groups, "max_groups"), ng)
    need = 8 * n * n * (ng + 1) + 17 * n * ng
    if need > max_memory_bytes:
        raise ValueError(
            f"forward_select needs {need / 2**30:.2f} GiB for {n} samples x {ng} groups "
            f"(limit {max_memory_bytes / 2**30:.2f} GiB); use fewer samples or groups, or raise max_memory_bytes"
        )
    D_all, nn0 = _group_distances_and_nn(Gv)
    D_run = np.zeros((n, n), np.float64)
    remaining = np.arange(ng, dtype=np.int64)
    order = np.empty(k, np.int64)
    si = np.empty(k, np.float64)
    for step in range(k):
        if step == 0:
            # each group alone: its nearest neighbours came with its distances
            hits = codes[nn0.T] == codes[:, None]
        else:
            # D_run += D_all[order[step - 1]] happens inside, row by row
            hits = np.empty((n, remaining.size), np.bool_)
            nb.selection_step(D_run, D_run.view(np.int64), D_all, order[step - 1], remaining, codes, hits)
        scores = hits.mean(axis=0)
        best = int(np.argmax(scores))  # first maximum = lowest group index (remaining is ascending)
        order[step] = remaining[best]
        si[step] = scores[best]
        remaining = np.delete(remaining, best)
    return SelectionResult(order=order, si=si)


def single_group_si(G, y, *, backend: str = "auto") -> np.ndarray:
    """First-order SI of each group alone: (n_groups,) float64 (exact nearest-neighbour search per group)."""
    from ._knn import knn

    Gv = check_groups(G)
    n, ng, _ = Gv.shape
    codes, _ = check_labels(y, n)
    out = np.empty(ng, np.float64)
    for g in range(ng):
        nbr = knn(np.ascontiguousarray(Gv[:, g, :]), 1, backend=backend)[:, 0]
        out[g] = np.mean(codes[nbr] == codes)
    return out


def prefix_si(G, y, order) -> np.ndarray:
    """SI of the concatenation of the first k groups of ``order``, for k = 1..len(order): (k,) float64.

    One running distance matrix (n x n float64) plus one group's distances at a time: memory
    O(n^2) whatever the number of groups.
    """
    from . import _numba as nb

    Gv = check_groups(G)
    n, ng, _ = Gv.shape
    codes, _ = check_labels(y, n)
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    if order.size == 0 or order.min() < 0 or order.max() >= ng or np.unique(order).size != order.size:
        raise ValueError(f"order must list distinct group indices in [0, {ng}); got {order.tolist()[:8]}...")
    D_run = np.zeros((n, n), np.float64)
    zero_d = np.zeros((1, n, n), np.float64)
    hits = np.empty((n, 1), np.bool_)
    out = np.empty(order.size, np.float64)
    for t, g in enumerate(order):
        D_run += group_distance_matrices(Gv[:, g:g + 1, :])[0]
        nb.selection_step(D_run, D_run.view(np.int64), zero_d, -1, np.zeros(1, np.int64), codes, hits)
        out[t] = hits.mean()
    return out
