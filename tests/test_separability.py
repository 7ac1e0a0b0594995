import subprocess
import sys

import numpy as np
import pytest

import si_compress as sic
from si_compress.separability import (
    available_backends,
    center_separation_index_per_class,
    class_centers,
    cross_separation_index,
    cross_separation_index_per_sample,
    forward_select,
    nearest_neighbors,
    resolve_backend,
    separation_index,
    separation_index_per_class,
    separation_index_per_sample,
    separation_profile,
    center_separation_index,
)
from si_compress.separability._knn import knn
from si_compress.separability._numpy import knn_numpy

import _reference as ref
from conftest import blobs

FAST = [b for b in ("numba", "faiss", "torch") if b in available_backends()]
ALL = FAST + ["numpy"]


# ---------------------------------------------------------------- hand-computed cases
def test_hand_computed_line():
    # points on a line: 0, 1, 3, 7, 8 with labels a a b b b
    X = np.array([[0.0], [1.0], [3.0], [7.0], [8.0]])
    y = np.array(["a", "a", "b", "b", "b"])
    # nearest: 0->1 (a=a), 1->0 (a=a), 3->1 (b!=a), 7->8, 8->7  => 4/5
    for b in ALL:
        assert separation_index(X, y, backend=b) == pytest.approx(0.8)
    # order 2: 0->{1,3} no; 1->{0,3} no; 3->{1,0} no; 7->{8,3} yes; 8->{7,3} yes => 2/5
    for b in ALL:
        assert separation_index(X, y, order=2, backend=b) == pytest.approx(0.4)
        # soft order 2: 0:1/2, 1:1/2, 3:0, 7:1, 8:1 => 3/5
        assert separation_index(X, y, order=2, soft=True, backend=b) == pytest.approx(0.6)
    # centres: a=0.5, b=6; 3 is 2.5 from a and 3 from b -> wrong; others right => 4/5
    assert center_separation_index(X, y) == pytest.approx(0.8)
    assert ref.si(X.tolist(), y.tolist()) == pytest.approx(0.8)


def test_tie_goes_to_lowest_index():
    # sample 1 is equidistant from 0 and 2; index 0 wins
    X = np.array([[0.0], [1.0], [2.0], [10.0]])
    y = np.array([0, 1, 1, 0])
    for b in ALL:
        nbr = nearest_neighbors(X, 1, backend=b)
        assert nbr[1, 0] == 0
        assert separation_index_per_sample(X, y, backend=b)[1] == 0.0


def test_duplicates_are_neighbours_excluded_by_index():
    # three identical all-zero rows from different classes: each one's nearest is the lowest other index
    X = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [0.0, 0.0], [5.0, 5.1]])
    y = np.array([0, 1, 2, 1, 2])
    expect = np.array([[1], [0], [4], [0], [2]])
    for b in ALL:
        np.testing.assert_array_equal(nearest_neighbors(X, 1, backend=b), expect)
    # order 2 for row 3: duplicates 0 and 1 first
    for b in ALL:
        assert nearest_neighbors(X, 2, backend=b)[3].tolist() == [0, 1]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_negative_zero_equals_zero(dtype):
    X = np.array([[0.0, 1.0], [-0.0, 1.0], [0.0, 1.0], [3.0, 3.0]], dtype)
    for b in ALL:
        assert nearest_neighbors(X, 1, backend=b)[:3, 0].tolist() == [1, 0, 0]


@pytest.mark.parametrize("k", [1, 4])
def test_float32_with_few_duplicates_screened_in_place(rng, k):
    # >= 90% unique float32 rows: the screen reads X in place and skips the duplicates; more
    # rows than one screening block
    X = rng.integers(0, 6, size=(2500, 6)).astype(np.float32) + rng.random((2500, 6), np.float32)
    X[::40] = X[3]
    X[1::53] = 0.0
    np.testing.assert_array_equal(knn(X, k, backend="numba"), knn_numpy(X.astype(np.float64), None, k))


# ---------------------------------------------------------------- known answers and invariances
def test_well_separated_blobs_give_one(rng):
    X, y = blobs(rng)
    for b in ALL:
        assert separation_index(X, y, backend=b) == 1.0
        assert separation_index(X, y, order=5, backend=b) == 1.0
    assert center_separation_index(X, y) == 1.0


