"""torch-pruning's own global pruners, turned into CompressionPlans at a MACs budget.

The pruner runs on a copy of the model with the same channel groups as our plans (inner convs and
residual streams, with option-A shortcuts seen as fixed 1x1 convs exactly as our executor sees
them) and the rest ignored. Its choice of filters is read back by matching the pruned weights to
the original filters, so every baseline goes through exactly the same executor and compensation as
the SI plan.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .plan import CompressionPlan, LayerDecision


IMPORTANCES = ("magnitude", "group-norm", "taylor")


def tp_magnitude_plan(model: nn.Module, structure, *, example_input, target_macs: float, arch: str,
                      num_classes: int, steps: int = 200, importance: str = "magnitude", loader=None,
                      batches: int = 2, global_pruning: bool = True) -> CompressionPlan:
    """torch-pruning's pruner (``tp.pruner.MetaPruner``) on the groups of ``structure`` (inner convs and
    residual streams), stepped until the model's MACs are <= ``target_macs`` x base.
    ``global_pruning``: True ranks every group's channels against each other (one threshold, a group
    may lose up to 95%); False is torch-pruning's default, every group loses the same fraction.
    ``importance``: ``magnitude`` (L1 of the root's filters, ``MagnitudeImportance(p=1)``),
    ``group-norm`` (L2 over every member of the group, ``GroupMagnitudeImportance(p=2)``, DepGraph's
    criterion) or ``taylor`` (first-order Taylor over the group, ``GroupTaylorImportance``; gradients of
    the cross-entropy on ``batches`` batches of ``loader``, recomputed before every step)."""
    import torch_pruning as tp

    from .structure import channel_embeddings, insert_embedding_convs

    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}; got {importance!r}")
    if importance == "taylor" and loader is None:
        raise ValueError("taylor importance needs a loader of labelled batches")
    work = copy.deepcopy(model).eval()
    if any(u.coupled for u in structure.convs):
        # the same channel indexing through option-A shortcuts as our executor (structure.channel_embeddings)
        insert_embedding_convs(work, channel_embeddings(work, example_input))
        for q in work.parameters():   # Taylor importance reads every member's gradient
            q.requires_grad_(True)
    names = {n for u in structure.convs for n in (u.conv, *u.coupled)}
    modules = dict(work.named_modules())
    prunable = [modules[n] for n in names]
    ignored = [m for m in work.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in prunable
               and not getattr(m, "_si_channel_embedding", False)]
    # A twin whose every filter holds its own index: replaying the pruner's history on it tells which
    # original filters survive, even where a filter also lost input channels (weights no longer match).
    twin = copy.deepcopy(work)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.arange(m.weight.shape[0], dtype=m.weight.dtype).reshape(-1, *[1] * (m.weight.ndim - 1))
                               .expand_as(m.weight))
    base_macs, _ = tp.utils.count_ops_and_params(work, example_input)
    imp = {"magnitude": lambda: tp.importance.MagnitudeImportance(p=1),
           "group-norm": lambda: tp.importance.GroupMagnitudeImportance(p=2),
           "taylor": lambda: tp.importance.GroupTaylorImportance()}[importance]()
    pruner = tp.pruner.MetaPruner(work, example_input, importance=imp, global_pruning=bool(global_pruning),
                                  pruning_ratio=0.95,
                                  iterative_steps=steps, ignored_layers=ignored)
    macs = base_macs
    for _ in range(steps):
        if importance == "taylor":
            work.zero_grad()
            for i, (x, y) in enumerate(loader):
                if i >= batches:
                    break
                torch.nn.functional.cross_entropy(work(x), y).backward()
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(work, example_input)
        if macs <= target_macs * base_macs:
            break
    scope = "global" if global_pruning else "local"
    tdg = tp.DependencyGraph().build_dependency(twin, example_inputs=example_input)
    tdg.load_pruning_history(pruner.DG.pruning_history())
    tmods = dict(twin.named_modules())
    layers = []
    for u in structure.convs:
        keep = tuple(int(v) for v in tmods[u.conv].weight.detach().reshape(tmods[u.conv].weight.shape[0], -1)[:, 0])
        if u.coupled and len(keep) == u.out_channels:
            continue
        layers.append(LayerDecision(name=u.conv, out_channels=u.out_channels, keep=keep, method=f"tp-{importance}",
                                    reason=f"torch-pruning {scope} {importance} pruner", coupled=tuple(u.coupled)))
    return CompressionPlan(arch=arch, num_classes=num_classes, layers=tuple(layers),
                           predicted=dict(base_macs=int(base_macs), macs=int(macs)),
                           settings=dict(method=f"tp-{importance}", target_macs=target_macs, scope=scope))
