"""Numba kernels of the exact nearest-neighbour search (imported lazily: numba is heavy).

The search has three stages, each exact where it matters:
1. ``topk_update``: a float32 screen. Block Gram matrices G = Q_b U_b^T come from BLAS; this
   kernel turns them into approximate squared distances n_q + n_u - 2 G and keeps a sorted
   top-k' list per query row.
2. ``refine``: float64 distances, sum_k (q_k - u_k)^2, for the k' screened candidates, ordered
   by (distance, index), plus a certificate that no unscreened row can be as close.
3. ``expand``: maps neighbours among unique rows back to samples, merging duplicate rows in
   index order so that ties go to the lowest sample index.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


_CH = 64   # columns per vectorised pre-check in topk_update


@njit(cache=True, inline="always")
def _insert_top(topd, topi, r, d, idx):
    """Insert (d, idx) into row r of the sorted lists, dropping the last entry."""
    pos = topd.shape[1] - 1
    while pos > 0 and topd[r, pos - 1] > d:
        topd[r, pos] = topd[r, pos - 1]
        topi[r, pos] = topi[r, pos - 1]
        pos -= 1
    topd[r, pos] = d
    topi[r, pos] = idx


# The two top-k merges run on one thread on purpose: they alternate with the BLAS block GEMMs,
# whose idle threads spin for a while after each call; a parallel Numba region started then
# fights them for the cores (measured: the whole search 10-50% slower than with these serial).
@njit(cache=True)
def topk_update(G, qn, un, cmap, topd, topi):
    """Merge one block of approximate distances into the running sorted top-k lists.

    G (bq, bu) float32 Gram block; qn (bq,), un (bu,) float32 squared norms; cmap (bu,) the id
    stored for each column (-1: not a candidate, e.g. a duplicate row); topd/topi (bq, k)
    sorted ascending, updated in place.
    Each run of _CH columns is first turned into distances and counted against the row's
    current k-th value in vector lanes (a fixed trip count, so the loop vectorises); the
    insertion loop, scalar and branchy, reads the buffered run only when a value is below it.
    The k-th value only falls during a run, so a run with none is one the insertion loop would
    have left unchanged: the result is the plain loop's (tested).
    """
    bq, bu = G.shape
    k = topd.shape[1]
    nfull = bu // _CH
    buf = np.empty(_CH)
    for r in range(bq):
        worst = topd[r, k - 1]
        nr = qn[r]
        for ch in range(nfull):
            c0 = ch * _CH
            hit = 0
            for c in range(_CH):
                d = nr + un[c0 + c] - 2.0 * G[r, c0 + c]
                buf[c] = d
                hit += d < worst
            if hit == 0:
                continue
            for c in range(_CH):
                d = buf[c]
                if d < worst and cmap[c0 + c] >= 0:
                    _insert_top(topd, topi, r, d, cmap[c0 + c])
                    worst = topd[r, k - 1]
        for c in range(nfull * _CH, bu):
            d = nr + un[c] - 2.0 * G[r, c]
            if d < worst and cmap[c] >= 0:
                _insert_top(topd, topi, r, d, cmap[c])
                worst = topd[r, k - 1]


@njit(cache=True)
def topk_update_cols(G, rn, cn, rmap, topd, topi):
    """``topk_update`` for the transposed block without transposing it: column c of G (bq, bu)
    is a query (norm cn[c], lists topd/topi[c]) against the rows r (norms rn, stored id rmap[r],
    -1: not a candidate).
    Columns are taken 16 at a time so each read of G is a contiguous 64-byte run.
    """
    bq, bu = G.shape
    k = topd.shape[1]
    nchunks = (bu + 15) // 16
    for ch in range(nchunks):
        c0 = ch * 16
        c1 = min(c0 + 16, bu)
        worst = np.empty(16, np.float32)
        for c in range(c0, c1):
            worst[c - c0] = topd[c, k - 1]
        for r in range(bq):
            nr = rn[r]
            for c in range(c0, c1):
                d = nr + cn[c] - 2.0 * G[r, c]
                if d < worst[c - c0] and rmap[r] >= 0:
                    _insert_top(topd, topi, c, d, rmap[r])
                    worst[c - c0] = topd[c, k - 1]


# Float64 sums of squared differences run in vector lanes (reassociation allowed, so the loop
# vectorises: 6x faster than a sequential sum). The lane order is fixed by the compiled code and
# does not depend on where a row lies in memory (tested), so equal inputs give equal sums and
# integer-valued data is summed exactly.
_FP = {"reassoc", "contract"}


@njit(cache=True, fastmath=_FP)
def _sqdist(a, b):
    s = 0.0
    for t in range(a.shape[0]):
        diff = np.float64(a[t]) - np.float64(b[t])
        s += diff * diff
    return s


# Relative and (per coordinate) absolute error of ``_sqdist`` against the exact sum of the squared
# float64 differences, per coordinate: any summation order (reassoc), fused or rounded products
# (contract), products that underflow; with a margin (2 units of 2**-53 per term, not 1).
_SQ_REL = 2.3e-16
_SQ_ABS = 1e-322


@njit(cache=True)
def _sqdist_cr(a, b, fast):
    """The squared distance of the float64 differences a - b, correctly rounded (up to 2**-100 relative):
    the same value in whatever order the coordinates come, so equal distances are equal bit for bit
    and ties go to the lowest index in every backend. Each square is split exactly (Dekker) and
    summed in double-double; no fast-math flags here (they would undo the error-free transforms).
    ``fast``: the ``_sqdist`` value, returned as is when it is not finite."""
    if not np.isfinite(fast):
        return fast
    hi = 0.0
    lo = 0.0
    for t in range(a.shape[0]):
        x = np.float64(a[t]) - np.float64(b[t])
        p = x * x
        c = 134217729.0 * x            # 2**27 + 1: x = xh + xl exactly, each with <= 26 bits
        xh = c - (c - x)
        xl = x - xh
        e = ((xh * xh - p) + 2.0 * xh * xl) + xl * xl   # p + e == x * x exactly
        s = hi + p                     # two-sum: s + err == hi + p exactly
        bb = s - hi
        err = (hi - (s - bb)) + (p - bb)
        hi = s
        lo += err + e
    return hi + lo


@njit(cache=True, inline="always")
def _offer(bd, bi, bf, q, row, u, f):
    """Insert row u (tie key f) into the lists when it may enter them: its fast distance screens it,
    the correctly rounded one (:func:`_sqdist_cr`) is what is stored and compared."""
    d = _sqdist(q, row)
    n = q.shape[0]
    if d * (1.0 - _SQ_REL * (n + 2)) - _SQ_ABS * n > bd[bd.shape[0] - 1]:
        return
    _insert_sorted(bd, bi, bf, _sqdist_cr(q, row, d), u, f)


@njit(parallel=True, cache=True)
def pair_sqdist(A, B, idx, out):
    """out[i, t] = squared distance of A[i] to B[idx[i, t]], with the arithmetic of the re-ranking
    (correctly rounded, :func:`_sqdist_cr`)."""
    for i in prange(idx.shape[0]):
        for t in range(idx.shape[1]):
            out[i, t] = _sqdist_cr(A[i], B[idx[i, t]], _sqdist(A[i], B[idx[i, t]]))


@njit(cache=True, inline="always")
def _insert_sorted(bd, bi, bf, d, u, f):
    """Insert candidate u (distance d, tie key f) into the lists sorted by (distance, key)."""
    need = bd.shape[0]
    if d < bd[need - 1] or (d == bd[need - 1] and f < bf[need - 1]):
        pos = need - 1
        while pos > 0 and (bd[pos - 1] > d or (bd[pos - 1] == d and bf[pos - 1] > f)):
            bd[pos] = bd[pos - 1]
            bi[pos] = bi[pos - 1]
            bf[pos] = bf[pos - 1]
            pos -= 1
        bd[pos] = d
        bi[pos] = u
        bf[pos] = f


@njit(parallel=True, cache=True)
def refine(Q, qrows, U, urows, qnorm, cand, cand_d, first, self_ids, need, screened_all, c_tol, a_tol,
           out_idx, out_dist, ok):
    """Exact float64 re-ranking of screened candidates, with a certificate.

    Query i is row Q[qrows[i]], unique row u is U[urows[u]] (no gathered copy of the data), in
    their input dtype (converted exactly to float64); qnorm (nq,) float64
    squared norms; cand (nq, k') candidate rows of U (-1 = empty) and cand_d (nq, k') their
    screened distances, ascending; first (m,) lowest sample index of each unique row
    (tie-break key); self_ids (nq,) the unique row to exclude, -1 for none. Writes the ``need``
    best (distance, first) candidates to out_idx/out_dist and ok[i] = the result is provably
    exact: every unscreened row u has true distance > the need-th distance D, because its
    screened value was >= the largest one kept and the screen errs by at most
    c_tol * (n_q + n_u) + a_tol (a_tol: the absolute error of products that underflow), where
    n_u <= (sqrt(n_q) + sqrt(D))^2 for any row that could tie. The same bound ends the
    re-ranking early: once a screened value exceeds D by more than the error bound, neither it
    nor any later candidate can enter the list (not used when every row was screened: those
    small searches re-rank every candidate).
    """
    nq, kp = cand.shape
    for i in prange(nq):
        bd = np.full(need, np.inf)
        bi = np.full(need, -1, np.int64)
        bf = np.full(need, np.iinfo(np.int64).max, np.int64)
        q = Q[qrows[i]]
        for t in range(kp):
            u = cand[i, t]
            if u < 0:
                break
            if u == self_ids[i]:
                continue
            dk = bd[need - 1]
            if dk < np.inf and not screened_all:
                reach = np.sqrt(qnorm[i]) + np.sqrt(dk)
                if np.float64(cand_d[i, t]) - (c_tol * (qnorm[i] + reach * reach) + a_tol) > dk:
                    break
            _offer(bd, bi, bf, q, U[urows[u]], u, first[u])
        for t in range(need):
            out_idx[i, t] = bi[t]
            out_dist[i, t] = bd[t]
        # a list with an empty slot lost a candidate whose screened value was not finite
        # (float32 overflow): the bound says nothing about it, so the row is searched again
        if screened_all:
            ok[i] = bi[need - 1] >= 0 and cand[i, kp - 1] >= 0
        else:
            dk = bd[need - 1]
            reach = np.sqrt(qnorm[i]) + np.sqrt(dk)
            tol = c_tol * (qnorm[i] + reach * reach) + a_tol
            ok[i] = bi[need - 1] >= 0 and cand[i, kp - 1] >= 0 and np.float64(cand_d[i, kp - 1]) - tol > dk


@njit(parallel=True, cache=True)
def exact_rows(Q, U, urows, cand_mask_rows, cand_cols, first, self_ids, need, out_idx, out_dist):
    """Exact re-ranking over explicit candidate lists (the float64 fallback tier).

    cand_mask_rows (nb+1,) CSR offsets into cand_cols (candidate rows of U per query).
    """
    nb = out_idx.shape[0]
    for i in prange(nb):
        bd = np.full(need, np.inf)
        bi = np.full(need, -1, np.int64)
        bf = np.full(need, np.iinfo(np.int64).max, np.int64)
        for t in range(cand_mask_rows[i], cand_mask_rows[i + 1]):
            u = cand_cols[t]
            if u == self_ids[i]:
                continue
            _offer(bd, bi, bf, Q[i], U[urows[u]], u, first[u])
        for t in range(need):
            out_idx[i, t] = bi[t]
            out_dist[i, t] = bd[t]


@njit(parallel=True, cache=True)
def expand(nbr, nbr_dist, offsets, members, query_group, query_sample, k, out):
    """Sample-level k nearest neighbours from unique-row neighbours.

    nbr/nbr_dist (nq_rows, need): unique neighbours of each query row; offsets/members: CSR of
    sample indices per unique row, ascending; query_group (nq,) row of ``nbr`` to use for each
    query and, for self search, its own unique row (query_sample >= 0 is excluded by index;
    -1 for cross search, where own-row members are not neighbours at distance 0 by default).
    out (nq, k): sample indices ordered by (distance, index).
    """
    nq = out.shape[0]
    need = nbr.shape[1]
    cap = k + need * k
    for q in prange(nq):
        cd = np.empty(cap)
        ci = np.empty(cap, np.int64)
        cnt = 0
        g = query_group[q]
        s = query_sample[q]
        if s >= 0:
            # duplicates of the query itself: distance 0, excluded by index only
            taken = 0
            for t in range(offsets[g], offsets[g + 1]):
                j = members[t]
                if j == s:
                    continue
                cd[cnt] = 0.0
                ci[cnt] = j
                cnt += 1
                taken += 1
                if taken == k:
                    break
        for t in range(need):
            v = nbr[g, t]
            if v < 0:
                continue
            taken = 0
            for p in range(offsets[v], offsets[v + 1]):
                cd[cnt] = nbr_dist[g, t]
                ci[cnt] = members[p]
                cnt += 1
                taken += 1
                if taken == k:
                    break
        # insertion sort by (distance, index); cnt is at most k + k*k
        for a in range(1, cnt):
            dv = cd[a]
            iv = ci[a]
            b = a - 1
            while b >= 0 and (cd[b] > dv or (cd[b] == dv and ci[b] > iv)):
                cd[b + 1] = cd[b]
                ci[b + 1] = ci[b]
                b -= 1
            cd[b + 1] = dv
            ci[b + 1] = iv
        for t in range(k):
            out[q, t] = ci[t] if t < cnt else -1


@njit(parallel=True, cache=True)
def row_hashes(B, K, sign):
    """64-bit hash per row: sum_t bits(x_t) * K[t] mod 2^64.

    B (n, d) the rows' bit patterns (uint32 for float32, uint64 for float64 data); K (d,) odd
    uint64 multipliers; sign the bit pattern of -0.0 (uint64), hashed as 0.0 so that equal
    values hash equally. Integer arithmetic mod 2^64 is associative, so the sum vectorises and
    equal rows hash equally at any address. Two rows differing in one value never collide (an
    odd K[t] is invertible mod 2^64); rows hashing equally are compared in full anyway.
    """
    n, d = B.shape
    out = np.empty(n, np.uint64)
    for i in prange(n):
        h = np.uint64(0)
        for t in range(d):
            b = np.uint64(B[i, t])
            if b == sign:
                b = np.uint64(0)  # -0.0
            h += b * K[t]
        out[i] = h
    return out


@njit(cache=True)
def group_equal_rows(X, order, hashes):
    """Group identical rows. ``order`` sorts rows by (hash, index). Returns group id per row,
    with groups numbered by their lowest member index order of appearance in ``order``."""
    n = X.shape[0]
    gid = np.full(n, -1, np.int64)
    ngroups = 0
    start = 0
    reps = np.empty(n, np.int64)
    while start < n:
        stop = start + 1
        while stop < n and hashes[order[stop]] == hashes[order[start]]:
            stop += 1
        # within one hash bucket, compare each row to the representatives found so far
        first_rep = ngroups
        for p in range(start, stop):
            i = order[p]
            found = -1
            for g in range(first_rep, ngroups):
                r = reps[g]
                same = True
                for t in range(X.shape[1]):
                    if X[i, t] != X[r, t]:
                        same = False
                        break
                if same:
                    found = g
                    break
            if found < 0:
                reps[ngroups] = i
                found = ngroups
                ngroups += 1
            gid[i] = found
        start = stop
    return gid, ngroups


@njit(parallel=True, cache=True)
def gram_to_sqdist(Gv, sq, D, Dbits, c, nn):
    """In place: per-group Gram matrices D[g] = F_g F_g^T -> squared distances, and each
    sample's nearest other sample in each group.

    Gv (n, n_groups, group_dim) the groups (F_g = Gv[:, g]); sq (n_groups, n) squared norms;
    D (n_groups, n, n) float64, Dbits the same memory as int64. D[g, i, j] becomes
    sq_gi + sq_gj - 2 D[g, i, j]; entries within the GEMM's rounding bound c * (sq_gi + sq_gj)
    of 0 are recomputed from float64 differences (duplicate rows get exactly 0, so their ties
    still go to the lowest index). nn[g, i] = argmin_{j != i} D[g, i, j], ties to the lowest j
    (the first selection step), read while the row is in cache.
    """
    ng, n, _ = D.shape
    for gi in prange(ng * n):
        g = gi // n
        i = gi % n
        si = sq[g, i]
        near_zero = 0
        for j in range(n):   # branch-free, so it vectorises
            v = si + sq[g, j] - 2.0 * D[g, i, j]
            D[g, i, j] = v
            near_zero += v <= c * (si + sq[g, j])
        if near_zero:
            for j in range(n):
                if D[g, i, j] <= c * (si + sq[g, j]):
                    D[g, i, j] = 0.0 if j == i else _sqdist(Gv[i, g], Gv[j, g])
        nn[g, i] = _argmin_row_bits(Dbits[g], i, i)


@njit(cache=True, inline="always")
def _argmin_row_bits(Bits, r, skip):
    """argmin_{j != skip} of row r of a non-negative float64 matrix given as its int64 bits
    (integer order of the bits is numeric order for doubles >= +0.0), ties to the lowest j.
    Two integer min reductions, both vectorised (float min reductions are not)."""
    n = Bits.shape[1]
    big = np.iinfo(np.int64).max
    bk = big
    for j in range(n):
        bk = min(bk, Bits[r, j] if j != skip else big)
    bj = n
    for j in range(n):
        bj = min(bj, j if (Bits[r, j] == bk) & (j != skip) else n)
    return bj


@njit(cache=True, inline="always")
def _argmin_full(D_run, D_all, g, i, S, Sbits):
    """argmin_{j != i} D_run[i, j] + D_all[g, i, j], ties to the lowest j, in three vectorised
    passes: the sums into S, the smallest bit pattern (for the non-negative doubles here,
    integer order of the bits is numeric order, and integer min reductions vectorise where
    float ones do not), then the first j holding it."""
    n = S.shape[0]
    for j in range(n):
        S[j] = D_run[i, j] + D_all[g, i, j]
    S[i] = np.inf
    bk = Sbits[0]
    for j in range(n):
        bk = min(bk, Sbits[j])
    bj = n
    for j in range(n):
        bj = min(bj, j if Sbits[j] == bk else n)
    return bj


@njit(parallel=True, cache=True)
def selection_step(D_run, D_run_bits, D_all, g_add, cands, codes, hits):
    """hits[i, c] = does the nearest other sample of i under D_run + D_all[cands[c]] share i's label.

    First adds the group chosen by the previous step, D_run += D_all[g_add] (g_add < 0: none),
    one row at a time so the row is in cache for the scans below. D_run_bits is D_run viewed
    as int64.

    Exact, with pruning that never changes the answer: distances only grow when a group is
    added, so only j with D_run[i, j] <= max_c (D_run[i, nn] + D_all[c, i, nn]) (nn: i's current
    nearest neighbour) can win. When that leaves more than a quarter of the samples (the early
    steps), every candidate is scanned in full with vectorised passes; otherwise the survivors
    are scanned in increasing D_run order and a candidate's scan stops once D_run[i, j] exceeds
    its best sum. Ties go to the lowest j. Every distance here is a sum of non-negative float64
    squared distances (never -0.0, never NaN).
    """
    n = D_run.shape[0]
    nc = cands.shape[0]
    for i in prange(n):
        if g_add >= 0:
            for j in range(n):
                D_run[i, j] += D_all[g_add, i, j]
        nn = _argmin_row_bits(D_run_bits, i, i)
        bound = 0.0
        for c in range(nc):
            b = D_run[i, nn] + D_all[cands[c], i, nn]
            if b > bound:
                bound = b
        m = 0
        for j in range(n):
            m += (j != i) & (D_run[i, j] <= bound)
        if 4 * m > n:
            S = np.empty(n)
            Sbits = S.view(np.int64)
            for c in range(nc):
                hits[i, c] = codes[_argmin_full(D_run, D_all, cands[c], i, S, Sbits)] == codes[i]
            continue
        idx = np.empty(m, np.int64)
        m = 0
        for j in range(n):
            if j != i and D_run[i, j] <= bound:
                idx[m] = j
                m += 1
        row = D_run[i]
        idx = idx[np.argsort(row[idx], kind="mergesort")]
        for c in range(nc):
            g = cands[c]
            bv = np.inf
            bj = n
            for t in range(m):
                j = idx[t]
                r = row[j]
                if r > bv:
                    break
                v = r + D_all[g, i, j]
                if v < bv or (v == bv and j < bj):
                    bv = v
                    bj = j
            hits[i, c] = codes[bj] == codes[i]


@njit(parallel=True, cache=True)
def row_sqnorms(X, out):
    """Squared row norms (n,) accumulated in float64 (vector lanes, as ``_sqdist``)."""
    for i in prange(X.shape[0]):
        out[i] = _sqnorm(X[i])


@njit(cache=True, fastmath=_FP)
def _sqnorm(a):
    s = 0.0
    for t in range(a.shape[0]):
        v = np.float64(a[t])
        s += v * v
    return s


@njit(parallel=True, cache=True)
def exact_knn_rows(Q, qrows, U, urows, first, self_ids, need, out_idx, out_dist):
    """Exact float64 search of a few query rows against every unique row (no screen, no bound):
    query i is Q[qrows[i]]; results ordered by (distance, first[u]).

    The unique rows are split into chunks searched in parallel, every query against each row
    while it is in cache (the data is read once, not once per query); the chunks' lists are
    then merged. The (distance, key) order is total, so the result does not depend on the
    chunking. Scratch: 24 * chunks * n_query * need bytes, chunks chosen to keep it <= 32 MiB
    (a single chunk beyond that, the size of the output itself).
    """
    nb = qrows.shape[0]
    m = urows.shape[0]
    # per-chunk lists cost 24 * nch * nb * need bytes: at most 32 MiB (or one chunk's worth)
    nch = max(1, min(64, m // 16, (32 * 2**20) // max(1, 24 * nb * need)))
    pd = np.full((nch, nb, need), np.inf)
    pi = np.full((nch, nb, need), -1, np.int64)
    pf = np.full((nch, nb, need), np.iinfo(np.int64).max, np.int64)
    for ch in prange(nch):
        u0 = ch * m // nch
        u1 = (ch + 1) * m // nch
        for u in range(u0, u1):
            row = U[urows[u]]
            for i in range(nb):
                if u == self_ids[i]:
                    continue
                _offer(pd[ch, i], pi[ch, i], pf[ch, i], Q[qrows[i]], row, u, first[u])
    for i in prange(nb):
        bd = np.full(need, np.inf)
        bi = np.full(need, -1, np.int64)
        bf = np.full(need, np.iinfo(np.int64).max, np.int64)
        for ch in range(nch):
            for t in range(need):
                if pi[ch, i, t] >= 0:
                    _insert_sorted(bd, bi, bf, pd[ch, i, t], pi[ch, i, t], pf[ch, i, t])
        for t in range(need):
            out_idx[i, t] = bi[t]
            out_dist[i, t] = bd[t]