@pytest.mark.parametrize("backend", ALL)
def test_invariances(rng, backend):
    X = rng.standard_normal((120, 6))
    y = rng.integers(0, 4, 120)
    base = separation_index(X, y, order=3, soft=True, backend=backend)
    perm = rng.permutation(120)
    assert separation_index(X[perm], y[perm], order=3, soft=True, backend=backend) == pytest.approx(base)
    assert separation_index(X + 100.0, y, order=3, soft=True, backend=backend) == pytest.approx(base)
    assert separation_index(X * 8.0, y, order=3, soft=True, backend=backend) == pytest.approx(base)
    relabel = np.array(["w", "x", "y", "z"])[y]
    assert separation_index(X, relabel, order=3, soft=True, backend=backend) == pytest.approx(base)
    c = center_separation_index(X, y, backend=backend)
    assert center_separation_index(X[perm] * 3.0 - 7.0, relabel[perm], backend=backend) == pytest.approx(c)


def test_labels_shapes_and_not_mutated(rng):
    X = rng.standard_normal((50, 3))
    y = rng.integers(0, 2, 50)
    y_before = y.copy()
    X_before = X.copy()
    a = separation_index(X, y)
    assert separation_index(X, y.reshape(-1, 1)) == a
    assert separation_index(X.tolist(), y.tolist()) == a
    np.testing.assert_array_equal(y, y_before)
    np.testing.assert_array_equal(X, X_before)


# ---------------------------------------------------------------- fast backends equal the oracle
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_knn_equals_oracle_tie_free(rng, backend, k, dtype):
    X = rng.standard_normal((900, 37)).astype(dtype)
    np.testing.assert_array_equal(knn(X, k, backend=backend), knn_numpy(X.astype(np.float64), None, k))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_knn_equals_oracle_integer_data_with_many_ties(rng, backend, k):
    # small integers: massive distance ties and duplicate rows; exact in float64
    X = rng.integers(0, 3, size=(700, 4)).astype(np.float64)
    X[::5] = 0.0
    np.testing.assert_array_equal(knn(X, k, backend=backend), knn_numpy(X, None, k))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("d, k, zero_rows", [(300, 3, 300), (300, 1, 600), (40, 1, 600), (40, 2, 20)])
def test_knn_many_blocks_and_high_dim(rng, backend, d, k, zero_rows):
    # more rows than one screening block (2048); d=300 reuses each off-diagonal block transposed
    # and float32 GEMM errors matter, d=40 computes both blocks; order 1 keeps fewer spare
    # candidates; up to 300 zero rows (>= 90% unique rows) make the numba screen read X in
    # place, 600 make it screen a gathered copy of the unique rows
    X = rng.standard_normal((4500, d)).astype(np.float32)
    X[100:100 + zero_rows] = 0.0  # post-ReLU style all-zero rows
    X[1000:1010] = X[7]
    idx = np.concatenate(([0, 7, 100, 1000, 4499], rng.choice(4500, size=300, replace=False)))
    ours = knn(X, k, backend=backend)[idx]
    Xd = X.astype(np.float64)
    # oracle for the chosen rows only: sorted by (distance, index), self excluded
    for r, i in enumerate(idx):
        dist = ((Xd - Xd[i]) ** 2).sum(1)
        dist[i] = np.inf
        np.testing.assert_array_equal(ours[r], np.argsort(dist, kind="stable")[:k])


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_knn_values_too_large_for_the_float32_screen(backend, dtype):
    # squared norms beyond float32's range: screened distances overflow, so the float64 tier
    # must decide (it used to certify a list that had silently lost its overflowed candidates)
    X = np.array([1.8e19, 1.9e19, 0.0] + [1e20 * (i + 1) for i in range(7)], dtype)[:, None]
    Xd = X.astype(np.float64)
    for k in (1, 3):
        np.testing.assert_array_equal(knn(X, k, backend=backend), knn_numpy(Xd, None, k))
        np.testing.assert_array_equal(knn(X, k, query=X[:4] * 1, backend=backend), knn_numpy(Xd, Xd[:4], k))


