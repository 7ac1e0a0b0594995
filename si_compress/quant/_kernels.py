"""Numba integer kernels for shift-add convolution and linear layers (imported lazily: numba is heavy).

Two kernels per layer type share one layout and loop structure:

* ``*_shift``: the inner product uses only left shifts, additions and subtractions on integer
  activations: ``acc += x << e`` (``acc -= x << e`` for a negative weight). A weight is
  ``sign * sum_t 2**shifts[t]`` over its present terms (``shifts[t] == -1`` marks an absent term).
* ``*_mul``: the reference, ``acc += x * w`` with the integer weight ``w``.

Layout (the speed comes from here, not from the shift):

1. Each output channel's weight becomes a *term list*: the (column k, exponent e) pairs of its
   non-zero terms, positive terms first, each sign grouped by exponent (``k`` indexes the flattened
   (C/groups, KH, KW) fan-in). Zero weights cost nothing.
2. Activations are unfolded per tile of output pixels (the pixel axis runs over the whole batch)
   and group into ``cols (K, P)`` (im2col from the zero-padded input): row k holds the input pixel
   that weight column k meets at each of the P output pixels, so stride, dilation and padding are
   resolved once.
3. Conv, shift: per exponent group, ``tmp[p] = sum_k cols[k, p]`` (additions only, eight rows per
   pass), then ``acc[p] +/-= tmp[p] << e``: one shift per group, ``sum_e (sum_k x_k) << e``.
   Conv, multiply: ``acc[p] += cols[k0, p] * w0 + ... `` eight terms per pass, fan-in in blocks of
   K_BLOCK rows so a block stays in L1 while every channel reads it. Linear layers: eight terms per
   pass (``x << e``) over the batch. Innermost loops run over contiguous pixels (SIMD lanes, no
   branches).

Pixel tiles run in parallel (``prange``, one reused im2col buffer per thread). Integers only (no fastmath is involved), so
every summation order gives the same result: the shift and multiply kernels are bit-exact.
The accumulator dtype is the dtype of the ``cols`` scratch, chosen by the caller: int32 when the
worst-case sum ``max|x| * max_c sum_k |w[c, k]|`` fits in int32 (twice the SIMD lanes of int64),
else int64. Every partial sum (group sums included) is bounded by that worst case, so int32 never
wraps when chosen.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

TILE_TARGET = 1 << 17  # scratch elements per job (cols K x P tile): about 512 KiB of int32
K_BLOCK = 32  # fan-in rows applied to every output channel before the next rows


@njit(cache=True)
def shift_terms(shifts, signs):
    """Term lists of a shift weight: shifts (T, Co, K) int8 (-1 = absent), signs (Co, K) int8.

    Returns (ks (Co, T*K) int32, es (Co, T*K) int64, n_pos (Co,) int64, n_all (Co,) int64): for
    channel c, ``ks[c, :n_pos[c]]`` / ``es`` are the positive terms and ``[n_pos[c]:n_all[c]]`` the
    negative ones; within each sign the terms are grouped by exponent (ascending), then by column.
    """
    n_terms, c_out, k_size = shifts.shape
    ks = np.zeros((c_out, n_terms * k_size), np.int32)
    es = np.zeros((c_out, n_terms * k_size), np.int64)
    n_pos = np.zeros(c_out, np.int64)
    n_all = np.zeros(c_out, np.int64)
    count = np.zeros(64, np.int64)
    for c in range(c_out):
        i = 0
        for want in (1, -1):
            count[:] = 0  # counting sort by exponent (0..62)
            for k in range(k_size):
                if signs[c, k] == want:
                    for t in range(n_terms):
                        if shifts[t, c, k] >= 0:
                            count[shifts[t, c, k] + 1] += 1
            for e in range(1, 64):
                count[e] += count[e - 1]
            for k in range(k_size):
                if signs[c, k] == want:
                    for t in range(n_terms):
                        e = shifts[t, c, k]
                        if e >= 0:
                            j = i + count[e]
                            ks[c, j] = k
                            es[c, j] = e
                            count[e] += 1
            i += count[63]
            if want == 1:
                n_pos[c] = i
        n_all[c] = i
    return ks, es, n_pos, n_all


@njit(cache=True)
def mul_terms(weight):
    """Term lists of an integer weight (Co, K): (ks, ws, n_all) with ``ks[c, :n_all[c]]`` the columns
    of the non-zero weights ``ws`` (int64)."""
    c_out, k_size = weight.shape
    ks = np.zeros((c_out, k_size), np.int32)
    ws = np.zeros((c_out, k_size), np.int64)
    n_all = np.zeros(c_out, np.int64)
    for c in range(c_out):
        i = 0
        for k in range(k_size):
            if weight[c, k] != 0:
                ks[c, i] = k
                ws[c, i] = weight[c, k]
                i += 1
        n_all[c] = i
    return ks, ws, n_all


@njit(cache=True, inline="always")
def _shift_row(acc, cols, ks, es, lo, hi, n_p, negate, mask):
    """acc[:n_p] (+/-)= sum over terms i in [lo, hi) of cols[ks[i], :n_p] << es[i].

    ``mask`` (31 for int32, 63 for int64 accumulators, a compile-time constant) tells LLVM the shift is
    narrower than the lane, so the int32 path shifts 8 lanes at a time instead of widening to int64;
    exponents never exceed it (the caller picks int32 only when every shifted value fits)."""
    i = lo
    while i + 8 <= hi:
        r0 = cols[ks[i]]
        r1 = cols[ks[i + 1]]
        r2 = cols[ks[i + 2]]
        r3 = cols[ks[i + 3]]
        r4 = cols[ks[i + 4]]
        r5 = cols[ks[i + 5]]
        r6 = cols[ks[i + 6]]
        r7 = cols[ks[i + 7]]
        e0 = es[i] & mask
        e1 = es[i + 1] & mask
        e2 = es[i + 2] & mask
        e3 = es[i + 3] & mask
        e4 = es[i + 4] & mask
        e5 = es[i + 5] & mask
        e6 = es[i + 6] & mask
        e7 = es[i + 7] & mask
        if negate:
            for p in range(n_p):
                acc[p] -= (((r0[p] << e0) + (r1[p] << e1)) + ((r2[p] << e2) + (r3[p] << e3))
                           + (((r4[p] << e4) + (r5[p] << e5)) + ((r6[p] << e6) + (r7[p] << e7))))
        else:
            for p in range(n_p):
                acc[p] += (((r0[p] << e0) + (r1[p] << e1)) + ((r2[p] << e2) + (r3[p] << e3))
                           + (((r4[p] << e4) + (r5[p] << e5)) + ((r6[p] << e6) + (r7[p] << e7))))
        i += 8
    while i + 4 <= hi:
        r0 = cols[ks[i]]
        r1 = cols[ks[i + 1]]
        r2 = cols[ks[i + 2]]
        r3 = cols[ks[i + 3]]
        e0 = es[i] & mask
        e1 = es[i + 1] & mask
        e2 = es[i + 2] & mask
        e3 = es[i + 3] & mask
        if negate:
            for p in range(n_p):
                acc[p] -= (r0[p] << e0) + (r1[p] << e1) + (r2[p] << e2) + (r3[p] << e3)
        else:
            for p in range(n_p):
                acc[p] += (r0[p] << e0) + (r1[p] << e1) + (r2[p] << e2) + (r3[p] << e3)
        i += 4
    while i < hi:
        r0 = cols[ks[i]]
        e0 = es[i] & mask
        if negate:
            for p in range(n_p):
                acc[p] -= r0[p] << e0
        else:
            for p in range(n_p):
                acc[p] += r0[p] << e0
        i += 1


@njit(cache=True, inline="always")
def _sum_rows(tmp, cols, ks, lo, hi, n_p):
    """tmp[:n_p] = sum over terms i in [lo, hi) (hi > lo) of cols[ks[i], :n_p]: additions only."""
    r0 = cols[ks[lo]]
    for p in range(n_p):
        tmp[p] = r0[p]
    i = lo + 1
    while i + 8 <= hi:
        r0 = cols[ks[i]]
        r1 = cols[ks[i + 1]]
        r2 = cols[ks[i + 2]]
        r3 = cols[ks[i + 3]]
        r4 = cols[ks[i + 4]]
        r5 = cols[ks[i + 5]]
        r6 = cols[ks[i + 6]]
        r7 = cols[ks[i + 7]]
        for p in range(n_p):
            tmp[p] += ((r0[p] + r1[p]) + (r2[p] + r3[p])) + ((r4[p] + r5[p]) + (r6[p] + r7[p]))
        i += 8
    while i < hi:
        r0 = cols[ks[i]]
        for p in range(n_p):
            tmp[p] += r0[p]
        i += 1


@njit(cache=True, inline="always")
def _shift_grouped(acc, tmp, cols, ks, es, lo, hi, n_p, negate, mask):
    """acc[:n_p] (+/-)= sum over terms in [lo, hi) of cols[ks[i]] << es[i], for terms grouped by
    exponent: each group's rows are added first, then shifted once (``sum_e (sum_k x_k) << e``)."""
    i = lo
    while i < hi:
        e = es[i]
        j = i + 1
        while j < hi and es[j] == e:
            j += 1
        _sum_rows(tmp, cols, ks, i, j, n_p)
        sh = e & mask
        if negate:
            for p in range(n_p):
                acc[p] -= tmp[p] << sh
        else:
            for p in range(n_p):
                acc[p] += tmp[p] << sh
        i = j


