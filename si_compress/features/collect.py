"""Stream a data loader through a model and keep flattened (optionally pooled) layer features.

Memory is bounded and known up front: each layer gets one preallocated array of shape
(n_samples, d_l), so the features take exactly ``sum_l n_samples * d_l * itemsize`` bytes and
nothing grows by concatenation.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _device
from .._validation import check_positive_int
from .hooks import FeatureRecorder, _as_name_list, _call_model, _check_model, _first_tensor

__all__ = ["FeatureSet", "collect_features", "pooled_grid"]


@dataclass(frozen=True)
class FeatureSet:
    """Per-layer features of ``n`` samples.

    layers:      layer names in recording (execution) order.
    features:    name -> array (n, d_l) (float32 unless another dtype was asked for).
    labels:      (n,) int64 class labels in loader order.
    predictions: (n,) int64 argmax of the model output, or None if the output is not (batch, classes).
    shapes:      name -> original per-sample shape of the activation, e.g. (C, H, W) or (D,).
    reductions:  name -> "none" or "avgpool kxk" (adaptive average pooling to a k x k grid).
    grids:       name -> (k, k) pooled grid, or None when the map was kept as is.
    """

    layers: tuple[str, ...]
    features: dict[str, np.ndarray]
    labels: np.ndarray
    predictions: np.ndarray | None
    shapes: dict[str, tuple[int, ...]]
    reductions: dict[str, str]
    grids: dict[str, tuple[int, int] | None]

    def __post_init__(self):
        n = self.labels.shape[0] if self.labels.ndim == 1 else -1
        if self.labels.ndim != 1:
            raise ValueError(f"labels must have shape (n_samples,); got {self.labels.shape}")
        if set(self.features) != set(self.layers):
            raise ValueError(f"features keys {sorted(self.features)} do not match layers {list(self.layers)}")
        for name in self.layers:
            arr = self.features[name]
            if arr.ndim != 2 or arr.shape[0] != n:
                raise ValueError(f"features[{name!r}] has shape {arr.shape}; expected ({n}, d)")
            for field in ("shapes", "reductions", "grids"):
                if name not in getattr(self, field):
                    raise ValueError(f"{field} has no entry for layer {name!r}")
        if self.predictions is not None and self.predictions.shape != (n,):
            raise ValueError(f"predictions has shape {self.predictions.shape}; expected ({n},)")

    @property
    def n_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dims(self) -> dict[str, int]:
        """name -> feature dimension d_l."""
        return {name: int(self.features[name].shape[1]) for name in self.layers}

    @property
    def nbytes(self) -> int:
        """Bytes held by the feature arrays (labels and predictions not included)."""
        return int(sum(self.features[name].nbytes for name in self.layers))

    @property
    def accuracy(self) -> float | None:
        """Top-1 accuracy of the model's predictions in [0, 1], or None without predictions."""
        if self.predictions is None or self.n_samples == 0:
            return None
        return float(np.mean(self.predictions == self.labels))


def pooled_grid(shape: Sequence[int], max_dim: int) -> int | None:
    """Grid size k for a (C, H, W) map, or None if C*H*W <= max_dim (kept as is).

    k is the largest integer with k <= min(H, W) and C*k*k <= max_dim; if even C > max_dim, k = 1
    and the layer keeps C features (more than max_dim: channels are never merged).
    """
    c, h, w = (int(s) for s in shape)
    if c * h * w <= max_dim:
        return None
    k = math.isqrt(max_dim // c) if c <= max_dim else 1
    return max(1, min(k, h, w))


def _n_samples(loader) -> int:
    if isinstance(loader, torch.utils.data.DataLoader):
        if loader.batch_size is None:  # custom batch_sampler
            inner = getattr(loader.batch_sampler, "sampler", None)
            if inner is not None and hasattr(inner, "__len__") and not getattr(loader.batch_sampler, "drop_last", False):
                return len(inner)
            raise ValueError("cannot tell how many samples a DataLoader with a custom batch_sampler yields; "
                             "pass n_samples=")
        try:
            n = len(loader.sampler)
        except TypeError:
            raise ValueError("the loader's sampler has no length (IterableDataset?); pass n_samples=") from None
        if loader.drop_last:
            n = (n // loader.batch_size) * loader.batch_size
        return n
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    raise ValueError(f"cannot tell how many samples a {type(loader).__name__} yields (no .dataset with a "
                     "length); pass n_samples=")


def _split_batch(batch, index: int):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"batch {index} is a {type(batch).__name__}; collect_features needs batches of "
                         "(inputs, labels, ...) as yielded by a DataLoader over a labelled dataset")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"batch {index}: inputs must be a tensor; got {type(x).__name__}")
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"batch {index}: labels have shape {tuple(y.shape)}; expected ({x.shape[0]},) "
                         "integer class indices, one per input")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"batch {index}: labels have dtype {y.dtype}; expected integer class indices")
    return x, y