@pytest.mark.skipif("numba" not in FAST, reason="numba not installed")
def test_small_search_runs_serial_and_restores_the_thread_count(rng, monkeypatch):
    import numba

    from si_compress.separability import _knn

    before = numba.get_num_threads()
    seen = []
    real = _knn._knn_fast
    monkeypatch.setattr(_knn, "_knn_fast", lambda *a: (seen.append(numba.get_num_threads()), real(*a))[1])
    X = rng.standard_normal((300, 8))
    np.testing.assert_array_equal(knn(X, 2, backend="numba"), knn_numpy(X, None, 2))
    assert seen == [1] and numba.get_num_threads() == before


@pytest.mark.parametrize("kp", [1, 3, 6, 18])
def test_topk_update_equals_plain_insertion(rng, kp):
    # the vectorised pre-check may skip a run of columns only when the plain loop would not
    # have changed the lists: compare with that loop, over two blocks (lists already filled),
    # a width that is not a multiple of the run length, and non-candidate columns
    from si_compress.separability import _numba as nb

    bq, bu = 37, 64 * 5 + 21
    qn = rng.random(bq).astype(np.float32) * 4
    un = rng.random(bu).astype(np.float32) * 4
    cmap = np.arange(bu, dtype=np.int64) * 3
    cmap[::7] = -1
    topd = np.full((bq, kp), np.inf, np.float32)
    topi = np.full((bq, kp), -1, np.int64)
    want_d, want_i = topd.copy(), topi.copy()
    for _ in range(2):
        G = (rng.random((bq, bu)) * 2).astype(np.float32)
        G[:, 100:110] = G[:, 5:6]  # equal distances: the first one seen stays ahead
        un[100:110] = un[5]
        nb.topk_update(G, qn, un, cmap, topd, topi)
        for r in range(bq):
            for c in range(bu):
                dist = np.float64(qn[r] + un[c]) - 2.0 * np.float64(G[r, c])
                if dist < want_d[r, -1] and cmap[c] >= 0:
                    pos = kp - 1
                    while pos > 0 and want_d[r, pos - 1] > dist:
                        want_d[r, pos], want_i[r, pos] = want_d[r, pos - 1], want_i[r, pos - 1]
                        pos -= 1
                    want_d[r, pos], want_i[r, pos] = dist, cmap[c]
    np.testing.assert_array_equal(topi, want_i)
    np.testing.assert_array_equal(topd, want_d)


@pytest.mark.parametrize("backend", FAST)
def test_knn_near_ties_need_the_float64_tier(rng, backend):
    # distances differing far below float32 resolution: the certificate must send rows to float64
    base = rng.standard_normal((1, 64)) * 1000.0
    X = np.repeat(base, 60, axis=0) + rng.standard_normal((60, 64)) * 1e-3
    np.testing.assert_array_equal(knn(X, 2, backend=backend), knn_numpy(X, None, 2))


@pytest.mark.parametrize("backend", FAST)
def test_cross_knn_equals_oracle(rng, backend):
    R = rng.integers(0, 4, size=(400, 5)).astype(np.float64)
    Q = rng.integers(0, 4, size=(150, 5)).astype(np.float64)
    np.testing.assert_array_equal(knn(R, 3, query=Q, backend=backend), knn_numpy(R, Q, 3))


def test_profile_matches_individual_calls(rng):
    X = rng.standard_normal((300, 8))
    y = rng.integers(0, 3, 300)
    p = separation_profile(X, y, order=3)
    assert p.si == separation_index(X, y)
    assert p.high_order_si == separation_index(X, y, order=3)
    assert p.soft_si == separation_index(X, y, order=3, soft=True)
    pc = separation_index_per_class(X, y)
    np.testing.assert_allclose(p.per_class.scores, pc.scores)
    for c in range(3):
        assert pc.scores[c] == pytest.approx(separation_index_per_sample(X, y)[y == c].mean())
    assert p.per_class.counts.sum() == 300


@pytest.mark.parametrize("order,soft", [(1, False), (3, False), (3, True)])
def test_si_matches_pure_python_reference(rng, order, soft):
    X = rng.integers(-2, 3, size=(60, 3)).astype(float)
    y = rng.integers(0, 3, 60)
    expect = ref.si(X.tolist(), y.tolist(), order=order, soft=soft)
    for b in ALL:
        assert separation_index(X, y, order=order, soft=soft, backend=b) == pytest.approx(expect)


