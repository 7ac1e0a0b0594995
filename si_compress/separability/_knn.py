"""Exact k-nearest-neighbour search behind one ``backend`` keyword.

Semantics (shared by every backend, see ``knn``): Euclidean distance in float64; in a self
search each sample is excluded by index only; ties are broken by the lowest sample index.

The fast backends ("numba", "faiss") never build an n x n matrix:
- identical rows are grouped first (an integer hash of each row's bits, then full
  comparison; post-ReLU features are full of all-zero rows), so ties at distance 0 are
  resolved by index exactly and the search runs over unique rows only;
- a float32 screen keeps the k' = k + s closest unique rows per query (k + 1 + s in a self
  search, where the query itself is among them; s = 16 spare candidates, 4 for k = 1 at
  d <= 1024, see ``_slack``). "numba": BLAS Gram blocks + a Numba top-k merge, using the
  symmetry of a self search to do half the GEMM work from d = 256 (below, a second GEMM is
  cheaper than merging a block by columns), reading float32 input in place when duplicates
  are few; "faiss": ``faiss.knn``; "torch": blocked GEMM + ``torch.topk`` on a GPU (or the CPU),
  TF32 off (``_torch.py``);
- the candidates are re-ranked in float64, in screened order, stopping once the screen's
  rounding-error bound rules out every later one; the same bound certifies that no unscreened
  row could be as close; the few rows it cannot certify are searched again exactly (all rows
  of the data, each read once for all of them) or, when many, with a float64 screen. A list
  that lost a candidate to float32 overflow is never certified, and data whose squared norms
  reach 2^100 skip the float32 screen altogether.
Small searches (pairs x d <= 2^29) run their Numba kernels on one thread.
Memory: O(n * k' + block^2) beyond the input (block = 2048 rows).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ._numpy import knn_numpy

BACKENDS = ("auto", "numba", "faiss", "torch", "numpy")
_ENV = "SI_COMPRESS_BACKEND"
_SLACK = 16
_BLOCK = 2048
_U32 = 2.0 ** -24
_U64 = 2.0 ** -53
_TINY32 = 2.0 ** -149   # smallest subnormal: the absolute rounding error of an underflowing product
_TINY64 = 2.0 ** -1074
_DIRECT_WORK = 2 * 10**9   # multiply-adds below which uncertified rows are searched directly
_IN_PLACE_UNIQUE = 0.9     # screen float32 input in place when >= 90% of its rows are unique
_SYRK_MIN_DIM = 1024       # below this d a diagonal Gram block is a GEMM on a copy, not syrk
_SYMMETRIC_MIN_DIM = 256   # from this d a self search reuses each off-diagonal block transposed
_SCREEN_MAX_SQNORM = 2.0 ** 100   # squared norms from here skip the float32 screen (overflow)
_SERIAL_WORK = 2**29       # pairs x d up to which the Numba kernels run on one thread (n=2k: d<=128)


def available_backends() -> tuple[str, ...]:
    """Concrete backends importable here, fastest first on a CPU ("torch" screens on a GPU when
    one is present, else on the CPU; "auto" picks it only in a process already using CUDA)."""
    import importlib.util

    out = []
    for name, mod in (("numba", "numba"), ("faiss", "faiss"), ("torch", "torch")):
        try:
            if importlib.util.find_spec(mod) is not None:
                out.append(name)
        except (ImportError, ValueError):
            pass
    out.append("numpy")
    return tuple(out)


def _cuda_in_use() -> bool:
    """True when this process already imported torch and it sees a GPU (never imports torch)."""
    import sys

    torch = sys.modules.get("torch")
    try:
        return torch is not None and bool(torch.cuda.is_available())
    except Exception:
        return False


# Below this dimension the top-k merge, not the GEMM, dominates the numba screen and faiss's
# SIMD k-selection wins once there are many blocks; above it the symmetric numba screen does
# half the GEMM work (bench_separability: n=10k, d=64 faiss 153 ms vs numba 206 ms; d=1024
# numba 1.3x faster). Up to _NUMBA_PAIRS query x reference pairs (one or two 2048-row blocks)
# faiss's fixed costs dominate and numba is faster at every d (n=2k, d=64: 8.9 ms vs 15 ms).
_FAISS_BELOW_DIM = 512
_NUMBA_PAIRS = 4096 * 4096


def resolve_backend(backend: str, d: int | None = None, pairs: int | None = None) -> str:
    """Map "auto" (or the SI_COMPRESS_BACKEND environment variable) to a concrete backend;
    with the feature dimension ``d`` and the number of query x reference ``pairs``, "auto"
    picks the faster screen for them."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(_ENV, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {_ENV}={backend!r} is not one of {', '.join(BACKENDS)}")
        if backend == "auto":
            avail = available_backends()
            if "torch" in avail and _cuda_in_use():
                return "torch"
            avail = tuple(a for a in avail if a != "torch")
            small = pairs is not None and pairs <= _NUMBA_PAIRS
            if d is not None and d < _FAISS_BELOW_DIM and not small and "faiss" in avail:
                return "faiss"
            return avail[0]
    if backend not in available_backends():
        raise ValueError(
            f"backend {backend!r} is not installed here (available: {', '.join(available_backends())}); "
            f"pip install {'faiss-cpu' if backend == 'faiss' else backend}, or use backend='auto'"
        )
    return backend


