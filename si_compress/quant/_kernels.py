"""Numba integer kernels for shift-add convolution and linear layers (imported lazily: numba is heavy).

Two kernels per layer type compute the same integers:

* shift: only left shifts, additions and subtractions on integer activations. A weight is
  ``sign * sum_t 2**shifts[t]`` over its present terms (``shifts[t] == -1`` marks an absent term).
* multiply, the reference: ``acc += x * w`` with the integer weight ``w``.

Layouts:

* Conv, shift (:func:`shift_passes`, :func:`conv2d_shift_direct`): "shift the accumulator, not the
  weight". Each output channel's terms are sorted by exponent, descending, and cut into passes of 8
  rows of one exponent and one sign; a pass computes ``acc = (acc << d) +/- (r0 + ... + r7)``, d
  being the exponent step from the previous pass (Horner's scheme over the exponents), and the
  output is ``acc << e_min``. Per weight term: one load and one addition; one shift per pass. No
  im2col: the zero-padded input, split into stride phases and stored batch-innermost, makes the
  input row that weight column k meets across a tile of output pixels one contiguous slice (a few
  padding columns are computed and dropped).
* Conv, multiply: the zero-padded input is unfolded per tile of output pixels into ``cols (K, P)``
  (im2col: row k holds the input pixel that weight column k meets at each of the P output pixels,
  ``k`` indexing the flattened (C/groups, KH, KW) fan-in), then ``acc[p] += cols[k0, p] * w0 + ...``
  eight terms per pass, fan-in in blocks of K_BLOCK rows so a block stays in L1 while every channel
  reads it.
* Linear layers: eight terms per pass (``x << e``, or ``x * w``) over the batch.

The pixel axis runs over the whole batch, so small maps still fill long SIMD loops; every inner
loop runs over contiguous pixels (SIMD lanes, no branches) and zero weights cost nothing. Pixel
tiles run in parallel (``prange``, one reused scratch buffer per thread). Integers only (no
fastmath is involved), so every summation order gives the same result: the shift and multiply
kernels are bit-exact. The accumulator dtype (of the scratch buffers and the padded input) is chosen
by the caller: int32 when the worst-case sum ``max|x| * max_c sum_k |w[c, k]|`` fits in int32 (twice the
SIMD lanes of int64), else int64. Every partial sum (a pass's row sum, a Horner accumulator: a
subset of a channel's terms, scaled down by a power of two) is bounded by that worst case, so int32
never wraps when chosen.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

TILE_TARGET = 1 << 17  # scratch elements per job of the im2col kernels (cols K x P tile): 512 KiB of int32
DIRECT_TILE = 4096  # output pixels per job of the shift conv (no im2col: longer passes, fewer)
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


@njit(cache=True)
def shift_passes(shifts, signs, zero_row):
    """Horner pass lists of a conv shift weight: shifts (T, Co, K) int8 (-1 = absent), signs (Co, K) int8.

    A channel's terms are ordered by exponent, descending (positive before negative at each exponent;
    within a group, by term then column), and cut into *passes* of 8 (or, for a group's last 1-4 terms, 4) rows of one exponent and one
    sign; a pass short of rows is padded with ``zero_row`` (an all-zero row of the im2col tile).
    Pass j updates ``acc = (acc << pd[j]) +/- (sum of its rows)``, pd being the exponent step from the
    previous pass, so the channel ends as ``acc = sum_k w[k] x_k >> elast`` (exact: every term has
    exponent >= elast) and the output is ``acc << elast``.

    Returns (pptr (Co+1,) int64: channel c's passes are [pptr[c], pptr[c+1]); pd (n,) int64 exponent
    steps; pneg (n,) int8 1 for a subtracting pass; pn (n,) int8 rows used, 8 or 4; prow (n, 8) int32
    row indices; elast (Co,) int64; abs_sums (Co,) float64, sum_k |w[c, k]| for the accumulator choice).
    """
    n_terms, c_out, k_size = shifts.shape
    # per channel, bin g = (63 - e) * 2 + negative (128: absent term), counted at g + 1 (counting sort);
    # branch-free: random signs would mispredict
    count = np.zeros((c_out, 130), np.int64)
    abs_sums = np.zeros(c_out, np.float64)
    n_pass = 0
    for c in range(c_out):
        cc = count[c]
        sgc = signs[c]
        for t in range(n_terms):
            shc = shifts[t, c]
            for k in range(k_size):
                s = sgc[k]
                e = np.int64(shc[k])
                cc[((63 - e) * 2 + (s < 0) if (s != 0) & (e >= 0) else 128) + 1] += 1
        for g in range(1, 129):
            n_pass += (cc[g] + 7) // 8
            abs_sums[c] += math.ldexp(cc[g], 63 - (g - 1) // 2)  # count * 2**e
    pptr = np.zeros(c_out + 1, np.int64)
    pd = np.zeros(n_pass, np.int64)
    pneg = np.zeros(n_pass, np.int8)
    pn = np.zeros(n_pass, np.int8)
    prow = np.full((n_pass, 8), zero_row, np.int32)
    elast = np.zeros(c_out, np.int64)
    rows = np.empty(n_terms * k_size, np.int32)
    j = 0
    for c in range(c_out):
        cc = count[c]
        for g in range(1, 130):  # bin starts
            cc[g] += cc[g - 1]
        sgc = signs[c]
        for t in range(n_terms):
            shc = shifts[t, c]
            for k in range(k_size):
                s = sgc[k]
                e = np.int64(shc[k])
                g = (63 - e) * 2 + (s < 0) if (s != 0) & (e >= 0) else 128
                rows[cc[g]] = k
                cc[g] += 1
        # now cc[g] is the end of bin g (and the start of bin g + 1)
        prev = -1
        i = 0
        for g in range(128):
            end = cc[g]
            e = 63 - g // 2
            while i < end:
                m = min(8, end - i)
                pn[j] = 8 if m > 4 else 4
                for q in range(m):
                    prow[j, q] = rows[i + q]
                pneg[j] = g % 2
                pd[j] = 0 if prev < 0 else prev - e
                prev = e
                i += m
                j += 1
        elast[c] = max(prev, 0)
        pptr[c + 1] = j
    return pptr, pd, pneg, pn, prow, elast, abs_sums


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
def _horner_passes(acc, flat, roff, base, pd, pneg, pn, prow, lo, hi, n_p, mask):
    """Passes [lo, hi) of :func:`shift_passes` on acc[:n_p]: ``acc = (acc << d) +/- sum of rows``, row k
    being ``flat[base + roff[k]:]``.

    Additions only inside a pass (its rows share one exponent and one sign); one shift of the
    accumulator per pass. ``mask`` as in :func:`_shift_row` (31 keeps the int32 path in 8 lanes)."""
    for j in range(lo, hi):
        d = pd[j] & mask
        r = prow[j]
        r0 = flat[base + roff[r[0]]:]
        r1 = flat[base + roff[r[1]]:]
        r2 = flat[base + roff[r[2]]:]
        r3 = flat[base + roff[r[3]]:]
        if pn[j] == 8:
            r4 = flat[base + roff[r[4]]:]
            r5 = flat[base + roff[r[5]]:]
            r6 = flat[base + roff[r[6]]:]
            r7 = flat[base + roff[r[7]]:]
            if pneg[j]:
                for p in range(n_p):
                    acc[p] = (acc[p] << d) - (((r0[p] + r1[p]) + (r2[p] + r3[p])) + ((r4[p] + r5[p]) + (r6[p] + r7[p])))
            else:
                for p in range(n_p):
                    acc[p] = (acc[p] << d) + (((r0[p] + r1[p]) + (r2[p] + r3[p])) + ((r4[p] + r5[p]) + (r6[p] + r7[p])))
        elif pneg[j]:
            for p in range(n_p):
                acc[p] = (acc[p] << d) - ((r0[p] + r1[p]) + (r2[p] + r3[p]))
        else:
            for p in range(n_p):
                acc[p] = (acc[p] << d) + ((r0[p] + r1[p]) + (r2[p] + r3[p]))


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


def tile_pixels(k_size: int, n_pix: int, n_threads: int = 1, direct: bool = False) -> int:
    """Output pixels per job: about TILE_TARGET / K (DIRECT_TILE for :func:`conv2d_shift_direct`), a
    multiple of 16, at least 16, and small enough that every one of ``n_threads`` threads gets a job
    when there are enough pixels (the caller rounds it to whole pixels of the batch for the direct kernel)."""
    t = max(16, (DIRECT_TILE if direct else TILE_TARGET // max(k_size, 1)) // 16 * 16)
    if n_threads > 1:
        per_thread = -(-n_pix // n_threads)  # ceil
        t = min(t, max(16, -(-per_thread // 16) * 16))  # rounded up to a multiple of 16
    return min(t, n_pix)


@njit(parallel=True, cache=True)
def fill_phases(phases, x, pt, pl):
    """phases (C, SH, SW, Hph, Wph, N) <- x (N, C, H, W): padded pixel (h + pt, w + pl) goes to phase
    ((h + pt) % SH, (w + pl) % SW) at ((h + pt) // SH, (w + pl) // SW); input pixels past the phases'
    extent are not read by any output and are skipped. Untouched entries (the zero padding) are left
    as they are. Per (c, h) a (N, W) -> (W, N) transpose whose destination stays in cache."""
    n_img, c_in, h_in, w_in = x.shape
    sh, sw, hph, wph = phases.shape[1], phases.shape[2], phases.shape[3], phases.shape[4]
    hs = min(h_in, hph * sh - pt)
    ws = min(w_in, wph * sw - pl)
    flat = phases.ravel()
    for c in prange(c_in):
        for h in range(hs):
            a = (h + pt) % sh
            hq = (h + pt) // sh
            for b in range(sw):
                w0 = (b - pl) % sw  # the first input column of phase b, at column (w0 + pl) // sw
                row = (((c * sh + a) * sw + b) * hph + hq) * wph * n_img + (w0 + pl) // sw * n_img
                for n in range(n_img):
                    src = x[n, c, h]
                    d = row + n
                    for w in range(w0, ws, sw):
                        flat[d] = src[w]
                        d += n_img


@njit(parallel=True, cache=True)
def conv2d_shift_direct(xf, pptr, pd, pneg, pn, prow, elast, out, c_in, hph, wph, kh_size, kw_size, sh, sw, dh, dw,
                        groups, tile, n_chunks, acc_scratch):
    """Shift conv on Horner pass lists (:func:`shift_passes`) without im2col: the passes read the input in place.

    xf: the zero-padded input split into stride phases, in (C, SH * SW, Hph, Wph, N) order (batch
    innermost) and flattened: phase (a, b) holds padded pixel (h * SH + a, w * SW + b) at (h, w);
    followed by at least ``tile + ((KW - 1) * dw // SW) * N`` zeros (the short passes' zero row starts
    right after the input). Hph = OH + (KH - 1) * dh // SH, Wph likewise. Output pixels run over
    q = (oh * Wph + w) * N + n for w in [0, Wph): the input pixel that weight column k = (ci, kh, kw)
    meets at q lies in phase ((kh * dh) % SH, (kw * dw) % SW) of channel ci, at offset
    ``((kh * dh) // SH * Wph + (kw * dw) // SW) * N + q``, so every row of a tile is a contiguous
    slice (stride 1: one phase, the padded image). Columns w >= OW are computed and dropped (the
    price: Wph / OW more work, against an im2col copy of K values per output pixel).
    out (N, Co, OH * OW) int64; acc_scratch (n_chunks, Co / groups, tile) in the accumulator dtype;
    tile a multiple of N.
    """
    n_img, c_out, n_pix = out.shape
    ow_size = wph - (kw_size - 1) * dw // sw
    oh_size = hph - (kh_size - 1) * dh // sh
    n_q = oh_size * wph * n_img
    c_per_g = c_in // groups
    co_per_g = c_out // groups
    k_size = c_per_g * kh_size * kw_size
    plane = hph * wph * n_img
    roff = np.empty(k_size + 1, np.int64)
    for cig in range(c_per_g):
        for kh in range(kh_size):
            for kw in range(kw_size):
                phase = ((kh * dh) % sh) * sw + (kw * dw) % sw
                roff[(cig * kh_size + kh) * kw_size + kw] = ((cig * sh * sw + phase) * plane
                                                             + ((kh * dh) // sh * wph + (kw * dw) // sw) * n_img)
    n_tiles = (n_q + tile - 1) // tile
    narrow = acc_scratch.itemsize == 4
    for chunk in prange(n_chunks):
        acc = acc_scratch[chunk]
        rows = roff.copy()
        for tile_i in range(chunk, n_tiles, n_chunks):
            q0 = tile_i * tile
            n_p = min(tile, n_q - q0)
            for g in range(groups):
                base = g * c_per_g * sh * sw * plane + q0
                rows[k_size] = c_in * sh * sw * plane - base  # the zero row: the zeros after the input
                co0 = g * co_per_g
                for c in range(co_per_g):
                    a = acc[c]
                    for p in range(n_p):
                        a[p] = 0
                    if narrow:
                        _horner_passes(a, xf, rows, base, pd, pneg, pn, prow, pptr[co0 + c], pptr[co0 + c + 1], n_p,
                                       31)
                    else:
                        _horner_passes(a, xf, rows, base, pd, pneg, pn, prow, pptr[co0 + c], pptr[co0 + c + 1], n_p,
                                       63)
                # out[n, co, oh * OW + w] = acc << elast for the columns w < OW (tiles hold whole pixels);
                # image by image, so the writes run along output rows (pages) and the reads stride in cache
                pos0 = q0 // n_img
                for c in range(co_per_g):
                    e = elast[co0 + c]
                    a = acc[c]
                    for n in range(n_img):
                        o = out[n, co0 + c]
                        oh = pos0 // wph
                        w = pos0 - oh * wph
                        i = n
                        while i < n_p:
                            if w < ow_size:
                                o[oh * ow_size + w] = np.int64(a[i]) << e
                            i += n_img
                            w += 1
                            if w == wph:
                                w = 0
                                oh += 1
    return out


@njit(parallel=True, cache=True)
def conv2d_mul_terms(xp, ks, ws, n_all, out, kh_size, kw_size, sh, sw, dh, dw, groups, oh_size, ow_size, scratch):
    """Integer-multiply reference conv on term lists (:func:`mul_terms`) into ``out`` (Co, N * OH * OW),
    accumulating in out's dtype.

    xp (N, C, H + pads, W + pads) zero-padded int input in out's dtype; ws in out's dtype. scratch
    (n_chunks, >= K, tile) in out's dtype: one im2col buffer per parallel chunk (reused across
    calls: no page faults); chunk c handles pixel tiles c, c + n_chunks, ... Per channel, eight
    terms per pass over the tile's pixels, fan-in in blocks of K_BLOCK rows so a block stays in L1
    while every channel reads it.
    """
    c_in = xp.shape[1]
    c_out = out.shape[0]
    n_q = out.shape[1]
    c_per_g = c_in // groups
    co_per_g = c_out // groups
    n_chunks, _, tile = scratch.shape
    k_size = c_per_g * kh_size * kw_size
    n_tiles = (n_q + tile - 1) // tile
    for chunk in prange(n_chunks):
        cols = scratch[chunk]
        next_pos = np.empty(c_out, np.int64)  # per channel: first term not yet applied
        for tile_i in range(chunk, n_tiles, n_chunks):
            q0 = tile_i * tile
            n_p = min(tile, n_q - q0)
            for g in range(groups):
                _im2col(cols, xp, g * c_per_g, c_per_g, kh_size, kw_size, q0, n_p, oh_size, ow_size, sh, sw, dh, dw)
                co0 = g * co_per_g
                for co in range(co0, co0 + co_per_g):
                    next_pos[co] = 0
                for k1 in range(K_BLOCK, k_size + K_BLOCK, K_BLOCK):
                    for co in range(co0, co0 + co_per_g):
                        kc = ks[co]
                        a = next_pos[co]
                        b = a
                        while b < n_all[co] and kc[b] < k1:
                            b += 1
                        next_pos[co] = b
                        _mul_row(out[co, q0:q0 + n_p], cols, kc, ws[co], a, b, n_p)
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
