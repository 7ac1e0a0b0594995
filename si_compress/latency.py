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

``compare_models`` is the one harness that times whole models against each other (si-compress and
the benchmarks): threads pinned and reported, warm-up, interleaved rounds (a busy spell hits every
model alike), the median and the spread (interquartile range / median) per model, and a ``noisy``
flag when a spread exceeds a threshold even after one retry.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

__all__ = ["block_latency_table", "combine_latency_tables", "compare_models", "interleaved_times", "latency", "speedup_table", "NOISY_SPREAD"]

#: A timing whose interquartile range exceeds this fraction of its median is marked noisy: two
#: timings of the same model on a quiet machine agree far better than that.
NOISY_SPREAD = 0.10

#: Shortest timed sample (seconds): faster calls are timed in blocks (see :func:`interleaved_times`).
MIN_SAMPLE_S = 0.05


def interleaved_times(calls: dict, *, repeats: int = 7, warmup: int = 2, min_sample_s: float = MIN_SAMPLE_S,
                      timer=time.perf_counter) -> dict:
    """name -> {"median_s", "spread", "times_s", "calls_per_sample"} of ``calls`` (name -> zero-argument callable).

    Every round times each callable in turn, so load that comes and goes hits all of them; ``warmup``
    rounds (allocation, kernel selection) are not counted. A callable whose fastest warm-up call is
    shorter than ``min_sample_s`` is timed as a block of ``n = ceil(min_sample_s / fastest)`` calls
    after one untimed call, and a sample is the block's time / n: a single millisecond call started
    right after another model would share the cores with that model's still-spinning worker threads
    (OpenMP, onnxruntime), which measured the neighbour instead of the model. ``spread``:
    interquartile range / median of the per-call samples.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0; got {repeats}, {warmup}")
    if not min_sample_s >= 0:
        raise ValueError(f"min_sample_s must be >= 0; got {min_sample_s!r}")
    times = {name: [] for name in calls}
    fastest = {name: float("inf") for name in calls}
    per = {name: 1 for name in calls}
    for r in range(warmup + repeats):
        if r == warmup:
            per = {name: max(1, int(np.ceil(min_sample_s / fastest[name]))) if 0 < fastest[name] < min_sample_s
                   else 1 for name in calls}
        for name, fn in calls.items():
            n = per[name]
            if n > 1:
                fn()  # settle: the previous model's threads stop spinning during this call
            t0 = timer()
            for _ in range(n):
                fn()
            dt = (timer() - t0) / n
            if r < warmup:
                fastest[name] = min(fastest[name], dt)
            else:
                times[name].append(dt)
    out = {}
    for name, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        out[name] = {"median_s": float(med), "spread": float((q3 - q1) / med) if med > 0 else 0.0, "times_s": ts,
                     "calls_per_sample": per[name]}
    return out


def compare_models(models: dict, batch: int, example_shape, *, threads: int | None = None, repeats: int = 7,
                   warmup: int = 2, noisy_spread: float = NOISY_SPREAD, min_sample_s: float = MIN_SAMPLE_S,
                   timer=time.perf_counter) -> dict:
    """Time ``models`` (name -> nn.Module) against each other at ``batch`` with :func:`interleaved_times`.

    ``threads``: torch threads during the timing (default: the current setting), restored after.
    A spread above ``noisy_spread`` is re-timed once; if it is still above, ``noisy`` is True and
    the ratios of these medians should not be trusted. Returns {"batch", "threads", "repeats",
    "warmup", "noisy", "retried", "models": {name: {"median_s", "spread", "times_s", "calls_per_sample"}}}
    (``min_sample_s``: see :func:`interleaved_times`).
    """
    x = torch.randn(batch, *example_shape)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        for m in models.values():
            m.eval()
        calls = {name: (lambda m=m: m(x)) for name, m in models.items()}
        with torch.inference_mode():
            res = interleaved_times(calls, repeats=repeats, warmup=warmup, min_sample_s=min_sample_s, timer=timer)
            retried = max(r["spread"] for r in res.values()) > noisy_spread
            if retried:
                res = interleaved_times(calls, repeats=repeats, warmup=warmup, min_sample_s=min_sample_s, timer=timer)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return {"batch": int(batch), "threads": used, "repeats": repeats, "warmup": warmup,
            "noisy": max(r["spread"] for r in res.values()) > noisy_spread, "retried": retried, "models": res}


def speedup_table(base, compressed, example_shape, *, batches=(1, 128), threads: int | None = None,
                  repeats: int = 7, warmup: int = 2, timer=time.perf_counter) -> dict:
    """"batch<b>" -> {"base_s", "compressed_s", "speedup", "base_spread", "compressed_spread", "noisy",
    "retried", "repeats", "threads"}: ``base`` and ``compressed`` timed together per batch size
    (:func:`compare_models`), as si-compress and the benchmarks report them."""
    out = {}
    for b in batches:
        t = compare_models({"base": base, "compressed": compressed}, b, example_shape, threads=threads,
                           repeats=repeats, warmup=warmup, timer=timer)
        tb, tc = t["models"]["base"], t["models"]["compressed"]
        out[f"batch{b}"] = dict(base_s=tb["median_s"], compressed_s=tc["median_s"],
                                speedup=tb["median_s"] / tc["median_s"] if tc["median_s"] > 0 else float("nan"),
                                base_spread=tb["spread"], compressed_spread=tc["spread"], noisy=t["noisy"],
                                retried=t["retried"], repeats=t["repeats"], threads=t["threads"])
    return out


def latency(model, batch: int, example_shape, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds of one forward pass at ``batch`` (inference mode, current threads); to compare
    models, time them together with :func:`compare_models`."""
    return compare_models({"m": model}, batch, example_shape, repeats=repeats, warmup=warmup)["models"]["m"]["median_s"]


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


def combine_latency_tables(tables: dict[int, dict[str, tuple[float, ...]]]) -> dict[str, tuple[float, ...]]:
    """One table for several batch sizes: batch -> (conv -> seconds at k = 0..C), each divided by its own
    full-width total (the sum over convs of seconds at k = C), then averaged over the batches.

    A move then saves the mean over the deploy batches of the fraction of the timed time it saves, so a
    batch-1 table (microseconds) weighs as much as a batch-128 one (milliseconds). Convs missing from a
    table are left out; one table comes back normalised the same way.
    """
    if not tables:
        raise ValueError("combine_latency_tables: no table given")
    convs = sorted(set.intersection(*(set(t) for t in tables.values())))
    norm = {b: sum(t[c][-1] for c in convs) for b, t in tables.items()}
    out = {}
    for conv in convs:
        if len({len(t[conv]) for t in tables.values()}) != 1:
            raise ValueError(f"combine_latency_tables: {conv} has tables of different lengths "
                             f"{sorted({len(t[conv]) for t in tables.values()})}")
        rows = [np.asarray(t[conv], dtype=np.float64) / max(norm[b], 1e-30) for b, t in tables.items()]
        out[conv] = tuple(float(v) for v in np.mean(rows, axis=0))
    return out
