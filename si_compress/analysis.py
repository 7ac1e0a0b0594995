"""Per-layer separability analysis of a trained model: features -> SI family -> AnalysisReport.

``analyze`` runs the model over a labelled loader, records the chosen layers (in as many passes
as the memory budget needs), and scores each layer with the torch-free separability core:
SI, high-order SI and soft SI of ``order``, CSI, per-class SI, optional cross-SI against a
reference (e.g. train) sample, plus the parameters and MACs of the network up to that layer.
The report is a frozen dataclass with a versioned JSON form that the planner reads.
"""
from __future__ import annotations

import contextlib
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from .separability import (
    center_separation_index_per_sample,
    cross_separation_index,
    separation_profile,
)

SCHEMA = "si_compress.analysis"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerRecord:
    """Scores of one recorded layer; params/macs are cumulative up to and including the layer."""

    name: str
    index: int
    dim: int
    shape: tuple[int, ...]
    reduction: str
    si: float
    csi: float
    high_order_si: float
    soft_si: float
    per_class_si: tuple[float, ...]
    per_class_csi: tuple[float, ...]
    params: int
    macs: int
    cross_si: float | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class AnalysisReport:
    """Everything ``si-analyze`` measured; ``to_dict``/``from_dict`` give the versioned JSON."""

    model: dict
    data: dict
    settings: dict
    layers: tuple[LayerRecord, ...]
    class_names: tuple[str, ...]
    n_samples: int
    samples_per_class: tuple[int, ...]
    accuracy: float | None
    total_params: int
    total_macs: int
    peak_rss_mb: float
    feature_mb: float
    seconds: float
    versions: dict = field(default_factory=dict)

    def layer(self, name: str) -> LayerRecord:
        for rec in self.layers:
            if rec.name == name:
                return rec
        raise KeyError(f"no layer {name!r} in the report; layers: {[r.name for r in self.layers]}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(r) for r in self.layers]
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "AnalysisReport":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not an si_compress analysis report (schema {d.get('schema')!r}); "
                             "produce one with si-analyze")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"analysis report schema version {d.get('schema_version')} is not supported "
                             f"(this si_compress reads version {SCHEMA_VERSION}); re-run si-analyze")
        body = {k: v for k, v in d.items() if k not in ("schema", "schema_version")}
        layers = tuple(
            LayerRecord(**{**r, "shape": tuple(r["shape"]), "per_class_si": tuple(r["per_class_si"]),
                           "per_class_csi": tuple(r["per_class_csi"])})
            for r in body.pop("layers")
        )
        return cls(layers=layers, **{**body, "class_names": tuple(body["class_names"]),
                                     "samples_per_class": tuple(body["samples_per_class"])})


def check_samples_per_class(labels: np.ndarray, order: int, class_names: Sequence[str] | None = None) -> None:
    """Each class needs order + 1 samples: otherwise its high-order SI is 0 by construction."""
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size < 2:
        raise ValueError(f"the sample holds only {classes.size} class; separation indices need at least 2")
    worst = int(np.argmin(counts))
    if counts[worst] < order + 1:
        c = classes[worst]
        cname = class_names[c] if class_names is not None and 0 <= c < len(class_names) else c
        raise ValueError(
            f"class {cname!r} has only {counts[worst]} sample(s); high-order SI of order {order} needs at least "
            f"{order + 1} per class: pass more --samples or a lower --order"
        )


