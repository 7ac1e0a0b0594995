"""Exact nearest neighbours of data that does not fit one process: Dask arrays and feature shards.

``knn_dask(X, k)`` splits the rows of a ``dask.array`` (n, d) into blocks and runs one task per
(query block, reference block) pair with our own exact search (``_knn.knn``: screen, certified
float64 re-ranking). Each task returns its k best (float64 distance, global index) per query row;
the per-block lists are merged exactly: sorted by (distance, index), so ties go to the lowest
global index, as in one process. In a self search the diagonal task excludes each sample by
index; off-diagonal tasks search the other block whole. With a ``dask.distributed`` client
active the tasks run on its workers.

Memory per task: two row blocks (``block_rows x d``), the search's own O(block_rows * k') and the
k-lists; nothing n x n anywhere. Work: (n / block_rows)^2 tasks of block_rows^2 * d each.

dask is an optional dependency (``pip install si-compress[cluster]``), imported only here.
"""
from __future__ import annotations

import glob
import os

import numpy as np

__all__ = ["knn_dask", "is_dask_array", "open_feature_shards", "save_feature_shards"]


def is_dask_array(X) -> bool:
    """True for a ``dask.array.Array`` (checked without importing dask)."""
    return type(X).__module__.startswith("dask.") and hasattr(X, "chunks") and hasattr(X, "to_delayed")


def _require_dask():
    try:
        import dask
        import dask.array as da
    except ImportError:
        raise ImportError("dask is not installed; pip install 'si-compress[cluster]' "
                          "(or pip install 'dask[array]' distributed)") from None
    return dask, da


def _exact_sqdist(A: np.ndarray, B: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """float64 squared distances (nq, k) from each row of A to the rows B[idx[:, t]], summed as the
    in-memory re-ranking sums them (so a merge across blocks orders exactly as one search would)."""
    from . import _numba as nb

    out = np.empty(idx.shape, np.float64)
    nb.pair_sqdist(A, B, np.ascontiguousarray(idx), out)
    return out


def _pair_topk(A, B, k: int, same: bool, offset: int, backend: str):
    """(distances, global indices) of the k nearest rows of block B for each row of block A; B's
    rows are numbered from ``offset``. ``same``: A is B (a diagonal block of a self search)."""
    from ._knn import knn

    A = np.ascontiguousarray(A)
    B = np.ascontiguousarray(B)
    kk = min(k, B.shape[0] - 1 if same else B.shape[0])
    if kk <= 0:
        return np.empty((A.shape[0], 0)), np.empty((A.shape[0], 0), np.int64)
    idx = knn(B, kk, backend=backend) if same else knn(B, kk, query=A, backend=backend)
    return _exact_sqdist(A, B, idx), idx + offset


def _merge(parts, k: int) -> np.ndarray:
    """Indices (nq, k): the k best of the concatenated per-block lists by (distance, index)."""
    dist = np.concatenate([p[0] for p in parts], axis=1)
    idx = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((idx, dist), axis=1)[:, :k]
    return np.take_along_axis(idx, order, axis=1)


def knn_dask(X, k: int, *, query=None, block_rows: int | None = None, backend: str = "auto",
             progress=None) -> np.ndarray:
    """Exact k nearest neighbours (indices (n_query, k) into X's rows, nearest first) of a dask
    array ``X`` (n, d), self search (each sample excluded by index) when ``query`` is None.

    ``block_rows``: rows per task block (default: X's own row chunks, at most 50,000). ``backend``:
    the search each task runs ("auto", "numba", "faiss", "torch", "numpy"). Computes on the active
    dask scheduler (a ``distributed.Client`` when one exists). Same results as ``_knn.knn`` on the
    in-memory array.
    """
    dask, da = _require_dask()
    if not is_dask_array(X):
        X = da.from_array(np.asarray(X))
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features); got shape {X.shape}")
    n = int(X.shape[0])
    self_search = query is None
    if self_search and not (1 <= k <= n - 1):
        raise ValueError(f"k must be in [1, {n - 1}] for a self search of {n} samples; got {k}")
    if not self_search and not (1 <= k <= n):
        raise ValueError(f"k must be in [1, {n}]; got {k}")
    rows = int(block_rows) if block_rows else int(min(max(X.chunks[0]), 50_000))
    if rows < 1:
        raise ValueError(f"block_rows must be >= 1; got {block_rows}")
    X = X.rechunk((rows, X.shape[1]))
    ref_blocks = list(X.to_delayed().ravel())
    ref_off = np.concatenate([[0], np.cumsum(X.chunks[0])])[:-1]
    if self_search:
        Q, q_blocks = X, ref_blocks
    else:
        Q = query if is_dask_array(query) else da.from_array(np.asarray(query))
        if Q.ndim != 2 or Q.shape[1] != X.shape[1]:
            raise ValueError(f"query must be (n_query, {X.shape[1]}); got shape {Q.shape}")
        Q = Q.rechunk((rows, Q.shape[1]))
        q_blocks = list(Q.to_delayed().ravel())
    pair = dask.delayed(_pair_topk, pure=True)
    merge = dask.delayed(_merge, pure=True)
    merged = []
    for i, qb in enumerate(q_blocks):
        parts = [pair(qb, rb, k, self_search and i == j, int(ref_off[j]), backend)
                 for j, rb in enumerate(ref_blocks)]
        merged.append(merge(parts, k))
    out = dask.compute(*merged)
    return np.concatenate(out, axis=0)


def save_feature_shards(X, folder: str, *, rows_per_shard: int = 50_000) -> list[str]:
    """Write X (n, d) as ``shard_00000.npy``, ... in ``folder`` (created; existing shards refused).
    Returns the paths. Each file is written to a temporary name and renamed."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D; got shape {X.shape}")
    os.makedirs(folder, exist_ok=True)
    if glob.glob(os.path.join(folder, "shard_*.npy")):
        raise FileExistsError(f"{folder} already holds feature shards; use an empty folder")
    paths = []
    for s, i0 in enumerate(range(0, X.shape[0], rows_per_shard)):
        path = os.path.join(folder, f"shard_{s:05d}.npy")
        tmp = path + ".tmp.npy"
        np.save(tmp, X[i0:i0 + rows_per_shard])
        os.replace(tmp, path)
        paths.append(path)
    return paths


def open_feature_shards(folder: str):
    """A dask array (n, d) over the ``shard_*.npy`` files of ``folder`` (memory-mapped, in name
    order); every shard must have the same column count and dtype."""
    dask, da = _require_dask()
    paths = sorted(glob.glob(os.path.join(folder, "shard_*.npy")))
    if not paths:
        raise FileNotFoundError(f"no shard_*.npy files in {folder}; write them with save_feature_shards")
    arrays = [np.load(p, mmap_mode="r") for p in paths]   # headers only: shapes and dtypes
    shapes = {(a.shape[1:], a.dtype) for a in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 2:
        raise ValueError(f"shards in {folder} differ in columns or dtype ({sorted(map(str, shapes))}); "
                         "they must be row blocks of one (n, d) array")
    # each shard is read by the worker that needs it (the graph holds paths, not data)
    load = dask.delayed(_read_shard, pure=True)
    return da.concatenate([da.from_delayed(load(os.path.abspath(p)), shape=a.shape, dtype=a.dtype)
                           for p, a in zip(paths, arrays)], axis=0)


def _read_shard(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")
