"""Exact search on a Dask cluster and on a torch device: equal to the numpy oracle.

The Dask tests run on a real ``distributed.LocalCluster`` (2 worker processes); the torch screen
runs on CPU tensors here (CI has no GPU), with blocks small enough that every merge path runs.
"""
from __future__ import annotations

import numpy as np
import pytest

from si_compress.separability import (
    cross_separation_index,
    nearest_neighbors,
    separation_index,
    separation_index_per_class,
    separation_profile,
)
from si_compress.separability._knn import knn, resolve_backend
from si_compress.separability._numpy import knn_numpy

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       memory_limit="1GiB", dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _cases():
    rng = np.random.default_rng(7)
    tie_free = rng.standard_normal((530, 24))
    integer = rng.integers(0, 3, (450, 4)).astype(np.float64)          # many exact ties
    dup = rng.standard_normal((60, 16)).astype(np.float32)
    dup = np.concatenate([dup, dup[:25], np.zeros((30, 16), np.float32)])  # duplicate and all-zero rows
    return {"tie_free": tie_free, "integer": integer, "duplicates": dup}


@pytest.mark.parametrize("case", ["tie_free", "integer", "duplicates"])
@pytest.mark.parametrize("k", [1, 3])
def test_dask_self_search_equals_the_oracle(client, case, k):
    X = _cases()[case]
    want = knn_numpy(X.astype(np.float64), None, k)
    got = knn(da.from_array(X, chunks=(97, X.shape[1])), k)          # uneven blocks, several per worker
    np.testing.assert_array_equal(got, want)
    assert client.run(lambda: True)   # the work ran with the cluster up


def test_dask_cross_search_and_si_functions_equal_in_memory(client):
    rng = np.random.default_rng(3)
    X = rng.integers(0, 4, (400, 6)).astype(np.float32)
    y = rng.integers(0, 3, 400)
    Q = rng.integers(0, 4, (150, 6)).astype(np.float32)
    yq = rng.integers(0, 3, 150)
    Xd = da.from_array(X, chunks=(64, 6))
    np.testing.assert_array_equal(knn(Xd, 2, query=da.from_array(Q, chunks=(40, 6))),
                                  knn_numpy(X.astype(np.float64), Q.astype(np.float64), 2))
    assert separation_index(Xd, y) == separation_index(X, y, backend="numpy")
    a, b = separation_index_per_class(Xd, y), separation_index_per_class(X, y, backend="numpy")
    np.testing.assert_array_equal(a.scores, b.scores)
    pa, pb = separation_profile(Xd, y, order=3), separation_profile(X, y, order=3, backend="numpy")
    np.testing.assert_array_equal(pa.neighbors, pb.neighbors)
    assert cross_separation_index(Xd, y, da.from_array(Q, chunks=(50, 6)), yq) == \
        cross_separation_index(X, y, Q, yq, backend="numpy")
    np.testing.assert_array_equal(nearest_neighbors(Xd, 2), knn_numpy(X.astype(np.float64), None, 2))


def test_feature_shards_round_trip(client, tmp_path):
    from si_compress.separability.cluster import open_feature_shards, save_feature_shards

    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 12)).astype(np.float32)
    y = rng.integers(0, 4, 300)
    paths = save_feature_shards(X, tmp_path / "feats", rows_per_shard=70)
    assert len(paths) == 5
    Xd = open_feature_shards(tmp_path / "feats")
    assert Xd.shape == X.shape and Xd.dtype == np.float32
    assert separation_index(Xd, y) == separation_index(X, y, backend="numpy")
    with pytest.raises(FileExistsError, match="already holds"):
        save_feature_shards(X, tmp_path / "feats")
    with pytest.raises(FileNotFoundError, match="no shard"):
        open_feature_shards(tmp_path / "empty")


def test_dask_input_is_validated():
    X = np.ones((20, 3))
    X[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        separation_index(da.from_array(X, chunks=(7, 3)), np.arange(20) % 2)
    with pytest.raises(ValueError, match="k must be"):
        knn(da.from_array(np.ones((5, 2)), chunks=(2, 2)), 5)
    with pytest.raises(ValueError, match="backend"):
        knn(da.from_array(np.ones((5, 2)), chunks=(2, 2)), 1, backend="gpu")


@pytest.mark.parametrize("case", ["tie_free", "integer", "duplicates"])
def test_torch_screen_with_small_blocks_equals_the_oracle(monkeypatch, case):
    pytest.importorskip("torch")
    import si_compress.separability._torch as tscreen

    monkeypatch.setattr(tscreen, "_QUERY_BLOCK", 64)
    monkeypatch.setattr(tscreen, "_REF_BLOCK", 50)     # several reference tiles: the top-k merge runs
    X = _cases()[case]
    for k in (1, 4):
        np.testing.assert_array_equal(knn(X, k, backend="torch"), knn_numpy(X.astype(np.float64), None, k))
    Q = X[::3] + 0.5
    np.testing.assert_array_equal(knn(X, 2, query=Q, backend="torch"),
                                  knn_numpy(X.astype(np.float64), Q.astype(np.float64), 2))


def test_torch_screen_keeps_tf32_settings_and_auto_ignores_it_on_cpu():
    torch = pytest.importorskip("torch")
    from si_compress.separability._torch import _ieee_fp32

    m = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"
    before = getattr(m, attr)
    with _ieee_fp32():
        assert getattr(m, attr) in ("ieee", False)
    assert getattr(m, attr) == before
    if not torch.cuda.is_available():
        assert resolve_backend("auto", 64, 10**8) != "torch"
