"""Parameters and multiply-accumulates (MACs) of a network up to each recorded layer.

MACs count only convolutions (``nn.Conv1d/2d/3d``: out positions * out_c * in_c/groups * kernel
volume) and ``nn.Linear`` (in * out per output row); biases, BatchNorm, activations, pooling and
residual additions are not counted (they are O(activations), not O(weights x activations)).
Counts are per sample: they do not depend on the batch size of ``example_input``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .hooks import _as_name_list, _call_model, _check_model, _first_tensor, _lookup, _split

__all__ = ["LayerCost", "layer_costs", "module_macs", "model_cost", "count_ops"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerCost:
    """Cost of the network from its input up to and including ``name`` (execution order).

    params:       parameters of the modules that finished running before this layer's output
                  (before its input for ``"name:input"``), each shared parameter counted once.
    macs:         conv + linear MACs per sample of everything run up to that point.
    module_macs:  MACs per sample of this module alone (0 for ``"name:input"`` and for modules
                  without convs/linears); for a container, the sum over its children.
    total_params: parameters of the whole model; total_macs: MACs per sample of one full forward.
    """

    name: str
    params: int
    macs: int
    module_macs: int
    total_params: int
    total_macs: int

    @property
    def params_fraction(self) -> float:
        return self.params / self.total_params if self.total_params else 0.0

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.total_macs if self.total_macs else 0.0


def _module_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Per-sample MACs of one call of a conv or linear module, from its output shape."""
    if isinstance(module, _CONVS):
        positions = math.prod(int(s) for s in output.shape[2:])
        per_position = module.out_channels * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return positions * per_position
    if isinstance(module, nn.Linear):
        rows = output.numel() // (output.shape[0] * module.out_features) if output.ndim > 1 else 1
        return rows * module.in_features * module.out_features
    return 0


class _CostTrace:
    """One eval-mode forward: MACs and parameters attributed to event indices."""

    def __init__(self, model: nn.Module, example_input):
        named = [(n, m) for n, m in model.named_modules() if n]
        self.pre: dict[str, int] = {}
        self.post: dict[str, int] = {}
        self.mac_events: list[tuple[int, int]] = []      # (event index, macs) per conv/linear call
        self.param_events: list[tuple[int, int]] = []    # (event index, params first owned there)
        self.module_macs: dict[str, int] = {}
        seen_params: set[int] = set()
        counter = [0]
        handles = []

        def make(name, module):
            def pre(mod, args):
                counter[0] += 1
                self.pre.setdefault(name, counter[0])

            def post(mod, args, output):
                counter[0] += 1
                self.post.setdefault(name, counter[0])
                if isinstance(mod, _CONVS + (nn.Linear,)):
                    macs = _module_macs(mod, _first_tensor(output, what=name))
                    self.mac_events.append((counter[0], macs))
                    self.module_macs[name] = self.module_macs.get(name, 0) + macs
                own = 0
                for p in mod.parameters(recurse=False):
                    if id(p) not in seen_params:
                        seen_params.add(id(p))
                        own += p.numel()
                if own:
                    self.param_events.append((counter[0], own))
            return pre, post

        modes = [(m, m.training) for m in model.modules()]
        try:
            for name, m in named:
                pre, post = make(name, m)
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
            model.eval()
            with torch.inference_mode():
                _call_model(model, example_input)
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.training = mode
        # Parameters set directly on the root module count in total_params only.
        self.total_params = sum(p.numel() for p in model.parameters())
        self.total_macs = sum(m for _, m in self.mac_events)


def module_macs(model: nn.Module, example_input) -> dict[str, int]:
    """name -> per-sample MACs of each conv/linear module, in execution order (summed over calls)."""
    _check_model(model)
    return dict(_CostTrace(model, example_input).module_macs)


def model_cost(model: nn.Module, example_input) -> tuple[int, int]:
    """(total parameters, total conv+linear MACs per sample) of ``model``."""
    _check_model(model)
    t = _CostTrace(model, example_input)
    return t.total_params, t.total_macs


def layer_costs(model: nn.Module, example_input, layer_names: Sequence[str]) -> dict[str, LayerCost]:
    """name -> :class:`LayerCost`: cumulative params/MACs up to each layer after one forward of
    ``example_input`` (e.g. ``torch.zeros(1, 3, 32, 32)``) in eval mode (training flags restored)."""
    _check_model(model)
    names = _as_name_list(layer_names, "layer_names")
    _lookup(model, names)  # helpful ValueError for unknown names
    trace = _CostTrace(model, example_input)
    result = {}
    for name in names:
        base, is_input = _split(name)
        if is_input:
            if base == "":
                event, mine = 0, 0
            elif base in trace.pre:
                event, mine = trace.pre[base] - 1, 0
            else:
                event = None
        else:
            event = trace.post.get(base)
            if event is not None:
                prefix = base + "."
                mine = sum(v for k, v in trace.module_macs.items() if k == base or k.startswith(prefix))
        if event is None:
            raise ValueError(f"layer {name!r} did not run in the forward pass of example_input; "
                             "choose a module that forward() uses")
        result[name] = LayerCost(
            name=name,
            params=sum(p for e, p in trace.param_events if e <= event),
            macs=sum(m for e, m in trace.mac_events if e <= event),
            module_macs=mine,
            total_params=trace.total_params,
            total_macs=trace.total_macs,
        )
    return result


def count_ops(model: nn.Module, example_input) -> tuple[int, int]:
    """(MACs, params) per sample as torch-pruning's ``count_ops_and_params`` counts them (convs and linears
    plus BN, activations and pooling): the one count the planner's budget, plans, metrics and printed
    summaries use. ``example_input`` with batch 1 (a larger batch is cut to its first sample)."""
    import torch_pruning as tp

    _check_model(model)
    if isinstance(example_input, torch.Tensor) and example_input.shape[0] > 1:
        example_input = example_input[:1]
    modes = [(m, m.training) for m in model.modules()]
    try:
        macs, params = tp.utils.count_ops_and_params(model.eval(), example_input)
    finally:
        for m, mode in modes:
            m.training = mode
    return int(macs), int(params)
