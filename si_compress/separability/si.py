"""Separation Index (SI) family: first-order, high-order, soft, per-class, per-sample, cross.

For features X (n, d) and labels y, let N_r(i) be the r nearest other samples of i (Euclidean,
i itself excluded by index, ties to the lowest index). Then, per sample,
    hard:  s_i = 1[ y_j == y_i for every j in N_r(i) ]      (r = 1 is the classic SI)
    soft:  s_i = |{ j in N_r(i) : y_j == y_i }| / r
and SI = mean_i s_i; per-class SI averages s_i over the samples of one class.

X may also be a ``dask.array`` (n, d) (e.g. ``cluster.open_feature_shards``): the search then runs
as block-pair tasks on the active dask scheduler, with the same results (``cluster.knn_dask``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validation import check_features, check_labels, check_order
from ._knn import knn


@dataclass(frozen=True)
class ClassScores:
    """Per-class means of a per-sample score; ``classes`` are the sorted distinct labels."""

    classes: np.ndarray  # (C,) original label values
    scores: np.ndarray   # (C,) float64 in [0, 1]
    counts: np.ndarray   # (C,) samples per class

    def as_dict(self) -> dict:
        return {c.item() if hasattr(c, "item") else c: float(s) for c, s in zip(self.classes, self.scores)}


@dataclass(frozen=True)
class SIProfile:
    """Everything one r-NN search gives: SI (r=1), high-order SI (r), soft SI (r), per class."""

    order: int
    si: float
    high_order_si: float
    soft_si: float
    per_sample: np.ndarray        # (n,) first-order per-sample SI (0/1)
    per_class: ClassScores        # first-order SI per class
    neighbors: np.ndarray         # (n, order) sample indices, nearest first


def _per_sample_from_neighbors(codes: np.ndarray, nbr_codes: np.ndarray, order: int, soft: bool) -> np.ndarray:
    same = nbr_codes[:, :order] == codes[:, None]
    return same.mean(axis=1) if soft else same.all(axis=1).astype(np.float64)


def class_means(values: np.ndarray, codes: np.ndarray, classes: np.ndarray) -> ClassScores:
    counts = np.bincount(codes, minlength=classes.size)
    sums = np.bincount(codes, weights=values, minlength=classes.size)
    return ClassScores(classes=classes, scores=sums / np.maximum(counts, 1), counts=counts)


def _features(X, name: str = "X", min_samples: int = 2):
    """Validated features: a numpy array (``check_features``), or a dask array (n, d) checked for
    shape and finiteness in one pass and searched block by block (``cluster.knn_dask``)."""
    from .cluster import is_dask_array

    if not is_dask_array(X):
        return check_features(X, name=name, min_samples=min_samples)
    if any(np.isnan(s) for s in X.shape):
        raise ValueError(f"{name} is a dask array of unknown row count; call {name}.compute_chunk_sizes() first")
    if X.ndim != 2 or X.shape[0] < min_samples or X.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D (n_samples >= {min_samples}, n_features >= 1); got shape {X.shape}")
    if X.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool) or np.issubdtype(X.dtype, np.complexfloating):
            raise TypeError(f"{name} must be a real numeric array (got dtype {X.dtype})")
        X = X.astype(np.float64)
    if not bool(X.map_blocks(lambda b: np.isfinite(b).all(keepdims=True), chunks=(1, 1), dtype=bool).all().compute()):
        raise ValueError(f"{name} contains NaN or Inf values; remove or impute them first")
    return X


def _prepare(X, y, order):
    Xv = _features(X)
    codes, classes = check_labels(y, Xv.shape[0])
    order = check_order(order, Xv.shape[0])
    return Xv, codes, classes, order


def separation_index_per_sample(X, y, *, order: int = 1, soft: bool = False, backend: str = "auto") -> np.ndarray:
    """Per-sample SI s_i (n,) float64: 0/1 (hard) or the fraction of r neighbours sharing y_i (soft)."""
    Xv, codes, _, order = _prepare(X, y, order)
    nbr = knn(Xv, order, backend=backend)
    return _per_sample_from_neighbors(codes, codes[nbr], order, soft)


def separation_index(X, y, *, order: int = 1, soft: bool = False, backend: str = "auto") -> float:
    """SI = mean_i s_i in [0, 1]. X (n, d) numeric, y (n,) or (n, 1) labels of any type.

    order=1: fraction of samples whose nearest other sample has the same label. order=r > 1:
    fraction whose r nearest others all share it (high-order SI); soft=True: mean fraction of the
    r nearest others that share it. Exact (see ``si_compress.separability`` for tie rules).
    """
    return float(separation_index_per_sample(X, y, order=order, soft=soft, backend=backend).mean())


def separation_index_per_class(X, y, *, order: int = 1, soft: bool = False, backend: str = "auto") -> ClassScores:
    """SI averaged over the samples of each class."""
    Xv, codes, classes, order = _prepare(X, y, order)
    nbr = knn(Xv, order, backend=backend)
    return class_means(_per_sample_from_neighbors(codes, codes[nbr], order, soft), codes, classes)


def separation_profile(X, y, *, order: int = 3, backend: str = "auto") -> SIProfile:
    """SI, high-order SI and soft SI of order ``order`` and per-class SI from one search."""
    Xv, codes, classes, order = _prepare(X, y, order)
    nbr = knn(Xv, order, backend=backend)
    nc = codes[nbr]
    first = _per_sample_from_neighbors(codes, nc, 1, False)
    return SIProfile(
        order=order,
        si=float(first.mean()),
        high_order_si=float(_per_sample_from_neighbors(codes, nc, order, False).mean()),
        soft_si=float(_per_sample_from_neighbors(codes, nc, order, True).mean()),
        per_sample=first,
        per_class=class_means(first, codes, classes),
        neighbors=nbr,
    )


def cross_separation_index_per_sample(X_ref, y_ref, X_query, y_query, *, order: int = 1, soft: bool = False,
                                      backend: str = "auto") -> np.ndarray:
    """Per-query score (n_query,): do the r nearest reference samples share the query's label?

    Nothing is excluded (query and reference are different sets); ties go to the lowest
    reference index. Labels are matched by value across the two sets.
    """
    R = _features(X_ref, name="X_ref", min_samples=1)
    Q = _features(X_query, name="X_query", min_samples=1)
    if R.shape[1] != Q.shape[1]:
        raise ValueError(
            f"X_ref has {R.shape[1]} features but X_query has {Q.shape[1]}; both must come from the same layer"
        )
    codes_r, classes_r = check_labels(y_ref, R.shape[0], name="y_ref", min_classes=1)
    codes_q, classes_q = check_labels(y_query, Q.shape[0], name="y_query", min_classes=1)
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order must be an integer >= 1; got {order!r}")
    if order > R.shape[0]:
        raise ValueError(f"order={order} exceeds the {R.shape[0]} reference samples; lower order")
    # map query labels into the reference's code space (-1: a class the reference never saw)
    pos = np.searchsorted(classes_r, classes_q)
    pos = np.clip(pos, 0, classes_r.size - 1)
    q_to_r = np.where(classes_r[pos] == classes_q, pos, -1)
    qcodes = q_to_r[codes_q]
    nbr = knn(R, int(order), query=Q, backend=backend)
    return _per_sample_from_neighbors(qcodes, codes_r[nbr], int(order), soft)


def cross_separation_index(X_ref, y_ref, X_query, y_query, *, order: int = 1, soft: bool = False,
                           backend: str = "auto") -> float:
    """Cross-SI: fraction of query samples whose nearest reference sample(s) share their label."""
    return float(cross_separation_index_per_sample(X_ref, y_ref, X_query, y_query, order=order, soft=soft,
                                                   backend=backend).mean())


def nearest_neighbors(X, k: int = 1, *, backend: str = "auto") -> np.ndarray:
    """Exact k nearest other samples (n, k) of each row, self excluded by index, ties to lowest index."""
    Xv = _features(X)
    return knn(Xv, check_order(k, Xv.shape[0], name="k"), backend=backend)