@njit(cache=True, inline="always")
def _mul_row(acc, cols, ks, ws, lo, hi, n_p):
    """acc[:n_p] += sum over terms i in [lo, hi) of cols[ks[i], :n_p] * ws[i]."""
    i = lo
    while i + 8 <= hi:
        r0 = cols[ks[i]]
        r1 = cols[ks[i + 1]]
        r2 = cols[ks[i + 2]]
        r3 = cols[ks[i + 3]]
        r4 = cols[ks[i + 4]]
        r5 = cols[ks[i + 5]]
        r6 = cols[ks[i + 6]]
        r7 = cols[ks[i + 7]]
        w0 = ws[i]
        w1 = ws[i + 1]
        w2 = ws[i + 2]
        w3 = ws[i + 3]
        w4 = ws[i + 4]
        w5 = ws[i + 5]
        w6 = ws[i + 6]
        w7 = ws[i + 7]
        for p in range(n_p):
            acc[p] += (((r0[p] * w0) + (r1[p] * w1)) + ((r2[p] * w2) + (r3[p] * w3))
                       + (((r4[p] * w4) + (r5[p] * w5)) + ((r6[p] * w6) + (r7[p] * w7))))
        i += 8
    while i + 4 <= hi:
        r0 = cols[ks[i]]
        r1 = cols[ks[i + 1]]
        r2 = cols[ks[i + 2]]
        r3 = cols[ks[i + 3]]
        w0 = ws[i]
        w1 = ws[i + 1]
        w2 = ws[i + 2]
        w3 = ws[i + 3]
        for p in range(n_p):
            acc[p] += r0[p] * w0 + r1[p] * w1 + r2[p] * w2 + r3[p] * w3
        i += 4
    while i < hi:
        r0 = cols[ks[i]]
        w0 = ws[i]
        for p in range(n_p):
            acc[p] += r0[p] * w0
        i += 1


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