def _slack(need: int, d: int) -> int:
    """Screened candidates kept beyond the ``need`` asked for.

    Rows whose screen cannot certify the answer are searched again exactly, at n * d work
    each; the screen's error window, and with it the number of rows it cannot certify, grows
    with d. Measured at order 1 (seeded CNN-like features, n = 2k-10k; ResNet-20 block outputs
    on 2,000 CIFAR-10 images): 4 spare candidates leave no row uncertified up to d = 1024, while
    at d = 4096 they leave up to 135 of 5,000 and 16 leave none; order 5 keeps 16 throughout.
    """
    return _SLACK if need > 1 or d > 1024 else 4


def _gamma(d: int, u: float) -> float:
    nu = (d + 16) * u
    return np.inf if nu >= 0.5 else 3.0 * nu / (1.0 - nu)


def _abs_tol(d: int, tiny: float) -> float:
    """Absolute part of a screened squared distance's error: each of the d products (and the
    two norms) may underflow, rounding by up to tiny / 2; doubled for -2 q.u, with slack."""
    return 4.0 * (d + 4) * tiny


@dataclass(frozen=True)
class _Groups:
    rep: np.ndarray       # (m,) lowest sample index of each unique row (= its tie-break key)
    inverse: np.ndarray   # (n,) unique row of each sample
    offsets: np.ndarray   # (m + 1,) CSR offsets into members
    members: np.ndarray   # (n,) sample indices grouped by unique row, ascending within a group


