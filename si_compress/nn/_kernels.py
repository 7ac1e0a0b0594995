"""Numba integer kernels for shift-add convolution and linear layers (imported lazily: numba is heavy).

Two kernels per layer type share one loop structure:

* ``*_shift``: the inner product uses only left shifts, additions and subtractions on integer
  activations: ``acc += x << e`` (or ``acc -= x << e`` for a negative weight). A weight is
  ``sign * sum_t 2**shifts[t]`` over its present terms (``shifts[t] == -1`` marks an absent
  term), so one term is a power-of-two weight and two terms an additive power-of-two weight.
* ``*_mul``: the reference, ``acc += x * w`` with the integer weight ``w``.

Exponents are non-negative on the integer grid (the caller rescales by ``2**e_min``), so shifting
is exact and the two kernels are bit-exact. Accumulators are int64.

Loop order: the weight is fixed across the innermost loop over output columns (conv) or batch
rows (linear), so the sign/term decisions sit outside it and the inner loop is a plain
strided add that LLVM can vectorise. Zero padding is handled by clipping the loop ranges, not by
branching per element.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _valid_range(offset, stride, size, n_out):
    """Output indices o in [lo, hi) with 0 <= o * stride + offset < size."""
    lo = -(offset // stride)  # ceil(-offset / stride) with floor division
    if lo < 0:
        lo = 0
    hi = (size - 1 - offset) // stride + 1
    if hi > n_out:
        hi = n_out
    if hi < lo:
        hi = lo
    return lo, hi


@njit(parallel=True, cache=True)
def conv2d_shift(x, shifts, signs, sh, sw, pt, pl, dh, dw, groups, oh_size, ow_size):
    """Shift-add conv2d.

    x (N, C, H, W) int32 activations; shifts (T, Co, C // groups, KH, KW) int8 (-1 = absent
    term); signs (Co, C // groups, KH, KW) int8 in {-1, 0, 1}; stride (sh, sw); top/left zero
    padding (pt, pl); dilation (dh, dw). Returns (N, Co, oh_size, ow_size) int64.
    """
    n_batch, _, h, w = x.shape
    n_terms, c_out, c_per_g, kh_size, kw_size = shifts.shape
    out = np.zeros((n_batch, c_out, oh_size, ow_size), dtype=np.int64)
    co_per_g = c_out // groups
    for job in prange(n_batch * c_out):
        n = job // c_out
        co = job % c_out
        ci0 = (co // co_per_g) * c_per_g
        acc = out[n, co]
        for cig in range(c_per_g):
            ci = ci0 + cig
            for kh in range(kh_size):
                off_h = kh * dh - pt
                oh_lo, oh_hi = _valid_range(off_h, sh, h, oh_size)
                for kw in range(kw_size):
                    s = signs[co, cig, kh, kw]
                    if s == 0:
                        continue
                    off_w = kw * dw - pl
                    ow_lo, ow_hi = _valid_range(off_w, sw, w, ow_size)
                    for t in range(n_terms):
                        e = np.int64(shifts[t, co, cig, kh, kw])
                        if e < 0:
                            continue
                        for oh in range(oh_lo, oh_hi):
                            xrow = x[n, ci, oh * sh + off_h]
                            arow = acc[oh]
                            if s > 0:
                                for ow in range(ow_lo, ow_hi):
                                    arow[ow] += np.int64(xrow[ow * sw + off_w]) << e
                            else:
                                for ow in range(ow_lo, ow_hi):
                                    arow[ow] -= np.int64(xrow[ow * sw + off_w]) << e
    return out


@njit(parallel=True, cache=True)
def conv2d_mul(x, weight, sh, sw, pt, pl, dh, dw, groups, oh_size, ow_size):
    """Multiply reference with the loop structure of ``conv2d_shift``.

    x (N, C, H, W) int32; weight (Co, C // groups, KH, KW) int64. Returns (N, Co, OH, OW) int64.
    """
    n_batch, _, h, w = x.shape
    c_out, c_per_g, kh_size, kw_size = weight.shape
    out = np.zeros((n_batch, c_out, oh_size, ow_size), dtype=np.int64)
    co_per_g = c_out // groups
    for job in prange(n_batch * c_out):
        n = job // c_out
        co = job % c_out
        ci0 = (co // co_per_g) * c_per_g
        acc = out[n, co]
        for cig in range(c_per_g):
            ci = ci0 + cig
            for kh in range(kh_size):
                off_h = kh * dh - pt
                oh_lo, oh_hi = _valid_range(off_h, sh, h, oh_size)
                for kw in range(kw_size):
                    wv = weight[co, cig, kh, kw]
                    if wv == 0:
                        continue
                    off_w = kw * dw - pl
                    ow_lo, ow_hi = _valid_range(off_w, sw, w, ow_size)
                    for oh in range(oh_lo, oh_hi):
                        xrow = x[n, ci, oh * sh + off_h]
                        arow = acc[oh]
                        for ow in range(ow_lo, ow_hi):
                            arow[ow] += np.int64(xrow[ow * sw + off_w]) * wv
    return out


@njit(parallel=True, cache=True)
def linear_shift(xt, shifts, signs):
    """Shift-add linear layer on transposed activations.

    xt (K, N) int32 (features by batch, so the inner batch loop is contiguous); shifts (T, M, K)
    int8 (-1 = absent term); signs (M, K) int8. Returns (M, N) int64.
    """
    k_size, n_batch = xt.shape
    n_terms, m_size, _ = shifts.shape
    out = np.zeros((m_size, n_batch), dtype=np.int64)
    for m in prange(m_size):
        acc = out[m]
        for k in range(k_size):
            s = signs[m, k]
            if s == 0:
                continue
            for t in range(n_terms):
                e = np.int64(shifts[t, m, k])
                if e < 0:
                    continue
                if s > 0:
                    for n in range(n_batch):
                        acc[n] += np.int64(xt[k, n]) << e
                else:
                    for n in range(n_batch):
                        acc[n] -= np.int64(xt[k, n]) << e
    return out


@njit(parallel=True, cache=True)
def linear_mul(xt, weight):
    """Multiply reference for ``linear_shift``: xt (K, N) int32, weight (M, K) int64 -> (M, N) int64."""
    k_size, n_batch = xt.shape
    m_size = weight.shape[0]
    out = np.zeros((m_size, n_batch), dtype=np.int64)
    for m in prange(m_size):
        acc = out[m]
        for k in range(k_size):
            wv = weight[m, k]
            if wv == 0:
                continue
            for n in range(n_batch):
                acc[n] += np.int64(xt[k, n]) * wv
    return out