@njit(cache=True, inline="always")
def _im2col(cols, xp, ci0, c_per_g, kh_size, kw_size, q0, n_q, oh_size, ow_size, sh, sw, dh, dw):
    """cols[(cig * KH + kh) * KW + kw, j] = xp[n, ci0 + cig, oh * sh + kh * dh, ow * sw + kw * dw] for
    the output pixel q = q0 + j, q indexing (image n, output row oh, output column ow) in C order.

    ``xp`` is the zero-padded input, so every read is in range: each output row's run is a plain
    (strided) copy."""
    n_pix = oh_size * ow_size
    n0 = q0 // n_pix
    oh0 = (q0 - n0 * n_pix) // ow_size
    ow0 = q0 - n0 * n_pix - oh0 * ow_size
    for cig in range(c_per_g):
        for kh in range(kh_size):
            for kw in range(kw_size):
                row = cols[(cig * kh_size + kh) * kw_size + kw]
                n, oh, ow = n0, oh0, ow0
                j = 0
                while j < n_q:
                    seg = min(ow_size - ow, n_q - j)
                    # offset views, then zero-based loops: numba drops the negative-index fix-up
                    # and LLVM vectorises the copy (5x faster than indexing row[j + t])
                    dst = row[j:]
                    src = xp[n, ci0 + cig, oh * sh + kh * dh, ow * sw + kw * dw:]
                    if sw == 1:
                        for t in range(seg):
                            dst[t] = src[t]
                    else:
                        for t in range(seg):
                            dst[t] = src[t * sw]
                    j += seg
                    ow = 0
                    oh += 1
                    if oh == oh_size:
                        oh = 0
                        n += 1


