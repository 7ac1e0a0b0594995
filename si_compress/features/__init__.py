"""Feature extraction: record layer activations by name, stream them into bounded arrays, and
measure what each layer costs (parameters, MACs) up to that point.

Data flow: ``resolve_layers`` -> ``collect_features`` -> :class:`FeatureSet` (numpy arrays for the
torch-free separability core); ``layer_costs`` gives the matching per-layer cost.
"""
from .collect import FeatureSet, collect_features, pooled_grid
from .cost import LayerCost, layer_costs, model_cost, module_macs
from .hooks import INPUT_SUFFIX, FeatureRecorder, resolve_layers

__all__ = [
    "INPUT_SUFFIX",
    "FeatureRecorder",
    "FeatureSet",
    "LayerCost",
    "collect_features",
    "layer_costs",
    "model_cost",
    "module_macs",
    "pooled_grid",
    "resolve_layers",
]