# ---------------------------------------------------------------- CSI
@pytest.mark.parametrize("backend", ALL)
def test_csi_matches_reference(rng, backend):
    X = rng.integers(-3, 4, size=(90, 4)).astype(float)
    y = rng.integers(0, 4, 90)
    assert center_separation_index(X, y, backend=backend) == pytest.approx(ref.csi(X.tolist(), y.tolist()))


def test_csi_fast_equals_numpy_tie_free_and_ties(rng):
    X = rng.standard_normal((3000, 50)).astype(np.float32)
    y = rng.integers(0, 10, 3000)
    assert center_separation_index(X, y) == center_separation_index(X, y, backend="numpy")
    # a sample exactly between two centres goes to the lowest class
    X2 = np.array([[0.0], [2.0], [1.0], [1.0]])
    y2 = np.array([0, 1, 1, 0])  # centres: class0 = 0.5, class1 = 1.5; x=1 ties
    pcs = sic.center_separation_index_per_sample(X2, y2)
    assert pcs.tolist() == [1.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("n_classes", [2, 3, 5, 7, 10, 12, 23])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_csi_blockings_equal_numpy(rng, n_classes, dtype):
    # one or more 10-mean blocks, padded means, odd row counts (a row pair at the block end)
    n = 1001
    y = rng.integers(0, n_classes, n)
    X = (rng.standard_normal((n, 37)) + 0.3 * rng.standard_normal((n_classes, 37))[y]).astype(dtype)
    fast = sic.center_separation_index_per_sample(X, y)
    assert fast.tolist() == sic.center_separation_index_per_sample(X, y, backend="numpy").tolist()


def test_csi_near_ties_are_decided_exactly():
    # rows exactly between two means (in float64) go to the lower class; rows a hair off to
    # the nearer one: both need the float64 recheck, the float32 screen cannot tell
    mu = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 5.0]])
    base = np.repeat(mu, 2, axis=0)                         # each mean from two symmetric rows
    base = base + np.array([[-0.25, 0], [0.25, 0]] * 3)
    probe = np.array([[0.5, 0.0], [0.5 + 2**-30, 0.0], [0.5 - 2**-30, 0.0]])
    X = np.vstack([base, np.tile(base, (50, 1)), probe])
    # the probes belong to the far class 2 (their x offsets cancel in its mean)
    y = np.concatenate([np.repeat([0, 1, 2], 2), np.tile(np.repeat([0, 1, 2], 2), 50), [2, 2, 2]])
    from si_compress.separability.csi import nearest_center

    got = nearest_center(X, y)[-3:]
    assert got.tolist() == nearest_center(X, y, backend="numpy")[-3:].tolist() == [0, 1, 0]


def test_csi_nan_found_in_the_first_pass():
    X = np.ones((50, 4), np.float32)
    X[37, 2] = np.nan
    with pytest.raises(ValueError, match="row 37, column 2"):
        center_separation_index(X, np.arange(50) % 2)


def test_integer_labels_fast_path_matches_unique(rng):
    from si_compress._validation import check_labels

    for y in (rng.integers(0, 7, 500), rng.integers(5, 9, 500).astype(np.uint8),
              np.array([3, 1000, 3, 7], np.int32), np.array([-1, 2, 2, -1])):
        codes, classes = check_labels(y, y.size)
        ref_classes, ref_codes = np.unique(y, return_inverse=True)
        assert codes.tolist() == ref_codes.tolist() and classes.tolist() == ref_classes.tolist()
        assert classes.dtype == ref_classes.dtype


def test_csi_per_class_and_centers(rng):
    X, y = blobs(rng, n_per_class=10)
    C = class_centers(X, y, 3)
    np.testing.assert_allclose(C, np.stack([X[y == c].mean(0) for c in range(3)]))
    assert center_separation_index_per_class(X, y).scores.tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- cross-SI
def test_cross_si(rng):
    R = rng.integers(0, 3, size=(80, 3)).astype(float)
    yr = rng.integers(0, 2, 80)
    Q = rng.integers(0, 3, size=(40, 3)).astype(float)
    yq = rng.integers(0, 2, 40)
    for order in (1, 3):
        expect = ref.cross_si(R.tolist(), yr.tolist(), Q.tolist(), yq.tolist(), order=order)
        for b in ALL:
            assert cross_separation_index(R, yr, Q, yq, order=order, backend=b) == pytest.approx(expect)
    # a query class unknown to the reference never matches
    assert cross_separation_index_per_sample(R, yr, Q[:3], [7, 7, 7]).tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- forward selection
