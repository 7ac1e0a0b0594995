"""Measured latency of residual blocks at candidate widths: plain data for the pure planner.

Filter counts are a poor proxy for speed on CPUs: a block's BatchNorm, ReLU and residual add touch
its full-width output whatever its inner width, and odd channel counts miss the fast kernels. The
planner can therefore rank its moves by *measured* seconds saved instead of MACs saved.

``block_latency_table`` times each distinct residual section (same modules, same input shape) per
candidate inner width k (multiples of ``step`` plus the full width; k = 0 is the dropped section,
i.e. its shortcut path alone) at ``batch``. A plan must not depend on how busy the machine was: the
configurations are timed round-robin (a busy spell hits all of them), each keeps its *fastest*
of ``repeats`` rounds (the cost of the kernels themselves, not of the neighbours), times are made
non-decreasing in k, and widths in between are interpolated linearly.
Result: conv name -> tuple of seconds for k = 0..C (index = inner width).
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

__all__ = ["block_latency_table", "latency"]


def latency(model, batch: int, example_shape, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds of one forward pass at ``batch`` (inference mode, current threads)."""
    x = torch.randn(batch, *example_shape)
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return float(np.median(times))


def _with_width(section: nn.Module, conv: str, k: int, shape) -> nn.Module:
    """A copy of ``section`` whose channel group rooted at ``conv`` (a name inside it) keeps its first ``k``
    channels (torch-pruning on the copy alone); k = 0: the section dropped (its shortcut path only)."""
    from .structure import drop_section

    b = copy.deepcopy(section).eval()
    if k == 0:
        return drop_section(b)
    root = b.get_submodule(conv)
    C = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
    if k >= C:
        return b
    import torch_pruning as tp

    DG = tp.DependencyGraph().build_dependency(b, example_inputs=torch.zeros(1, *shape), verbose=False)
    fn = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
    DG.get_pruning_group(root, fn, idxs=list(range(k, C))).prune()
    return b


def block_latency_table(model: nn.Module, structure, example_input, *, batch: int = 128, step: int = 8,
                        repeats: int = 9) -> dict[str, tuple[float, ...]]:
    """group root -> seconds of its section with k channels, k = 0..C (see module doc).

    Timed: every channel group that is the only group of a removable residual section (a block's
    inner width); the section is timed whole (its shortcut, BN, activation and addition included).
    Other groups are left out and the planner falls back to MACs.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1; got {step}")
    mods = dict(model.named_modules())
    per_section: dict[str, list] = {}
    residual = {b.name for b in structure.blocks if getattr(b, "kind", "residual") == "residual"}
    for u in structure.convs:
        if u.block in residual:
            per_section.setdefault(u.block, []).append(u)
    units = [us[0] for us in per_section.values() if len(us) == 1]
    shapes: dict[str, tuple] = {}
    hooks = [mods[u.block].register_forward_pre_hook(
        lambda m, inp, name=u.block: shapes.__setitem__(name, tuple(inp[0].shape[1:]))) for u in units]
    try:
        with torch.inference_mode():
            model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
    configs: dict[tuple, tuple[nn.Module, torch.Tensor]] = {}
    plan = []
    for u in units:
        sec = mods[u.block]
        inner = u.conv[len(u.block) + 1:]
        key0 = (repr(sec), shapes[u.block], inner)
        ks = sorted({0, u.out_channels, *range(step, u.out_channels, step)})
        for k in ks:
            if key0 + (k,) not in configs:
                configs[key0 + (k,)] = (_with_width(sec, inner, k, shapes[u.block]),
                                        torch.randn(batch, *shapes[u.block]))
        plan.append((u, key0, ks))
    best = {key: np.inf for key in configs}
    with torch.inference_mode():
        for m, x in configs.values():  # warm-up: first calls allocate and pick kernels
            m(x)
        for _ in range(repeats):
            for key, (m, x) in configs.items():
                t = time.perf_counter()
                m(x)
                best[key] = min(best[key], time.perf_counter() - t)
    table = {}
    for u, key0, ks in plan:
        ts = np.maximum.accumulate([best[key0 + (k,)] for k in ks])
        table[u.conv] = tuple(float(t) for t in np.interp(np.arange(u.out_channels + 1), ks, ts))
    return table