def tile_pixels(k_size: int, n_pix: int, n_threads: int = 1) -> int:
    """Output pixels per job: about TILE_TARGET / K, a multiple of 16, at least 16, and small enough
    that every one of ``n_threads`` threads gets a job when there are enough pixels."""
    t = max(16, (TILE_TARGET // max(k_size, 1)) // 16 * 16)
    if n_threads > 1:
        per_thread = -(-n_pix // n_threads)  # ceil
        t = min(t, max(16, -(-per_thread // 16) * 16))  # rounded up to a multiple of 16
    return min(t, n_pix)


@njit(parallel=True, cache=True)
def conv2d_terms(xp, ks, vals, n_pos, n_all, is_shift, out, kh_size, kw_size, sh, sw, dh, dw, groups,
                 oh_size, ow_size, scratch):
    """Conv on term lists into ``out`` (Co, N * OH * OW), accumulating in out's dtype.

    xp (N, C, H + pads, W + pads) zero-padded int input in out's dtype; ks/vals/n_pos/n_all from
    :func:`shift_terms` (is_shift) or :func:`mul_terms` (n_pos unused). The pixel axis runs over
    the whole batch, so small maps still fill long SIMD loops. scratch (n_chunks, >= K, tile) in
    out's dtype: one im2col buffer per parallel chunk (reused across calls: no page faults);
    chunk c handles pixel tiles c, c + n_chunks, ...
    """
    c_in = xp.shape[1]
    c_out = out.shape[0]
    n_q = out.shape[1]
    c_per_g = c_in // groups
    co_per_g = c_out // groups
    n_chunks, _, tile = scratch.shape
    k_size = c_per_g * kh_size * kw_size
    n_tiles = (n_q + tile - 1) // tile
    narrow = out.itemsize == 4
    for chunk in prange(n_chunks):
        cols = scratch[chunk]
        tmp = np.empty(tile, out.dtype)  # one exponent group's sum of rows
        next_pos = np.empty(c_out, np.int64)  # mul path, per channel: first term not yet applied
        for tile_i in range(chunk, n_tiles, n_chunks):
            q0 = tile_i * tile
            n_p = min(tile, n_q - q0)
            for g in range(groups):
                _im2col(cols, xp, g * c_per_g, c_per_g, kh_size, kw_size, q0, n_p, oh_size, ow_size, sh, sw, dh,
                        dw)
                co0 = g * co_per_g
                if is_shift:
                    # terms grouped by exponent (shift_terms): adds per term, one shift per group
                    for co in range(co0, co0 + co_per_g):
                        acc = out[co, q0:q0 + n_p]
                        if narrow:
                            _shift_grouped(acc, tmp, cols, ks[co], vals[co], 0, n_pos[co], n_p, False, 31)
                            _shift_grouped(acc, tmp, cols, ks[co], vals[co], n_pos[co], n_all[co], n_p, True, 31)
                        else:
                            _shift_grouped(acc, tmp, cols, ks[co], vals[co], 0, n_pos[co], n_p, False, 63)
                            _shift_grouped(acc, tmp, cols, ks[co], vals[co], n_pos[co], n_all[co], n_p, True, 63)
                    continue
                for co in range(co0, co0 + co_per_g):
                    next_pos[co] = 0
                # K blocks of K_BLOCK rows: the block's rows stay in L1 while every channel reads them
                for k1 in range(K_BLOCK, k_size + K_BLOCK, K_BLOCK):
                    for co in range(co0, co0 + co_per_g):
                        kc = ks[co]
                        a = next_pos[co]
                        b = a
                        while b < n_all[co] and kc[b] < k1:
                            b += 1
                        next_pos[co] = b
                        _mul_row(out[co, q0:q0 + n_p], cols, kc, vals[co], a, b, n_p)
    return out


@njit(parallel=True, cache=True)
def linear_terms(xt, ks, vals, n_pos, n_all, is_shift, out, tile):
    """Linear layer on term lists: xt (K, N) (features by batch, out's dtype) -> out (M, N).

    Jobs: (output row block of 8, batch tile); the batch is the SIMD axis.
    """
    m_size = out.shape[0]
    n_batch = xt.shape[1]
    n_tiles = (n_batch + tile - 1) // tile
    m_blocks = (m_size + 7) // 8
    for job in prange(m_blocks * n_tiles):
        mb = job // n_tiles
        p0 = (job % n_tiles) * tile
        n_p = min(tile, n_batch - p0)
        cols = xt[:, p0:p0 + n_p]
        narrow = out.itemsize == 4
        for m in range(mb * 8, min(m_size, mb * 8 + 8)):
            acc = out[m, p0:p0 + n_p]
            if is_shift:
                if narrow:
                    _shift_row(acc, cols, ks[m], vals[m], 0, n_pos[m], n_p, False, 31)
                    _shift_row(acc, cols, ks[m], vals[m], n_pos[m], n_all[m], n_p, True, 31)
                else:
                    _shift_row(acc, cols, ks[m], vals[m], 0, n_pos[m], n_p, False, 63)
                    _shift_row(acc, cols, ks[m], vals[m], n_pos[m], n_all[m], n_p, True, 63)
            else:
                _mul_row(acc, cols, ks[m], vals[m], 0, n_all[m], n_p)
    return out
