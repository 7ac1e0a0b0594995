"""Unstructured sparsity: percentile (magnitude) pruning with masks that hold through fine-tuning,
and the dynamic percentile search (raise while accuracy holds, bisect back when it drops).

* :func:`percentile_prune`: zero an exact fraction of conv/linear weights (global or per layer).
* :func:`apply_masks` / :func:`holding_masks`: keep pruned weights at zero during training.
* :func:`dynamic_percentile_search`: see its docstring.
"""
from __future__ import annotations

import contextlib
import copy
import numbers
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


__all__ = ["PruneResult", "SearchResult", "apply_masks", "dynamic_percentile_search", "holding_masks",
           "percentile_prune"]


# --------------------------------------------------------------------------------------------
# unstructured percentile pruning
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PruneResult:
    """masks: parameter name (e.g. ``"layer1.0.conv1.weight"``) -> bool tensor, True = kept.
    percentile: requested percentage of zeros; sparsity: achieved fraction of zeros over the
    masked weights; per_layer: fraction of zeros per parameter."""

    masks: dict
    percentile: float
    scope: str
    sparsity: float
    per_layer: dict
    _handles: list = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Remove the gradient hooks :func:`percentile_prune` (``hold=True``) registered."""
        while self._handles:
            self._handles.pop().remove()


def _prunable(model: nn.Module, layers) -> dict[str, nn.Parameter]:
    wanted = None if layers is None else set(layers)
    params = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (wanted is None or name in wanted):
            params[f"{name}.weight" if name else "weight"] = m.weight
    if wanted is not None:
        missing = wanted - {k.rsplit(".", 1)[0] if "." in k else "" for k in params}
        if missing:
            raise ValueError(f"layers {sorted(missing)} are not Conv2d / Linear modules of the model")
    if not params:
        raise ValueError("the model has no Conv2d or Linear weights to prune")
    return params


def _smallest_mask(values: Tensor, k: int) -> Tensor:
    """Bool mask, False at the k smallest ``values`` (ties: lower flat index first)."""
    mask = torch.ones(values.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(values.reshape(-1), stable=True)
        mask[order[:k]] = False
    return mask


def _mask_hook(mask: Tensor):
    return lambda grad: grad * mask.to(grad.dtype)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: "PruneResult | dict") -> None:
    """Zero the pruned weights of ``model`` in place (parameters looked up by name)."""
    masks = masks.masks if isinstance(masks, PruneResult) else masks
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"the model has no parameter {name!r}; masks must come from a model with the same "
                             "layer names")
        params[name].mul_(mask.to(params[name].dtype))


@contextlib.contextmanager
def holding_masks(model: nn.Module, masks: "PruneResult | dict"):
    """Within the block, gradients of pruned weights are zeroed (so SGD, momentum and weight decay
    leave them at zero); on exit the masks are re-applied and the hooks removed."""
    masks_d = masks.masks if isinstance(masks, PruneResult) else masks
    apply_masks(model, masks_d)
    params = dict(model.named_parameters())
    handles = [params[n].register_hook(_mask_hook(m)) for n, m in masks_d.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        apply_masks(model, masks_d)


def percentile_prune(model: nn.Module, percentile: float, *, scope: str = "global",
                     layers: Iterable[str] | None = None, hold: bool = True) -> PruneResult:
    """Unstructured magnitude pruning in place: zero exactly ``round(percentile / 100 * n)`` weights.

    scope "global": the smallest ``|w|`` over all selected Conv2d / Linear weights together
    (layers with small weights lose more); "layer": that fraction of each weight tensor.
    layers: module names to prune (default: every Conv2d and Linear). hold: register gradient
    hooks so later fine-tuning keeps the zeros (remove with ``result.release()``; hooks do not
    survive ``copy.deepcopy``: use :func:`holding_masks` on copies).
    """
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 <= percentile < 100:
        raise ValueError(f"percentile must be a number in [0, 100); got {percentile!r}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer'; got {scope!r}")
    params = _prunable(model, layers)
    masks = {}
    with torch.no_grad():
        if scope == "global":
            flat = torch.cat([p.detach().abs().reshape(-1).float() for p in params.values()])
            keep = _smallest_mask(flat, round(percentile / 100.0 * flat.numel()))
            offset = 0
            for name, p in params.items():
                masks[name] = keep[offset:offset + p.numel()].reshape(p.shape).clone()
                offset += p.numel()
        else:
            for name, p in params.items():
                masks[name] = _smallest_mask(p.detach().abs().float(),
                                             round(percentile / 100.0 * p.numel())).reshape(p.shape)
        for name, p in params.items():
            p.mul_(masks[name].to(p.dtype))
    n = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    handles = [params[name].register_hook(_mask_hook(m)) for name, m in masks.items()] if hold else []
    return PruneResult(masks=masks, percentile=float(percentile), scope=scope, sparsity=zeros / n,
                       per_layer={k: float((~m).float().mean()) for k, m in masks.items()}, _handles=handles)


@dataclass(frozen=True, eq=False)
class SearchResult:
    """Outcome of :func:`dynamic_percentile_search`: the best accepted model (a copy), its
    percentile, accuracy and masks, the baseline accuracy and every trial in order."""

    model: nn.Module
    percentile: float
    accuracy: float
    baseline_accuracy: float
    sparsity: float
    masks: dict
    history: tuple


def dynamic_percentile_search(model: nn.Module, *, eval_fn: Callable[[nn.Module], float],
                              finetune_fn: Callable[[nn.Module], object] | None = None, start: float = 50.0,
                              step: float = 10.0, tolerance: float = 0.01, min_step: float = 1.0,
                              max_percentile: float = 99.0, max_trials: int = 12, scope: str = "global",
                              layers: Iterable[str] | None = None, baseline: float | None = None,
                              progress: Callable[[dict], None] | None = None) -> SearchResult:
    """Raise the pruning percentile while the fine-tuned accuracy holds; back off when it drops.

    Schedule (``a0`` = ``baseline`` or ``eval_fn(model)``; ``lo`` = highest accepted percentile,
    initially 0 = the unpruned model; ``hi`` = lowest rejected one, initially none):

    1. the first trial is at ``p = start``;
    2. a trial copies the best accepted model, prunes it to ``p`` (:func:`percentile_prune`;
       weights already zero stay zero since they are the smallest), runs ``finetune_fn`` on it with
       the masks held, and measures ``acc = eval_fn``. It is accepted if ``acc >= a0 - tolerance``
       (then ``lo = p`` and it becomes the best model), else rejected (``hi = p``);
    3. next ``p``: ``lo + step`` while nothing was rejected (raise), else ``(lo + hi) / 2``
       (back off by bisection between the last percentile that held and the first that dropped);
       capped at ``max_percentile``;
    4. stop when ``hi - lo <= min_step``, when the next ``p`` was already tried (the cap was
       reached), or after ``max_trials`` trials.

    eval_fn(model) -> accuracy (any scale, same as ``tolerance``); finetune_fn(model) trains in
    place (None: prune only). The input model is not modified. history: one dict per trial
    ``{"trial", "percentile", "sparsity", "accuracy", "accepted", "seconds"}``.
    """
    for name, v in (("start", start), ("step", step), ("max_percentile", max_percentile)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < 100:
            raise ValueError(f"{name} must be a percentage in (0, 100); got {v!r}")
    if start > max_percentile:
        raise ValueError(f"start ({start}) must not exceed max_percentile ({max_percentile})")
    if not min_step > 0 or tolerance < 0:
        raise ValueError(f"min_step must be > 0 and tolerance >= 0; got {min_step!r}, {tolerance!r}")
    _check_int(max_trials, "max_trials", 1)
    a0 = float(eval_fn(model)) if baseline is None else float(baseline)
    best, best_p, best_acc, best_masks, best_sparsity = copy.deepcopy(model), 0.0, a0, {}, 0.0
    lo, hi = 0.0, None
    p = float(start)
    tried: set[float] = set()
    history = []
    for trial in range(1, max_trials + 1):
        t0 = time.perf_counter()
        tried.add(p)
        cand = copy.deepcopy(best)
        res = percentile_prune(cand, p, scope=scope, layers=layers, hold=False)
        if finetune_fn is not None:
            with holding_masks(cand, res):
                finetune_fn(cand)
        acc = float(eval_fn(cand))
        ok = acc >= a0 - tolerance
        record = {"trial": trial, "percentile": p, "sparsity": res.sparsity, "accuracy": acc, "accepted": ok,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        if progress is not None:
            progress(record)
        if ok:
            lo, best, best_p, best_acc, best_masks, best_sparsity = p, cand, p, acc, res.masks, res.sparsity
        else:
            hi = p
        if hi is not None and hi - lo <= min_step:
            break
        nxt = min(lo + step if hi is None else (lo + hi) / 2.0, float(max_percentile))
        if nxt in tried or nxt <= lo:
            break
        p = nxt
    return SearchResult(model=best, percentile=best_p, accuracy=best_acc, baseline_accuracy=a0,
                        sparsity=best_sparsity, masks=best_masks, history=tuple(history))