def _naive_forward_select(G, y, k):
    chosen, scores = [], []
    for _ in range(k):
        best = None
        for g in range(G.shape[1]):
            if g in chosen:
                continue
            v = separation_index(G[:, chosen + [g], :].reshape(len(G), -1), y, backend="numpy")
            if best is None or v > best[0]:
                best = (v, g)
        chosen.append(best[1])
        scores.append(best[0])
    return chosen, scores


def test_forward_select_equals_naive_recompute(rng):
    G = rng.standard_normal((150, 10, 4))
    G[::9] = 0.0  # duplicate rows
    y = rng.integers(0, 3, 150)
    res = forward_select(G, y)
    order, scores = _naive_forward_select(G, y, 10)
    assert res.order.tolist() == order
    np.testing.assert_allclose(res.si, scores)


def test_forward_select_float32_post_relu_equals_naive(rng):
    # float32 groups with many exact zeros (duplicate rows within a group) over enough samples
    # that both step kernels run: the full scans early, the sorted scans later
    G = np.maximum(rng.standard_normal((400, 12, 3)), 0).astype(np.float32)
    G[::7, ::2] = 0.0
    y = rng.integers(0, 4, 400)
    res = forward_select(G, y)
    order, scores = _naive_forward_select(G, y, 12)
    assert res.order.tolist() == order
    np.testing.assert_allclose(res.si, scores)


def test_forward_select_integer_data_and_max_groups(rng):
    G = rng.integers(0, 3, size=(120, 8, 2)).astype(float)
    y = rng.integers(0, 4, 120)
    res = forward_select(G, y, max_groups=4)
    order, scores = _naive_forward_select(G, y, 4)
    assert res.order.tolist() == order
    np.testing.assert_allclose(res.si, scores)


