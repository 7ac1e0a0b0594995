"""si_compress: which parts of a trained CNN separate the classes, and a smaller model from that.

Importing the package is light: numpy only. torch, faiss, numba and matplotlib load when the
stage that needs them runs: the model-level API below is imported on first use.

- ``analyze(model, loader, ...)``: per-layer SI report (``si_compress.analysis.analyze``);
- ``compress_model(model, sample_loader, test_loader, example_input=x, ...)``: plan by SI, prune,
  compensate (``si_compress.pipeline.compress``; ``CompressConfig`` sets the budget);
- ``load_compressed(path)``: (model, plan) from a ``model.pt`` written by si-compress;
- ``CompressionPlan.load(path)`` / ``plan.save(path)``: plan I/O; ``load_model(path)``: a checkpoint.
"""
from .separability import (
    ClassScores,
    SelectionResult,
    SIProfile,
    center_separation_index,
    center_separation_index_per_class,
    center_separation_index_per_sample,
    cross_separation_index,
    forward_select,
    nearest_neighbors,
    separation_index,
    separation_index_per_class,
    separation_index_per_sample,
    separation_profile,
)

__version__ = "0.1.0"

# name -> (module, attribute): imported on first access (PEP 562), so `import si_compress` stays light.
# (``compress`` is the subpackage si_compress.compress, hence ``compress_model`` for the function.)
_LAZY = {
    "analyze": (".analysis", "analyze"),
    "compress_model": (".pipeline", "compress"),
    "CompressConfig": (".pipeline", "CompressConfig"),
    "load_compressed": (".compress.export", "load_compressed"),
    "save_compressed": (".compress.export", "save_compressed"),
    "CompressionPlan": (".plan", "CompressionPlan"),
    "load_model": (".models", "load_model"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'si_compress' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "separation_index", "separation_index_per_sample", "separation_index_per_class", "separation_profile",
    "cross_separation_index", "nearest_neighbors", "center_separation_index",
    "center_separation_index_per_sample", "center_separation_index_per_class", "forward_select",
    "SelectionResult", "ClassScores", "SIProfile", "__version__",
]
