"""si_compress: which parts of a trained CNN separate the classes, and a smaller model from that.

Importing the package is light: numpy only. torch, faiss, numba and matplotlib load when the
stage that needs them runs.
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

__all__ = [
    "separation_index", "separation_index_per_sample", "separation_index_per_class", "separation_profile",
    "cross_separation_index", "nearest_neighbors", "center_separation_index",
    "center_separation_index_per_sample", "center_separation_index_per_class", "forward_select",
    "SelectionResult", "ClassScores", "SIProfile", "__version__",
]