def _hash_keys(d: int) -> np.ndarray:
    """d fixed odd 64-bit multipliers for ``row_hashes`` (seeded: hashes are reproducible)."""
    return np.random.default_rng(0x51C0).integers(0, 2**63, size=d, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _group_rows(X: np.ndarray) -> _Groups:
    from . import _numba as nb

    n, d = X.shape
    bits = np.uint32 if X.dtype == np.float32 else np.uint64
    sign = np.uint64(1) << np.uint64(8 * X.dtype.itemsize - 1)
    h = nb.row_hashes(X.view(bits), _hash_keys(d), sign)
    order = np.lexsort((np.arange(n), h))
    gid, m = nb.group_equal_rows(X, order, h)
    # renumber groups by their lowest member so unique rows keep sample order
    members = np.argsort(gid, kind="stable")
    counts = np.bincount(gid, minlength=m)
    offsets = np.zeros(m + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    rep = members[offsets[:-1]]
    perm = np.argsort(rep, kind="stable")
    new_id = np.empty(m, np.int64)
    new_id[perm] = np.arange(m)
    inverse = new_id[gid]
    members = np.argsort(inverse, kind="stable")
    counts = counts[perm]
    np.cumsum(counts, out=offsets[1:])
    return _Groups(rep=rep[perm], inverse=inverse, offsets=offsets, members=members)


def _sqnorms(A: np.ndarray) -> np.ndarray:
    from . import _numba as nb

    out = np.empty(A.shape[0], np.float64)
    nb.row_sqnorms(A, out)
    return out


def _screen_numba(Q32, U32, qn32, un32, cmap, kp, symmetric):
    """Top-kp screened rows of U32 per query row; row j of U32 is reported as cmap[j] (-1: never)."""
    from . import _numba as nb

    nq, m = Q32.shape[0], U32.shape[0]
    topd = np.full((nq, kp), np.inf, np.float32)
    topi = np.full((nq, kp), -1, np.int64)
    for i0 in range(0, nq, _BLOCK):
        i1 = min(i0 + _BLOCK, nq)
        for j0 in range(i0 if symmetric else 0, m, _BLOCK):
            j1 = min(j0 + _BLOCK, m)
            Ub = U32[j0:j1]
            if Q32 is U32 and j0 == i0 and U32.shape[1] < _SYRK_MIN_DIM:
                # numpy sends A @ A.T to BLAS syrk, which is several times slower than a plain
                # GEMM on a copy at small d (measured, 2048-row block: d=64 19 ms vs 2.7 ms)
                Ub = Ub.copy()
            G = Q32[i0:i1] @ Ub.T
            nb.topk_update(G, qn32[i0:i1], un32[j0:j1], cmap[j0:j1], topd[i0:i1], topi[i0:i1])
            if symmetric and j0 != i0:
                # the transposed block serves rows j0:j1: half the GEMM work of a plain search
                nb.topk_update_cols(G, qn32[i0:i1], un32[j0:j1], cmap[i0:i1], topd[j0:j1], topi[j0:j1])
    return topi, topd


def _screen_faiss(Q32, U32, kp):
    import faiss

    D, I = faiss.knn(Q32, U32, kp)
    return I.astype(np.int64, copy=False), D


def _fallback64(Q, qrows, U, urows, qn, un, first, self_ids, need, rows):
    """Float64 screen + exact re-ranking for the rows the float32 certificate could not clear."""
    from . import _numba as nb

    d = Q.shape[1]
    if rows.size * urows.size * d <= _DIRECT_WORK:
        # a few rows: exact distances to every unique row, no screen needed
        out_i = np.empty((rows.size, need), np.int64)
        out_d = np.empty((rows.size, need), np.float64)
        nb.exact_knn_rows(Q, qrows[rows], U, urows, first, self_ids[rows], need, out_i, out_d)
        return out_i, out_d
    c64 = _gamma(d, _U64)
    out_i = np.empty((rows.size, need), np.int64)
    out_d = np.empty((rows.size, need), np.float64)
    m = urows.size
    step = max(1, (32 * 2**20) // (8 * max(1, m)))
    for s in range(0, rows.size, step):
        r = rows[s:s + step]
        Qb = Q[qrows[r]].astype(np.float64)
        D = np.empty((r.size, m), np.float64)
        for j0 in range(0, m, _BLOCK):
            Ub = U[urows[j0:j0 + _BLOCK]].astype(np.float64, copy=False)
            D[:, j0:j0 + _BLOCK] = qn[r, None] + un[None, j0:j0 + _BLOCK] - 2.0 * (Qb @ Ub.T)
        sid = self_ids[r]
        valid = sid >= 0
        D[np.nonzero(valid)[0], sid[valid]] = np.inf
        kth = np.partition(D, need - 1, axis=1)[:, need - 1]
        tol = c64 * (qn[r] + un.max()) + _abs_tol(d, _TINY64)
        mask = D <= (kth + 2.0 * tol)[:, None]
        counts = mask.sum(axis=1)
        offs = np.zeros(r.size + 1, np.int64)
        np.cumsum(counts, out=offs[1:])
        cols = np.nonzero(mask)[1].astype(np.int64)
        oi = np.empty((r.size, need), np.int64)
        od = np.empty((r.size, need), np.float64)
        nb.exact_rows(Qb, U, urows, offs, cols, first, sid, need, oi, od)
        out_i[s:s + step] = oi
        out_d[s:s + step] = od
    return out_i, out_d


@contextmanager
def _numba_threads_at_most(k: int):
    """Run the enclosed Numba parallel regions on at most k threads (restored afterwards).

    Numba's OpenMP layer and torch share one OpenMP thread count: setting Numba's sets torch's too,
    so when torch is loaded its count is put back as well (the core itself never imports torch)."""
    import sys

    import numba

    torch = sys.modules.get("torch")
    torch_prev = torch.get_num_threads() if torch is not None else None
    prev = numba.get_num_threads()
    numba.set_num_threads(max(1, min(k, prev)))
    try:
        yield
    finally:
        numba.set_num_threads(prev)
        if torch_prev is not None and torch.get_num_threads() != torch_prev:
            torch.set_num_threads(torch_prev)


def knn(ref: np.ndarray, k: int, *, query: np.ndarray | None = None, backend: str = "auto") -> np.ndarray:
    """Exact k nearest neighbours: indices (n_query, k) into ``ref``, nearest first.

    ref (n, d) and query (n_q, d) are validated float32/float64 arrays. ``query=None`` is a self
    search: each sample's own index is excluded (its duplicates are not), so 1 <= k <= n - 1.
    Distances are Euclidean, evaluated in float64; ties go to the lowest index.
    """
    from .cluster import is_dask_array

    if is_dask_array(ref) or (query is not None and is_dask_array(query)):
        from .cluster import knn_dask

        resolve_backend(backend)   # a bad name fails here, not inside a task
        return knn_dask(ref, k, query=query, backend=backend)
    pairs = ref.shape[0] * (ref.shape[0] if query is None else query.shape[0])
    backend = resolve_backend(backend, ref.shape[1], pairs)
    if backend == "numpy":
        return knn_numpy(ref.astype(np.float64, copy=False),
                         None if query is None else query.astype(np.float64, copy=False), k)
    if pairs * ref.shape[1] <= _SERIAL_WORK:
        # Small searches run their Numba kernels on one thread: each parallel launch wakes
        # threads that then fight BLAS's (or faiss's) still-spinning ones for the two cores
        # (measured, n=2000, d=64, calls back to back: 18-31 ms with 2 threads, 8.5 ms with 1).
        with _numba_threads_at_most(1):
            return _knn_fast(ref, k, query, backend)
    return _knn_fast(ref, k, query, backend)


def _knn_fast(ref: np.ndarray, k: int, query: np.ndarray | None, backend: str) -> np.ndarray:
    from . import _numba as nb

    self_search = query is None
    groups = _group_rows(ref)
    m = groups.rep.size
    urows = groups.rep  # unique row u is ref[urows[u]]: the data is never gathered in float64
    Q = ref if self_search else query
    qrows = urows if self_search else np.arange(query.shape[0], dtype=np.int64)
    nq_rows = qrows.size
    need = min(k, m - 1) if self_search else min(k, m)
    n_all = _sqnorms(ref)
    un = n_all[urows]
    qn = un if self_search else _sqnorms(Q)
    self_ids = np.arange(m, dtype=np.int64) if self_search else np.full(nq_rows, -1, np.int64)

    nbr = np.empty((nq_rows, need), np.int64)
    nbr_d = np.empty((nq_rows, need), np.float64)
    if need > 0:
        kp = min(m, need + (1 if self_search else 0) + _slack(need, ref.shape[1]))
        c32 = _gamma(ref.shape[1], _U32)
        # the float32 screen would overflow (products and sums up to 4x the largest squared
        # norm, float32 max 2^128) on rows this large: the float64 tier searches every row
        big = max(n_all.max(initial=0.0), qn.max(initial=0.0)) >= _SCREEN_MAX_SQNORM
        if np.isfinite(c32) and not big:
            # The float32 screen runs on the unique rows. The numba screen reads float32 input
            # in place when duplicates are few (they are skipped as candidates; a gathered copy
            # would cost more than the rows it saves); otherwise it takes a float32 copy.
            in_place = backend == "numba" and ref.dtype == np.float32 and m >= _IN_PLACE_UNIQUE * ref.shape[0]
            if in_place:
                U32, u32n = ref, n_all.astype(np.float32)
                cmap = np.full(ref.shape[0], -1, np.int64)
                cmap[urows] = np.arange(m)
            else:
                U32 = ref if (m == ref.shape[0] and ref.dtype == np.float32) else \
                    np.ascontiguousarray(ref[urows], dtype=np.float32)
                u32n, cmap = un.astype(np.float32), np.arange(m, dtype=np.int64)
            if backend == "faiss":
                Q32 = U32 if self_search else (Q if Q.dtype == np.float32 else Q.astype(np.float32))
                cand, cd = _screen_faiss(Q32, U32, kp)
            elif backend == "torch":
                from ._torch import screen_torch

                Q32 = U32 if self_search else (Q if Q.dtype == np.float32 else Q.astype(np.float32))
                cand, cd = screen_torch(Q32, U32, u32n if self_search else qn.astype(np.float32), u32n, kp)
            elif self_search:
                cand, cd = _screen_numba(U32, U32, u32n, u32n, cmap, kp, ref.shape[1] >= _SYMMETRIC_MIN_DIM)
                if in_place:
                    cand, cd = cand[urows], cd[urows]
            else:
                Q32 = Q if Q.dtype == np.float32 else Q.astype(np.float32)
                cand, cd = _screen_numba(Q32, U32, qn.astype(np.float32), u32n, cmap, kp, False)
            del U32
            ok = np.empty(nq_rows, np.bool_)
            nb.refine(Q, qrows, ref, urows, qn, cand, cd, groups.rep, self_ids, need, kp == m, c32,
                      _abs_tol(ref.shape[1], _TINY32), nbr, nbr_d, ok)
            bad = np.nonzero(~ok)[0]
        else:
            bad = np.arange(nq_rows)
        if bad.size:
            bi, bd = _fallback64(Q, qrows, ref, urows, qn, un, groups.rep, self_ids, need, bad)
            nbr[bad] = bi
            nbr_d[bad] = bd
    n_out = ref.shape[0] if self_search else nq_rows
    out = np.empty((n_out, k), np.int64)
    if self_search:
        nb.expand(nbr, nbr_d, groups.offsets, groups.members, groups.inverse,
                  np.arange(n_out, dtype=np.int64), k, out)
    else:
        nb.expand(nbr, nbr_d, groups.offsets, groups.members, np.arange(n_out, dtype=np.int64),
                  np.full(n_out, -1, np.int64), k, out)
    return out
