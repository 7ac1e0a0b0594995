"""torch-pruning's own global magnitude pruner, turned into a CompressionPlan at a MACs budget.

The pruner runs on a copy of the model with the same prunable convs as our plans (each residual
block's conv1; in a plain chain, every conv that feeds another conv) and the rest ignored, since
torch-pruning mis-tracks the option-A shortcut's channel padding (see compress.prune). Its
choice of filters is read back by matching the pruned weights to the original filters, so the
baseline goes through exactly the same executor and compensation as the SI plan.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .plan import CompressionPlan, LayerDecision


def _kept_rows(orig: torch.Tensor, pruned: torch.Tensor) -> tuple[int, ...]:
    o = orig.reshape(orig.shape[0], -1)
    p = pruned.reshape(pruned.shape[0], -1)
    keep = []
    start = 0
    for row in p:
        # torch-pruning keeps the surviving filters in their original order
        for i in range(start, o.shape[0]):
            if torch.equal(o[i], row):
                keep.append(i)
                start = i + 1
                break
        else:
            raise RuntimeError("could not match a pruned filter to the original weights")
    return tuple(keep)


def tp_magnitude_plan(model: nn.Module, structure, *, example_input, target_macs: float, arch: str,
                      num_classes: int, steps: int = 200) -> CompressionPlan:
    """Global L1-magnitude pruning (``tp.pruner.MagnitudePruner``, ``global_pruning=True``) of the
    prunable convs, stepped until the model's MACs are <= ``target_macs`` x base."""
    import torch_pruning as tp

    work = copy.deepcopy(model).eval()
    names = {u.conv for u in structure.convs}
    modules = dict(work.named_modules())
    prunable = [modules[n] for n in names]
    ignored = [m for m in work.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in prunable]
    base_macs, _ = tp.utils.count_ops_and_params(work, example_input)
    pruner = tp.pruner.MagnitudePruner(
        work, example_input, importance=tp.importance.MagnitudeImportance(p=1), global_pruning=True,
        pruning_ratio=0.95, iterative_steps=steps, ignored_layers=ignored,
    )
    macs = base_macs
    for _ in range(steps):
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(work, example_input)
        if macs <= target_macs * base_macs:
            break
    orig_mods = dict(model.named_modules())
    layers = []
    for u in structure.convs:
        keep = _kept_rows(orig_mods[u.conv].weight.detach(), modules[u.conv].weight.detach())
        layers.append(LayerDecision(name=u.conv, out_channels=u.out_channels, keep=keep, method="tp-magnitude",
                                    reason="torch-pruning global magnitude (L1) pruner"))
    return CompressionPlan(arch=arch, num_classes=num_classes, layers=tuple(layers),
                           predicted=dict(base_macs=int(base_macs), macs=int(macs)),
                           settings=dict(method="tp-magnitude", target_macs=target_macs))
