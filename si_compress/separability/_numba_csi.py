"""Numba kernels of the centre-based SI: two passes over X, each close to memory speed.

1. ``class_sums``: float64 class sums and counts (one read of X).
2. ``nearest_center``: dot products of every row with every class mean in the input's own
   precision (float32 data: float32 products, float32 means), two rows against ten means at a
   time so each load feeds twenty multiply-adds; a row whose runner-up mean is within the
   rounding bound of the best is decided again from float64 differences, so the answer is
   the float64 one. The row norms the bound needs come out of the same loop.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numba import _FP, _sqdist

NCHUNKS = 16   # fixed row chunks of the class sums: the result does not depend on the thread count
CBLOCK = 10    # means per dot-product block (two rows against ten means: the fastest measured)


# The hot loops index the 2-D arrays directly instead of taking row views: a view bumps the
# parent array's reference count atomically, and two threads doing that per row fight over one
# cache line. Small helpers are inlined: a call per row costs as much as the row at d = 64.
@njit(parallel=True, cache=True)
def class_sums(X, codes, n_classes, sums, counts):
    """One pass over X (n, d): per-class float64 sums ``sums`` (C, d) and ``counts`` (C,).

    Rows are split into NCHUNKS fixed chunks (so the result does not depend on the number of
    threads); each chunk sums its rows in sample order and the chunk sums are added in chunk
    order. A NaN or Inf anywhere in X makes its class sum non-finite (the caller's NaN check).
    """
    n, d = X.shape
    nch = min(NCHUNKS, n)
    part = np.empty((nch, n_classes, d))
    pcount = np.zeros((nch, n_classes), np.int64)
    for ch in prange(nch):
        part[ch] = 0.0
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            c = codes[i]
            pcount[ch, c] += 1
            for t in range(d):
                part[ch, c, t] += np.float64(X[i, t])
    for c in range(n_classes):
        counts[c] = pcount[:, c].sum()
    if n_classes * d <= 4096:
        _add_chunks(part, sums, 0, d)   # too small to be worth a parallel launch
    else:
        tb = 256
        for blk in prange((d + tb - 1) // tb):
            _add_chunks(part, sums, blk * tb, min(blk * tb + tb, d))


@njit(cache=True, inline="always")
def _add_chunks(part, sums, t0, t1):
    for c in range(part.shape[1]):
        for t in range(t0, t1):
            s = 0.0
            for ch in range(part.shape[0]):
                s += part[ch, c, t]
            sums[c, t] = s


@njit(cache=True, fastmath=_FP, inline="always")
def _dots_2x10(X, i, j, M, c0, zero, acc, r):
    """acc[c0 + k, r] = X[i] . M[c0 + k] and acc[c0 + k, r + 1] = X[j] . M[c0 + k] for k < 10,
    accumulated in the dtype of ``zero``; also |X[i]|^2, |X[j]|^2 into acc[-1] (two more lanes
    of work, cheaper than a branch in the loop). Each load of a row feeds twenty multiply-adds."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = zero
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = b8 = b9 = zero
    qa = qb = zero
    for t in range(X.shape[1]):
        p = X[i, t]
        q = X[j, t]
        m = M[c0, t]
        a0 += p * m
        b0 += q * m
        m = M[c0 + 1, t]
        a1 += p * m
        b1 += q * m
        m = M[c0 + 2, t]
        a2 += p * m
        b2 += q * m
        m = M[c0 + 3, t]
        a3 += p * m
        b3 += q * m
        m = M[c0 + 4, t]
        a4 += p * m
        b4 += q * m
        m = M[c0 + 5, t]
        a5 += p * m
        b5 += q * m
        m = M[c0 + 6, t]
        a6 += p * m
        b6 += q * m
        m = M[c0 + 7, t]
        a7 += p * m
        b7 += q * m
        m = M[c0 + 8, t]
        a8 += p * m
        b8 += q * m
        m = M[c0 + 9, t]
        a9 += p * m
        b9 += q * m
        qa += p * p
        qb += q * q
    acc[c0, r] = a0
    acc[c0 + 1, r] = a1
    acc[c0 + 2, r] = a2
    acc[c0 + 3, r] = a3
    acc[c0 + 4, r] = a4
    acc[c0 + 5, r] = a5
    acc[c0 + 6, r] = a6
    acc[c0 + 7, r] = a7
    acc[c0 + 8, r] = a8
    acc[c0 + 9, r] = a9
    acc[c0, r + 1] = b0
    acc[c0 + 1, r + 1] = b1
    acc[c0 + 2, r + 1] = b2
    acc[c0 + 3, r + 1] = b3
    acc[c0 + 4, r + 1] = b4
    acc[c0 + 5, r + 1] = b5
    acc[c0 + 6, r + 1] = b6
    acc[c0 + 7, r + 1] = b7
    acc[c0 + 8, r + 1] = b8
    acc[c0 + 9, r + 1] = b9
    last = acc.shape[0] - 1
    acc[last, r] = qa
    acc[last, r + 1] = qb


_RB = 256   # rows per block


@njit(parallel=True, cache=True, fastmath=_FP)
def nearest_center(X, M, centers, cn, c_dot, c_sq, c_norm, a_tol, out):
    """Nearest class mean of each row of X (n, d), ties to the lowest mean, exact in float64.

    M (C', d) the means rounded to X's dtype, padded with copies to a multiple of CBLOCK rows;
    centers (C, d) float64 means; cn (C,) their float64 squared norms. The screened value
    e_c = |mu_c|^2 - 2 x.mu_c (|x|^2 is common to all c) errs by at most
    B = c_dot * |x| max|mu| + c_norm * max|mu|^2 + a_tol * (d + sqrt(d) |x|), with
    |x|^2 <= c_sq * (its screened value + d * a_tol) (a_tol: the absolute rounding of values
    that underflow); a row whose best e_c is not ahead of the runner-up by more than 2B (or
    whose screened values overflowed) is decided by sum_t (x_t - mu_ct)^2 in float64.
    """
    zero = M[0, 0] - M[0, 0]
    n = X.shape[0]
    for blk in prange((n + _RB - 1) // _RB):
        r0 = blk * _RB
        r1 = min(r0 + _RB, n)
        acc = np.empty((M.shape[0] + 1, _RB + 1), M.dtype)
        for i in range(r0, r1, 2):
            for c0 in range(0, M.shape[0], CBLOCK):
                _dots_2x10(X, i, min(i + 1, r1 - 1), M, c0, zero, acc, i - r0)
        _decide_block(X, r0, r1, acc, centers, cn, c_dot, c_sq, c_norm, a_tol, out)


@njit(cache=True, fastmath=_FP, inline="always")
def _decide_block(X, r0, r1, acc, centers, cn, c_dot, c_sq, c_norm, a_tol, out):
    """Rows r0:r1 from their dot products acc (C' + 1, >= r1 - r0), stored mean-major so the
    comparisons run across rows in vector lanes."""
    C = cn.shape[0]
    m = r1 - r0
    last = acc.shape[0] - 1
    rc_max = np.sqrt(cn.max())
    pc_max = c_norm * cn.max()
    be = np.full(m, np.inf)
    be2 = np.full(m, np.inf)
    best = np.zeros(m, np.int64)
    for c in range(C):
        for r in range(m):
            e = cn[c] - 2.0 * np.float64(acc[c, r])
            lt = e < be[r]   # selects, not branches: which mean wins is unpredictable
            e2 = e if e < be2[r] else be2[r]
            be2[r] = be[r] if lt else e2
            best[r] = c if lt else best[r]
            be[r] = e if lt else be[r]
    d = X.shape[1]
    sqrt_d = np.sqrt(d)
    for r in range(m):
        rx = np.sqrt(c_sq * (np.float64(acc[last, r]) + d * a_tol))
        bound = c_dot * rx * rc_max + pc_max + a_tol * (d + sqrt_d * rx)
        if be2[r] - be[r] > 2.0 * bound:   # False for NaN (overflowed dot products): recheck
            out[r0 + r] = best[r]
        else:
            out[r0 + r] = _exact_nearest(X, r0 + r, centers)


@njit(cache=True)
def _exact_nearest(X, i, centers):
    best = 0
    bd = np.inf
    for c in range(centers.shape[0]):
        s = _sqdist(X[i], centers[c])
        if s < bd:
            bd = s
            best = c
    return best
