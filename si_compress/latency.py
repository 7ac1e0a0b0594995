"""Measured latency of residual blocks at candidate widths: plain data for the pure planner.

Filter counts are a poor proxy for speed on CPUs: a block's BatchNorm, ReLU and residual add touch
its full-width output whatever its inner width, and odd channel counts miss the fast kernels. The
planner can therefore rank its moves by *measured* seconds saved instead of MACs saved.

``block_latency_table`` times each distinct residual section (same modules, same input shape) per
candidate width k of each channel group inside it (up to ``points`` multiples of ``step`` plus the
full width; k = 0 is the dropped section, i.e. its shortcut path alone) at ``batch``. A plan must not depend on how busy the machine was: the
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
                        repeats: int = 9, points: int = 9, budget_s: float = 60.0) -> dict[str, tuple[float, ...]]:
    """group root -> seconds of its section with k channels in that group, k = 0..C (see module doc).

    Timed: every channel group inside a removable residual section (a bottleneck's two inner groups
    each, the other groups at full width); the section is timed whole (its shortcut, BN, activation
    and addition included), at no more than ``points`` widths per group (multiples of ``step``, the
    full width and k = 0). Other groups are left out; the planner counts their MACs. ``budget_s``:
    seconds the timed rounds may take; fewer rounds (at least one) when one round costs more.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1; got {step}")
    if points < 3:
        raise ValueError(f"points must be >= 3; got {points}")
    mods = dict(model.named_modules())
    residual = {b.name for b in structure.blocks if getattr(b, "kind", "residual") == "residual"}
    units = [u for u in structure.convs if u.block in residual]
    shapes: dict[str, tuple] = {}
    hooks = [mods[b].register_forward_pre_hook(
        lambda m, inp, name=b: shapes.__setitem__(name, tuple(inp[0].shape[1:]))) for b in {u.block for u in units}]
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
        ks = list(range(step, u.out_channels, step))
        if len(ks) > points - 2:   # evenly spaced multiples of step: the timing cost stays bounded
            ks = [ks[int(round(i))] for i in np.linspace(0, len(ks) - 1, points - 2)]
        ks = sorted({0, u.out_channels, *ks})
        for k in ks:
            if key0 + (k,) not in configs:
                configs[key0 + (k,)] = (_with_width(sec, inner, k, shapes[u.block]),
                                        torch.randn(batch, *shapes[u.block]))
        plan.append((u, key0, ks))
    best = {key: np.inf for key in configs}
    with torch.inference_mode():
        t0 = time.perf_counter()
        for m, x in configs.values():  # warm-up: first calls allocate and pick kernels
            m(x)
        one_round = time.perf_counter() - t0
        for _ in range(max(1, min(repeats, int(budget_s / max(one_round, 1e-9))))):
            for key, (m, x) in configs.items():
                t = time.perf_counter()
                m(x)
                best[key] = min(best[key], time.perf_counter() - t)
    table = {}
    for u, key0, ks in plan:
        ts = np.maximum.accumulate([best[key0 + (k,)] for k in ks])
        table[u.conv] = tuple(float(t) for t in np.interp(np.arange(u.out_channels + 1), ks, ts))
    return table