def score_layer(X: np.ndarray, labels: np.ndarray, *, order: int, backend: str, n_classes: int,
                reference: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """SI family of one layer's features X (n, d); returns plain numbers for a LayerRecord."""
    prof = separation_profile(X, labels, order=order, backend=backend)
    csi = center_separation_index_per_sample(X, labels, backend=backend)
    counts = np.bincount(labels, minlength=n_classes)
    per_class_csi = np.bincount(labels, weights=csi, minlength=n_classes) / np.maximum(counts, 1)
    per_class_si = np.bincount(labels, weights=prof.per_sample, minlength=n_classes) / np.maximum(counts, 1)
    out = dict(si=prof.si, csi=float(csi.mean()), high_order_si=prof.high_order_si, soft_si=prof.soft_si,
               per_class_si=tuple(float(v) for v in per_class_si),
               per_class_csi=tuple(float(v) for v in per_class_csi))
    if reference is not None:
        out["cross_si"] = cross_separation_index(reference[0], reference[1], X, labels, backend=backend)
    return out


def _layer_dims(model, layers, example_input, max_dim):
    import torch

    from .features import FeatureRecorder, pooled_grid

    with FeatureRecorder(model, layers) as rec, torch.inference_mode():
        was = model.training
        model.eval()
        try:
            model(example_input)
        finally:
            model.train(was)
        maps = rec.take()
    dims = {}
    for name in layers:
        shape = tuple(maps[name].shape[1:])
        k = pooled_grid(shape, max_dim) if len(shape) == 3 else None
        dims[name] = int(np.prod(shape)) if k is None else shape[0] * k * k
    return dims


def plan_passes(dims: dict[str, int], n_samples: int, budget_bytes: int, itemsize: int = 4) -> list[list[str]]:
    """Split layers (in order) into passes whose feature arrays fit ``budget_bytes`` together."""
    passes: list[list[str]] = [[]]
    used = 0
    for name, d in dims.items():
        need = n_samples * d * itemsize
        if passes[-1] and used + need > budget_bytes:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += need
    return passes


def analyze(model, loader, *, layers: Sequence[str] | None = None, order: int = 3, max_dim: int = 4096,
            backend: str = "auto", memory_budget_bytes: int = 4 * 2**30, reference_loader=None,
            class_names: Sequence[str] | None = None, example_input=None,
            progress: Callable[[str, int, int], None] | None = None, model_info: dict | None = None,
            data_info: dict | None = None, device=None) -> AnalysisReport:
    """Analyse ``model`` on ``loader`` (batches of (inputs, integer labels)).

    layers: names/globs (see ``features.resolve_layers``); default stem, blocks, pooled features.
    Features of a map larger than ``max_dim`` are average-pooled (recorded per layer). Layers are
    recorded in passes over the data so that n * sum(d) * 4 bytes stays under
    ``memory_budget_bytes`` per pass. progress(stage, done, total) reports progress. ``device``: where
    the model runs over the data (``"cpu"``, ``"cuda"``, ``"auto"``; None: the model's own device; the
    layer list and costs are traced where the model is, with ``example_input``); recorded in
    ``settings["device"]``. The thread counts of torch and Numba are what they were when it returns
    (also when it raises): the SI search changes Numba's, which OpenMP shares with torch.
    """
    with _threads_restored():
        return _analyze(model, loader, layers=layers, order=order, max_dim=max_dim, backend=backend,
                        memory_budget_bytes=memory_budget_bytes, reference_loader=reference_loader,
                        class_names=class_names, example_input=example_input, progress=progress,
                        model_info=model_info, data_info=data_info, device=device)


@contextlib.contextmanager
def _threads_restored():
    """torch's intra-op and Numba's thread counts (when loaded) put back on exit, Numba's first: setting
    it sets the OpenMP count torch reads."""
    import sys

    torch = sys.modules.get("torch")
    numba = sys.modules.get("numba")
    before_torch = torch.get_num_threads() if torch is not None else None
    before_numba = numba.get_num_threads() if numba is not None else None
    try:
        yield
    finally:
        numba = sys.modules.get("numba")
        if before_numba is not None and numba.get_num_threads() != before_numba:
            numba.set_num_threads(before_numba)
        if before_torch is not None and torch.get_num_threads() != before_torch:
            torch.set_num_threads(before_torch)


def _analyze(model, loader, *, layers, order, max_dim, backend, memory_budget_bytes, reference_loader, class_names,
             example_input, progress, model_info, data_info, device) -> AnalysisReport:
    from . import _device
    from .features import collect_features, layer_costs, resolve_layers

    t0 = time.perf_counter()
    dev = _device.target(device, model)
    if example_input is None:
        x0 = next(iter(loader))[0]
        example_input = x0[:1]
    example_input = example_input.to(_device.model_device(model))   # traced where the model is
    names = resolve_layers(model, layers, example_input=example_input)
    costs = layer_costs(model, example_input, names)
    dims = _layer_dims(model, names, example_input, max_dim)
    n_total = len(loader.sampler) if hasattr(loader, "sampler") else len(loader.dataset)
    passes = plan_passes(dims, n_total, memory_budget_bytes)

    records: list[LayerRecord] = []
    labels = predictions = None
    feature_bytes = 0
    for p, pass_layers in enumerate(passes):
        stage = f"features {p + 1}/{len(passes)}" if len(passes) > 1 else "features"
        fs = collect_features(model, loader, pass_layers, max_dim=max_dim, device=dev,
                              progress=None if progress is None else (lambda d, t, s=stage: progress(s, d, t)))
        if labels is None:
            labels, predictions = fs.labels, fs.predictions
            n_classes = int(max(labels.max() + 1, len(class_names) if class_names else 0))
            check_samples_per_class(labels, order, class_names)
        feature_bytes = max(feature_bytes, fs.nbytes)
        ref_fs = None
        if reference_loader is not None:
            ref_fs = collect_features(model, reference_loader, pass_layers, max_dim=max_dim, device=dev,
                                      progress=None if progress is None else
                                      (lambda d, t, s=stage: progress(s + " (reference)", d, t)))
            feature_bytes = max(feature_bytes, fs.nbytes + ref_fs.nbytes)
        for name in pass_layers:
            t1 = time.perf_counter()
            X = fs.features[name]
            ref = None if ref_fs is None else (ref_fs.features[name], ref_fs.labels)
            scores = score_layer(X, labels, order=order, backend=backend, n_classes=n_classes, reference=ref)
            c = costs[name]
            records.append(LayerRecord(name=name, index=len(records), dim=int(X.shape[1]), shape=fs.shapes[name],
                                       reduction=fs.reductions[name], params=c.params, macs=c.macs,
                                       seconds=time.perf_counter() - t1, **scores))
            if progress is not None:
                progress("separation", len(records), len(names))
        del fs, ref_fs
    first = next(iter(costs.values()))
    acc = None if predictions is None else float(np.mean(predictions == labels))
    counts = np.bincount(labels, minlength=n_classes)
    return AnalysisReport(
        model=dict(model_info or {}), data=dict(data_info or {}),
        settings=dict(order=order, max_dim=max_dim, backend=backend, layers=list(names),
                      memory_budget_mb=memory_budget_bytes / 2**20, passes=len(passes),
                      reference=reference_loader is not None, device=str(dev)),
        layers=tuple(records),
        class_names=tuple(class_names) if class_names else tuple(str(i) for i in range(n_classes)),
        n_samples=int(labels.size), samples_per_class=tuple(int(c) for c in counts), accuracy=acc,
        total_params=first.total_params, total_macs=first.total_macs,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        feature_mb=feature_bytes / 2**20, seconds=time.perf_counter() - t0,
        versions=versions(),
    )


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("si_compress", "numpy", "torch", "torchvision", "faiss-cpu", "numba", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def layers_csv(report: AnalysisReport) -> str:
    """One row per layer: the table of ``si-analyze`` as CSV (per-class SI in columns)."""
    head = ["index", "layer", "dim", "reduction", "si", "csi", f"si_order{report.settings.get('order')}",
            "soft_si", "cross_si", "params", "macs"] + [f"si[{c}]" for c in report.class_names]
    rows = [",".join(head)]
    for r in report.layers:
        vals = [r.index, r.name, r.dim, r.reduction, f"{r.si:.6f}", f"{r.csi:.6f}", f"{r.high_order_si:.6f}",
                f"{r.soft_si:.6f}", "" if r.cross_si is None else f"{r.cross_si:.6f}", r.params, r.macs]
        vals += [f"{v:.6f}" for v in r.per_class_si]
        rows.append(",".join(str(v) for v in vals))
    return "\n".join(rows) + "\n"


def format_table(report: AnalysisReport) -> str:
    """Human-readable per-layer table (what si-analyze prints)."""
    order = report.settings.get("order")
    has_cross = any(r.cross_si is not None for r in report.layers)
    cols = ["#", "layer", "dim", "SI", "CSI", f"SI{order}", "softSI"] + (["xSI"] if has_cross else []) + \
        ["params", "MACs", "pool"]
    rows = []
    for r in report.layers:
        rows.append([str(r.index), r.name, str(r.dim), f"{r.si:.3f}", f"{r.csi:.3f}", f"{r.high_order_si:.3f}",
                     f"{r.soft_si:.3f}"] + ([f"{r.cross_si:.3f}"] if has_cross else []) +
                    [_human(r.params), _human(r.macs), r.reduction])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    right = {0, 2, 3, 4, 5, 6, 7, 8, 9} - ({9} if not has_cross else set())
    fmt = lambda row: "  ".join(v.rjust(w) if i in right or (i >= 3 and i < len(cols) - 1) else v.ljust(w)
                                for i, (v, w) in enumerate(zip(row, widths)))
    lines = [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    return "\n".join(lines)


def _human(v: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return str(v)