def test_forward_select_finds_the_informative_group(rng):
    n = 200
    y = np.repeat([0, 1], n // 2)
    G = rng.standard_normal((n, 6, 3))
    G[:, 4, :] += y[:, None] * 20.0  # group 4 separates the classes
    res = forward_select(G, y, max_groups=2)
    assert res.order[0] == 4
    assert res.si[0] == 1.0


def test_forward_select_memory_limit(rng):
    with pytest.raises(ValueError, match="GiB"):
        forward_select(rng.standard_normal((100, 4, 2)), rng.integers(0, 2, 100), max_memory_bytes=1000)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("X,y,exc,match", [
    (np.array([[0.0], [np.nan], [1.0]]), [0, 1, 0], ValueError, "NaN or infinite"),
    (np.array([[0.0], [np.inf], [1.0]]), [0, 1, 0], ValueError, "NaN or infinite"),
    (np.zeros(5), [0, 1, 0, 1, 0], ValueError, "must be 2-D"),
    (np.zeros((4, 2, 2)), [0, 1, 0, 1], ValueError, "must be 2-D"),
    (np.zeros((4, 2)), [0, 1, 0], ValueError, "inconsistent numbers of samples"),
    (np.zeros((4, 2)), [1, 1, 1, 1], ValueError, "at least 2 classes"),
    (np.zeros((1, 2)), [1], ValueError, "at least 2 are needed"),
    (np.zeros((4, 0)), [0, 1, 0, 1], ValueError, "0 features"),
    (np.array([["a", "b"], ["c", "d"]]), [0, 1], TypeError, "numeric"),
    (np.zeros((4, 2)), np.zeros((4, 2)), ValueError, "shape"),
])
def test_bad_input(X, y, exc, match):
    with pytest.raises(exc, match=match):
        separation_index(X, y)


def test_bad_order_and_backend(rng):
    X = rng.standard_normal((5, 2))
    y = [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="needs at least 6 samples"):
        separation_index(X, y, order=5)
    with pytest.raises(ValueError, match=">= 1"):
        separation_index(X, y, order=0)
    with pytest.raises(TypeError, match="integer"):
        separation_index(X, y, order=1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        separation_index(X, y, backend="gpu")
    with pytest.raises(ValueError, match="features"):
        cross_separation_index(X, y, np.zeros((2, 3)), [0, 1])


def test_bad_groups(rng):
    y = rng.integers(0, 2, 10)
    with pytest.raises(ValueError, match="3-D"):
        forward_select(np.zeros((10, 3)), y)
    with pytest.raises(ValueError, match="empty groups"):
        forward_select(np.zeros((10, 0, 3)), y)
    with pytest.raises(ValueError, match="NaN"):
        forward_select(np.full((10, 2, 2), np.nan), y)
    with pytest.raises(ValueError, match="max_groups"):
        forward_select(np.zeros((10, 2, 2)), y, max_groups=0)


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("SI_COMPRESS_BACKEND", "numpy")
    assert resolve_backend("auto") == "numpy"
    monkeypatch.setenv("SI_COMPRESS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SI_COMPRESS_BACKEND"):
        resolve_backend("auto")


def test_import_is_light():
    code = (
        "import sys, si_compress; "
        "heavy = [m for m in ('torch', 'faiss', 'numba', 'matplotlib') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_single_group_and_prefix_si_match_direct(rng):
    from si_compress.separability.selection import prefix_si, single_group_si

    G = rng.integers(0, 3, size=(90, 5, 3)).astype(float)
    y = rng.integers(0, 3, 90)
    single = single_group_si(G, y)
    for g in range(5):
        assert single[g] == separation_index(G[:, g], y, backend="numpy")
    order = [3, 0, 4]
    curve = prefix_si(G, y, order)
    for k in range(3):
        assert curve[k] == separation_index(G[:, order[:k + 1]].reshape(90, -1), y, backend="numpy")
    with pytest.raises(ValueError, match="distinct group indices"):
        prefix_si(G, y, [0, 0])


# ---------------------------------------------------------------- extreme magnitudes (review)
def test_tiny_values_underflow_is_covered_by_the_bounds():
    # float32 values around 1e-22: products underflow, so the screens' relative bounds alone
    # would certify wrong neighbours / means (found in review)
    R = np.array([5.9294103e-22, 2.6009744e-22, 8.3988150e-22, 5.0949590e-22, 5.1088889e-22,
                  7.5303021e-22], np.float32)[:, None]
    for b in FAST:
        np.testing.assert_array_equal(knn(R, 1, backend=b), knn_numpy(R.astype(np.float64), None, 1))
    X = np.array([3.2973172e-22, 7.8842869e-22, 3.0319484e-22, 4.5349788e-22, 1.3404169e-22,
                  4.0311300e-22], np.float32)[:, None]
    y = np.array([0, 0, 0, 1, 1, 1])
    assert center_separation_index(X, y) == center_separation_index(X, y, backend="numpy")
    rng = np.random.default_rng(5)
    for scale in (1e-19, 1e-21, 1e-22):
        Z = (rng.random((60, 3)) * scale).astype(np.float32)
        yz = rng.integers(0, 3, 60)
        assert sic.center_separation_index_per_sample(Z, yz).tolist() == \
            sic.center_separation_index_per_sample(Z, yz, backend="numpy").tolist()
        np.testing.assert_array_equal(knn(Z, 2), knn_numpy(Z.astype(np.float64), None, 2))


def test_csi_huge_float32_values_are_rechecked():
    # float32 dot products overflow to inf: the screen must hand the rows to the float64 recheck
    X = np.array([[1e20], [1e20], [3e20], [3e20]], np.float32)
    y = np.array([0, 0, 1, 1])
    assert center_separation_index(X, y) == center_separation_index(X, y, backend="numpy") == 1.0


def test_float64_values_too_large_are_refused():
    X = np.array([[1e160, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    y = [0, 1, 0, 1]
    with pytest.raises(ValueError, match="rescale"):
        separation_index(X, y)
    with pytest.raises(ValueError, match="rescale"):
        center_separation_index(X, y)
    with pytest.raises(ValueError, match="rescale"):
        forward_select(X[:, :, None], y)


def test_csi_float32_large_common_offset_needs_the_dot_product_bound():
    # float32 features sharing a large offset: e_c = |mu_c|^2 - 2 x.mu_c is computed from terms of
    # ~1e8 whose float32 rounding is far above the gaps between the means; the dot-product term
    # of the error bound is what sends those rows to the float64 recheck
    rng = np.random.default_rng(3)
    X = (1000.0 + rng.standard_normal((2000, 64))).astype(np.float32)
    y = rng.integers(0, 10, 2000)
    fast = sic.center_separation_index_per_sample(X, y)
    assert fast.tolist() == sic.center_separation_index_per_sample(X, y, backend="numpy").tolist()


@pytest.mark.skipif("numba" not in FAST, reason="numba not installed")
@pytest.mark.parametrize("offset, noise", [(0.0, 1e-3), (1e4, 1e-6)])
def test_knn_float64_screen_tier_equals_the_oracle(rng, monkeypatch, offset, noise):
    # Uncertified rows normally go to the direct search (few of them); with that shortcut off,
    # every row the float32 certificate cannot clear runs the float64 screen + exact re-rank tier
    from si_compress.separability import _knn

    calls = []
    real = _knn._fallback64
    monkeypatch.setattr(_knn, "_DIRECT_WORK", 0)
    monkeypatch.setattr(_knn, "_fallback64", lambda *a: (calls.append(a[-1].size), real(*a))[1])
    base = rng.standard_normal((1, 16)) * 100.0 + offset
    # near ties below float32 resolution; with the offset, below the float64 screen's too
    X = np.repeat(base, 300, axis=0) + rng.standard_normal((300, 16)) * noise
    for k in (1, 4):
        np.testing.assert_array_equal(knn(X, k, backend="numba"), knn_numpy(X, None, k))
    assert sum(calls) > 0


def _tie_data():
    # 300 rows one rounding step around a common point: many exact float64 ties, decided only by the
    # order in which a sum of squares is accumulated (issue 16: numba gave [48, 151, 176] for row 188)
    rng = np.random.default_rng(12345)
    return np.repeat(rng.standard_normal((1, 16)) * 100, 300, axis=0) + rng.integers(-2, 3, (300, 16)) * 1e-3


@pytest.mark.parametrize("backend", ALL)
def test_knn_equal_distances_go_to_the_lowest_index(backend):
    X = _tie_data()
    got = knn(X, 3, backend=backend)
    assert got[188].tolist() == [48, 151, 49]          # rows 49 and 176 are at the same distance
    np.testing.assert_array_equal(got, knn_numpy(X, None, 3))
    for k in (1, 5):
        np.testing.assert_array_equal(knn(X, k, backend=backend), knn_numpy(X, None, k))
    np.testing.assert_array_equal(knn(X, 4, query=X[::7], backend=backend), knn_numpy(X, X[::7], 4))


def test_knn_ties_through_the_dask_merge():
    pytest.importorskip("dask")
    import dask.array as da

    X = _tie_data()
    got = knn(da.from_array(X, chunks=(70, 16)), 3, backend="numba" if "numba" in FAST else "numpy")
    np.testing.assert_array_equal(got, knn_numpy(X, None, 3))


def test_correctly_rounded_distance_is_exact_and_order_free():
    from fractions import Fraction

    from si_compress.separability._numpy import sqdist_cr

    X = _tie_data()
    A, B = X[[188, 188, 3, 7]], X[[49, 176, 200, 9]]
    exact = [float(sum(Fraction(float(v)) ** 2 for v in a - b)) for a, b in zip(A, B)]
    assert sqdist_cr(A, B).tolist() == exact
    assert exact[0] == exact[1]
    perm = np.random.default_rng(0).permutation(16)
    assert sqdist_cr(A[:, perm], B[:, perm]).tolist() == exact
    if "numba" in FAST:
        from si_compress.separability import _numba as nb

        for a, b, e in zip(A, B, exact):
            assert nb._sqdist_cr(a, b, 1.0) == e
            assert nb._sqdist_cr(a[perm], b[perm], 1.0) == e


@pytest.mark.skipif("numba" not in FAST, reason="numba not installed")
def test_small_search_leaves_torch_threads_alone():
    # In a fresh process, Numba's first get/set_num_threads starts its OpenMP pool, which sets the
    # OpenMP thread count torch reads: a small search (Numba pinned to one thread, then restored)
    # must leave torch's count as it found it.
    pytest.importorskip("torch")
    code = ("import numpy as np, torch; torch.set_num_threads(1); "
            "from si_compress.separability._knn import knn; "
            "knn(np.random.default_rng(0).standard_normal((200, 8)), 3, backend='numba'); "
            "print(torch.get_num_threads())")
    env = {**__import__("os").environ, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.stdout.split() == ["1"], out.stdout + out.stderr
