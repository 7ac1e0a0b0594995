"""Measured latency of residual blocks at candidate widths: plain data for the pure planner.

Filter counts are a poor proxy for speed on CPUs: a block's BatchNorm, ReLU and residual add touch
its full-width output whatever its inner width, and odd channel counts miss the fast kernels. The
planner can therefore rank its moves by *measured* seconds saved instead of MACs saved.

``block_latency_table`` times each distinct block shape (input shape, stride, widths) per
candidate inner width k (multiples of ``step`` plus the full width; k = 0 is the dropped block, i.e.
its shortcut alone) at ``batch``. A plan must not depend on how busy the machine was: the
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


def _with_width(block: nn.Module, k: int) -> nn.Module:
    """A copy of ``block`` whose conv1/bn1/conv2 carry ``k`` inner channels (k = 0: shortcut only)."""
    b = copy.deepcopy(block).eval()
    if k == 0:
        return b.shortcut
    c1, c2 = b.conv1, b.conv2
    b.conv1 = nn.Conv2d(c1.in_channels, k, c1.kernel_size, stride=c1.stride, padding=c1.padding,
                        dilation=c1.dilation, groups=1, bias=c1.bias is not None)
    if isinstance(getattr(b, "bn1", None), nn.BatchNorm2d):
        b.bn1 = nn.BatchNorm2d(k).eval()
    b.conv2 = nn.Conv2d(k, c2.out_channels, c2.kernel_size, stride=c2.stride, padding=c2.padding,
                        dilation=c2.dilation, groups=1, bias=c2.bias is not None)
    return b


def block_latency_table(model: nn.Module, structure, example_input, *, batch: int = 128, step: int = 8,
                        repeats: int = 9) -> dict[str, tuple[float, ...]]:
    """conv name -> seconds of its block with k inner filters, k = 0..C (see module doc).

    Only convs inside residual blocks with ``conv1``/``conv2``/``shortcut`` are timed (the conv1 of
    each block); others are left out and the planner falls back to MACs for them.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1; got {step}")
    mods = dict(model.named_modules())
    units = [u for u in structure.convs if u.block and u.conv == f"{u.block}.conv1"
             and all(hasattr(mods[u.block], a) for a in ("conv1", "conv2", "shortcut"))]
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
        blk = mods[u.block]
        key0 = (shapes[u.block], blk.conv1.stride, blk.conv2.out_channels, type(blk.shortcut).__name__)
        ks = sorted({0, u.out_channels, *range(step, u.out_channels, step)})
        for k in ks:
            if key0 + (k,) not in configs:
                configs[key0 + (k,)] = (_with_width(blk, k), torch.randn(batch, *shapes[u.block]))
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