def collect_features(model: nn.Module, loader, layer_names: Sequence[str], *, max_dim: int = 4096,
                     device: str | torch.device | None = None, progress: Callable[[int, int], None] | None = None,
                     dtype=np.float32, n_samples: int | None = None) -> FeatureSet:
    """Run ``loader`` through ``model`` and return the flattened features of ``layer_names``.

    The model runs in eval mode under ``torch.inference_mode`` (each module's training flag is
    restored afterwards) on ``device`` (``"cpu"``, ``"cuda"``, ``"auto"``; None: the model's own device):
    the model is moved there for the run and back to where it was afterwards, inputs are moved per
    batch and features come back to host memory. A (C, H, W) map with C*H*W > ``max_dim`` is reduced inside the hook by
    ``F.adaptive_avg_pool2d`` to the k x k grid of :func:`pooled_grid`, so features are
    (C*k*k,) in channel-major order; maps with other ranks are flattened without reduction.

    ``loader`` yields ``(inputs, labels, ...)``; ``n_samples`` defaults to the length of the
    DataLoader's sampler (or ``len(loader.dataset)``). ``progress(done, total)`` is called after each
    batch with sample counts. Raises ValueError naming the layer and batch when an activation
    contains NaN/Inf, and when the loader yields a different number of samples than expected.
    """
    _check_model(model)
    names = _as_name_list(layer_names, "layer_names")
    max_dim = check_positive_int(max_dim, "max_dim")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating-point dtype (np.float32, np.float16, np.float64); got {dtype}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable(done, total); got {type(progress).__name__}")
    n = _n_samples(loader) if n_samples is None else check_positive_int(n_samples, "n_samples")
    if n == 0:
        raise ValueError("the loader has no samples; features of an empty dataset cannot be collected")
    device = _device.target(device, model)

    shapes: dict[str, tuple[int, ...]] = {}
    grids: dict[str, int | None] = {}
    nonfinite: dict[str, int] = {}

    def reduce(name: str, t: torch.Tensor) -> torch.Tensor:
        # Runs inside the hook: check the raw activation, then pool at once so no big map is kept.
        bad = int(t.numel() - torch.isfinite(t).sum().item()) if t.is_floating_point() else 0
        if bad and name not in nonfinite:
            nonfinite[name] = bad
        shape = tuple(int(s) for s in t.shape[1:])
        if name not in shapes:
            shapes[name] = shape
            grids[name] = pooled_grid(shape, max_dim) if len(shape) == 3 else None
        elif shapes[name] != shape:
            raise ValueError(f"layer {name!r} produced per-sample shape {shape} after {shapes[name]} in an "
                             "earlier batch; collect_features needs a fixed input size")
        k = grids[name]
        if k is not None:
            t = F.adaptive_avg_pool2d(t, k)
        return t.reshape(t.shape[0], -1)

    features: dict[str, np.ndarray] = {}
    labels = np.empty(n, dtype=np.int64)
    predictions: np.ndarray | None = np.empty(n, dtype=np.int64)
    done = 0
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with _device.on_device(device, model), FeatureRecorder(model, names, transform=reduce) as rec, torch.inference_mode():
            for index, batch in enumerate(loader):
                x, y = _split_batch(batch, index)
                b = int(x.shape[0])
                if done + b > n:
                    raise ValueError(f"the loader yielded more than the {n} samples expected (batch {index}); "
                                     "pass the right n_samples=")
                out = _first_tensor(_call_model(model, _device.to_device(x, device)), what="the model")
                maps = rec.take()
                if nonfinite:
                    name = next(n_ for n_ in names if n_ in nonfinite)
                    raise ValueError(
                        f"layer {name!r} has {nonfinite[name]} NaN/Inf value(s) in batch {index} (samples "
                        f"{done}..{done + b - 1}); check the model weights and the input data/normalisation"
                    )
                if not features:  # first batch: shapes known, allocate everything once
                    for name in names:
                        features[name] = np.empty((n, int(maps[name].shape[1])), dtype=dtype)
                for name in names:
                    features[name][done:done + b] = maps[name].to("cpu").numpy()
                labels[done:done + b] = y.to("cpu").numpy()
                if predictions is not None:
                    if out.ndim == 2 and out.shape[0] == b and out.shape[1] >= 2:
                        predictions[done:done + b] = out.argmax(dim=1).to("cpu").numpy()
                    else:
                        predictions = None
                done += b
                if progress is not None:
                    progress(done, n)
    finally:
        for m, mode in modes:
            m.training = mode

    if done != n:
        raise ValueError(f"the loader yielded {done} samples but {n} were expected; pass n_samples={done} "
                         "or check the loader's sampler/drop_last")
    reductions = {name: "none" if grids[name] is None else f"avgpool {grids[name]}x{grids[name]}" for name in names}
    return FeatureSet(
        layers=tuple(names),
        features=features,
        labels=labels,
        predictions=predictions,
        shapes={name: shapes[name] for name in names},
        reductions=reductions,
        grids={name: None if grids[name] is None else (grids[name], grids[name]) for name in names},
    )
