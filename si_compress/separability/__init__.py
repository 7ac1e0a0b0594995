"""Torch-free Separation-Index core (numpy; numba and faiss are imported lazily).

Semantics shared by every function and backend:
- distance: Euclidean, evaluated in float64 (float32 input is converted exactly; the sums of
  squared differences run in vector lanes, in an order fixed by the compiled code, so equal
  inputs give equal sums and integer-valued data is exact);
- a sample is never its own neighbour; it is excluded by index, so duplicate rows (e.g.
  all-zero post-ReLU vectors) are each other's neighbours at distance 0;
- ties go to the lowest sample index (lowest class, for centres), deterministically;
- labels may be any comparable values (ints, strings), shape (n,) or (n, 1); never mutated.
Backends: "numba" (BLAS screen + Numba kernels, exact re-ranking), "faiss" (faiss.knn screen,
same exact re-ranking), "numpy" (brute force, the oracle), "auto" (fastest available, or the
SI_COMPRESS_BACKEND environment variable). No backend builds an n x n matrix. The centre SI
screens in the input's precision and decides every row the rounding bound cannot settle in
float64; forward selection keeps one n x n matrix per group (see ``forward_select``).
"""
from ._knn import BACKENDS, available_backends, resolve_backend
from .csi import (
    center_separation_index,
    center_separation_index_per_class,
    center_separation_index_per_sample,
    class_centers,
    nearest_center,
)
from .selection import SelectionResult, forward_select
from .si import (
    ClassScores,
    SIProfile,
    cross_separation_index,
    cross_separation_index_per_sample,
    nearest_neighbors,
    separation_index,
    separation_index_per_class,
    separation_index_per_sample,
    separation_profile,
)

__all__ = [
    "BACKENDS", "available_backends", "resolve_backend",
    "separation_index", "separation_index_per_sample", "separation_index_per_class", "separation_profile",
    "cross_separation_index", "cross_separation_index_per_sample", "nearest_neighbors",
    "center_separation_index", "center_separation_index_per_sample", "center_separation_index_per_class",
    "class_centers", "nearest_center", "forward_select", "SelectionResult", "ClassScores", "SIProfile",
]
