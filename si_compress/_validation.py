"""One validation gate for user input: clear ValueError/TypeError messages, never asserts.

Everything here is pure numpy so the separability core can use it without torch.
"""
from __future__ import annotations

import numbers

import numpy as np


def check_features(X, *, name: str = "X", min_samples: int = 2, check_finite: bool = True) -> np.ndarray:
    """Return ``X`` as a C-contiguous float32 (if given float32) or float64 array (n_samples, n_features).

    Raises TypeError for non-numeric input and ValueError for wrong ndim, too few samples,
    zero features or non-finite values. The caller's array is never modified.
    ``check_finite=False`` skips the NaN/Inf scan for a caller that detects non-finite values in
    its own first pass over X (a non-finite squared row norm) and then calls ``check_finite``.
    """
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be a 2-D numeric array; could not convert it: {exc}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(
            f"{name} must be a numeric array (got dtype {arr.dtype}); convert it with np.asarray(..., dtype=float)"
        )
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real-valued (got dtype {arr.dtype})")
    if arr.ndim != 2:
        hint = " (reshape a single feature with X.reshape(-1, 1))" if arr.ndim == 1 else \
            " (flatten feature maps with X.reshape(len(X), -1))" if arr.ndim > 2 else ""
        raise ValueError(f"{name} must be 2-D (n_samples, n_features); got an array with shape {arr.shape}{hint}")
    n, d = arr.shape
    if n < min_samples:
        raise ValueError(f"{name} has {n} sample(s); at least {min_samples} are needed")
    if d == 0:
        raise ValueError(f"{name} has 0 features; at least one feature column is needed")
    # float32 stays float32 (exactly convertible to float64 where exactness needs it): no copy
    # of a large feature matrix; everything else becomes float64.
    dtype = np.float32 if arr.dtype == np.float32 else np.float64
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if check_finite:
        raise_if_not_finite(arr, name)
        raise_if_too_large(arr, name)
    return arr


MAX_ABS = 1e150   # squared distances of larger values overflow float64


def raise_if_too_large(arr: np.ndarray, name: str = "X") -> None:
    """ValueError if float64 values are so large that squared distances overflow (float32 cannot)."""
    if arr.dtype == np.float64 and arr.size and max(-arr.min(), arr.max()) > MAX_ABS:
        raise ValueError(
            f"{name} has values larger than {MAX_ABS:g} in magnitude: their squared distances overflow "
            "float64; rescale the features (e.g. divide by their largest absolute value)"
        )


def raise_if_not_finite(arr: np.ndarray, name: str = "X") -> None:
    """ValueError naming the first NaN/Inf of a 2-D array (scanned in chunks: no full-size mask)."""
    n, d = arr.shape
    step = max(1, (16 * 2**20) // max(1, d))
    for start in range(0, n, step):
        chunk = arr[start:start + step]
        finite = np.isfinite(chunk)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise ValueError(
                f"{name} contains NaN or infinite values (first at row {start + bad[0]}, column {bad[1]}); "
                "remove or impute them before computing separation indices"
            )


def check_labels(y, n_samples: int, *, name: str = "y", min_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Encode labels of shape (n,) or (n, 1) to int64 codes 0..C-1 in sorted-class order.

    Returns (codes, classes). Raises ValueError on a length mismatch, wrong shape, missing values
    or fewer than ``min_classes`` classes. The caller's array is never modified.
    """
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (n_samples,) or (n_samples, 1); got shape {arr.shape}")
    if arr.shape[0] != n_samples:
        raise ValueError(
            f"Found input variables with inconsistent numbers of samples: [{n_samples}, {arr.shape[0]}]; "
            f"features and {name} must describe the same samples"
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite labels; every sample needs a class label")
    if arr.dtype == object and any(v is None for v in arr):
        raise ValueError(f"{name} contains None labels; every sample needs a class label")
    if arr.dtype.kind in "iu" and arr.size and 0 <= arr.min() and arr.max() <= 4 * arr.shape[0] + 1024:
        # small non-negative integer labels (the usual case): a counting table instead of a sort
        small = arr.astype(np.intp, copy=False)
        present = np.bincount(small) > 0
        classes = np.flatnonzero(present).astype(arr.dtype)
        if present.all():
            # labels 0..C-1, all present, are their own codes: a read-only view, no copy
            codes = small.view()
            codes.flags.writeable = False
        else:
            codes = (np.cumsum(present) - 1)[small]
    else:
        try:
            classes, codes = np.unique(arr, return_inverse=True)
        except TypeError as exc:
            raise TypeError(f"{name} labels must be mutually comparable (all numbers or all strings): {exc}") from None
    if classes.shape[0] < min_classes:
        raise ValueError(
            f"{name} has {classes.shape[0]} class(es) ({classes[:5].tolist()}); separation indices need "
            f"at least {min_classes} classes"
        )
    return codes.astype(np.int64, copy=False).reshape(-1), classes


def check_order(order, n_samples: int, *, name: str = "order") -> int:
    """An int r with 1 <= r < n_samples (a sample has n_samples - 1 possible neighbours)."""
    if isinstance(order, bool) or not isinstance(order, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 1; got {order!r}")
    order = int(order)
    if order < 1:
        raise ValueError(f"{name} must be >= 1; got {order}")
    if order >= n_samples:
        raise ValueError(
            f"{name}={order} needs at least {order + 1} samples (each sample has n_samples - 1 = "
            f"{n_samples - 1} neighbours); lower {name} or pass more samples"
        )
    return order


def check_positive_int(value, name: str, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)
