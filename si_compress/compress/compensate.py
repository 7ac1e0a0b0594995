"""Compensation without training: least-squares re-fit of consumer convs, BatchNorm re-calibration.

:func:`refit_consumers` is the reconstruction step of ThiNet (Luo et al. 2017) and of He et al.
2017's channel pruning: after filters are removed, the conv that reads them is re-fitted so that,
on calibration images, its (post-BN) output matches the ORIGINAL network's, with inputs taken from
the PRUNED network. Blocks are processed in forward order, so each fit also absorbs the residual
error of everything fitted before it.

For a residual block (``conv1 -> bn1 -> act -> conv2 -> bn2``, ``+ shortcut``) the fitted quantity
is the pre-activation sum: with ``h`` the pruned block's ``act(bn1(conv1(x_p)))``, ``s`` its
shortcut of ``x_p`` and ``T`` the original block's ``bn2(conv2(.)) + shortcut(x_o)``,

    min_{W, c} || bn2(conv2_W(h) + c) + s - T ||^2 ,

solved per output channel ``o`` in pre-BN space (BN in eval mode is ``a*(z - mu) + beta`` with
``a = gamma / sqrt(var + eps)``): ``z_target = (T - s - beta) / a + mu``. The bias ``c`` goes into
the conv's bias when it has one, else into ``bn.running_mean`` (``mu' = mu - c``).

:func:`recalibrate_bn` recomputes BatchNorm running statistics. The two compose in either order and
are kept separate so the best order can be measured: refit then recalibrate re-estimates the
statistics the refit had matched (its bias folded into ``running_mean`` is overwritten);
recalibrate then refit keeps the least-squares optimum exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import CompressionPlan

__all__ = ["refit_consumers", "refit_head", "recalibrate_bn"]

_BN = (nn.BatchNorm2d,)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted activation is captured."""


def _batches(loader, max_batches: int | None) -> list[torch.Tensor]:
    """The input tensors of ``loader`` (yielding ``x`` or ``(x, y, ...)``), as float32 on CPU."""
    out = []
    for item in loader:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration loader must yield tensors or (tensor, labels) pairs; got {type(x).__name__}")
        out.append(x.float())
        if max_batches is not None and len(out) >= max_batches:
            break
    if not out:
        raise ValueError("calibration loader yielded no batches")
    return out


def _input_of(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input of submodule ``name`` during ``model(x)``; the rest of the forward is skipped."""
    seen = {}

    def hook(mod, args):
        seen["x"] = args[0].detach().clone()
        raise _Stop

    h = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if "x" not in seen:
        raise ValueError(f"{name!r} did not run in the forward pass")
    return seen["x"]


def _is_block(m: nn.Module) -> bool:
    return (all(isinstance(getattr(m, a, None), nn.Module) for a in ("conv1", "bn1", "conv2", "bn2"))
            and (hasattr(m, "shortcut") or hasattr(m, "downsample")) and not hasattr(m, "conv3"))


def _act1(block):
    return block.relu1 if hasattr(block, "relu1") else block.relu


def _shortcut(block, x):
    if hasattr(block, "shortcut"):
        return block.shortcut(x)
    return x if block.downsample is None else block.downsample(x)


def _bn_affine(bn: nn.BatchNorm2d | None, channels: int):
    """(a, beta, mu) with eval BN(z) = a * (z - mu) + beta; identity when there is no BN."""
    if bn is None:
        one = torch.ones(channels, dtype=torch.float64)
        return one, torch.zeros_like(one), torch.zeros_like(one)
    var = bn.running_var.double()
    a = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.double()
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(a)
    return a, beta, bn.running_mean.double()


def _patches(conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """im2col rows: (N*L, C_in*kh*kw) for the L output positions of ``conv`` on ``h``."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"refit supports zero-padded convs with numeric padding; got padding={conv.padding!r}, "
                         f"padding_mode={conv.padding_mode!r}")
    cols = F.unfold(h, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C), matching :func:`_patches` row order."""
    return t.flatten(2).transpose(1, 2).reshape(-1, t.shape[1])


@torch.no_grad()
def _fit_conv(conv: nn.Conv2d, bn, inputs, residuals, *, ridge: float, max_rows: int, gen) -> int:
    """Least-squares fit of ``conv`` (and its bias) so that ``bn(conv(h)) ≈ R`` for (h, R) pairs.

    ``residuals[i]``: (N, out, H', W') target of the post-BN output. Normal equations accumulate in
    float64: memory (D + out) * D with D = C_in*kh*kw + 1. Returns the number of rows used.
    """
    if conv.groups != 1:
        raise ValueError(f"refit supports ungrouped convs only; got groups={conv.groups}")
    out = conv.out_channels
    a, beta, mu = _bn_affine(bn, out)
    # A channel with a ~ 0 outputs beta whatever its weights: nothing to fit, keep it as is.
    valid = a.abs() > 1e-12
    a_safe = torch.where(valid, a, torch.ones_like(a))
    fit_bias = conv.bias is not None or bn is not None
    total = sum(h.shape[0] * _rows(r[:1]).shape[0] for h, r in zip(inputs, residuals))
    D = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + int(fit_bias)
    AtA = torch.zeros(D, D, dtype=torch.float64)
    AtB = torch.zeros(D, out, dtype=torch.float64)
    used = 0
    for h, r in zip(inputs, residuals):
        P = _patches(conv, h).double()
        Z = (_rows(r).double() - beta) / a_safe + mu      # target pre-BN conv output
        n = P.shape[0]
        quota = n if total <= max_rows else max(1, (n * max_rows) // total)
        if quota < n:  # uniform subsample keeps the normal equations unbiased
            idx = torch.randperm(n, generator=gen)[:quota]
            P, Z = P[idx], Z[idx]
        if fit_bias:
            P = torch.cat([P, torch.ones(P.shape[0], 1, dtype=torch.float64)], dim=1)
        AtA += P.T @ P
        AtB += P.T @ Z
        used += P.shape[0]
    k = D - int(fit_bias)
    X = _ridge_solve(AtA, AtB, k, ridge)
    W = X[:k].T.reshape(out, conv.in_channels, *conv.kernel_size)
    v = valid.nonzero().flatten()
    conv.weight[v] = W[v].to(conv.weight.dtype)
    if fit_bias:
        c = X[k]
        if conv.bias is not None:
            conv.bias[v] = c[v].to(conv.bias.dtype)
        else:
            bn.running_mean[v] = (mu[v] - c[v]).to(bn.running_mean.dtype)
    return used


def _ridge_solve(AtA: torch.Tensor, AtB: torch.Tensor, k: int, ridge: float) -> torch.Tensor:
    """Solve the normal equations (AtA + lam I_k) X = AtB in place of AtA, lam = ridge x trace/k over
    the first k (weight) columns; a trailing bias column is not shrunk."""
    lam = ridge * float(torch.trace(AtA[:k, :k])) / max(k, 1)
    AtA[:k, :k] += lam * torch.eye(k, dtype=torch.float64)
    try:
        return torch.linalg.solve(AtA, AtB)
    except RuntimeError:  # singular even with the ridge (e.g. ridge=0 and dead inputs)
        return torch.linalg.lstsq(AtA, AtB).solution


def _rel_err(preds, targets) -> float:
    num = sum(float(((p - t) ** 2).sum()) for p, t in zip(preds, targets))
    den = sum(float((t ** 2).sum()) for t in targets)
    return num / den if den > 0 else num


def _residual_refit(pruned, original, plan, xs, *, scope, ridge, max_rows, gen) -> dict:
    names = [n for n, m in original.named_modules() if _is_block(m)]
    _check_chain(original, names, xs[0])
    x_o = [_input_of(original, names[0], x) for x in xs]
    x_p = [_input_of(pruned, names[0], x) for x in xs]
    changed = any(not torch.equal(a, b) for a, b in zip(x_o, x_p))
    report = {}
    for name in names:
        ob = original.get_submodule(name)
        pb = pruned.get_submodule(name)
        mids = [_act1(ob)(ob.bn1(ob.conv1(x))) for x in x_o]
        targets = [ob.bn2(ob.conv2(m)) + _shortcut(ob, x) for m, x in zip(mids, x_o)]
        next_o = [ob(x) for x in x_o]
        if not _is_block(pb):  # dropped: the shortcut alone carries the signal
            x_p = [pb(x) for x in x_p]
            x_o = next_o
            changed = True
            continue
        pruned_here = pb.conv1.out_channels != ob.conv1.out_channels
        if pruned_here or (changed and scope == "after_change"):
            hs = [_act1(pb)(pb.bn1(pb.conv1(x))) for x in x_p]
            ss = [_shortcut(pb, x) for x in x_p]
            before = _rel_err([pb.bn2(pb.conv2(h)) + s for h, s in zip(hs, ss)], targets)
            rows = _fit_conv(pb.conv2, pb.bn2, hs, [t - s for t, s in zip(targets, ss)],
                             ridge=ridge, max_rows=max_rows, gen=gen)
            after = _rel_err([pb.bn2(pb.conv2(h)) + s for h, s in zip(hs, ss)], targets)
            report[f"{name}.conv2"] = {"before": before, "after": after, "rows": rows,
                                       "reason": "consumes pruned channels" if pruned_here else "input changed"}
        x_p = [pb(x) for x in x_p]
        x_o = next_o
        changed = changed or any(not torch.equal(a, b) for a, b in zip(x_o, x_p))
    return report


def _check_chain(model, names, x) -> None:
    """Refuse models whose blocks are not a simple chain (block i's output is block i+1's input)."""
    ins, outs, hs = {}, {}, []
    for n in names:
        m = model.get_submodule(n)
        hs.append(m.register_forward_pre_hook(lambda mod, a, n=n: ins.__setitem__(n, a[0])))
        hs.append(m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o)))
    try:
        model(x)
    finally:
        for h in hs:
            h.remove()
    for a, b in zip(names, names[1:]):
        if a not in outs or b not in ins or not torch.equal(outs[a], ins[b]):
            raise ValueError(f"residual blocks {a!r} -> {b!r} are not chained output-to-input; "
                             "refit_consumers supports ResNet-style sequential stages only")


def _chain_refit(pruned, original, plan, xs, *, scope, ridge, max_rows, gen) -> dict:
    fo, fp = original.features, pruned.features
    keep = plan.keep_map()
    x_o, x_p = list(xs), list(xs)
    changed = False
    report = {}
    for i, mp in enumerate(fp):
        mo = fo[i]
        if isinstance(mp, nn.Conv2d):
            name = f"features.{i}"
            consumes = mp.in_channels != mo.in_channels
            if consumes or (changed and scope == "after_change"):
                bn_o = fo[i + 1] if i + 1 < len(fo) and isinstance(fo[i + 1], _BN) else None
                bn_p = fp[i + 1] if i + 1 < len(fp) and isinstance(fp[i + 1], _BN) else None
                targets = [bn_o(mo(x)) if bn_o is not None else mo(x) for x in x_o]
                if mp.out_channels != mo.out_channels:  # this conv is pruned too: match its kept filters
                    if name not in keep:
                        raise ValueError(f"{name} has fewer filters than the original but the plan does not list it")
                    idx = torch.tensor(keep[name])
                    targets = [t[:, idx] for t in targets]

                def post(h):
                    z = mp(h)
                    return bn_p(z) if bn_p is not None else z

                before = _rel_err([post(h) for h in x_p], targets)
                rows = _fit_conv(mp, bn_p, x_p, targets, ridge=ridge, max_rows=max_rows, gen=gen)
                after = _rel_err([post(h) for h in x_p], targets)
                report[name] = {"before": before, "after": after, "rows": rows,
                                "reason": "consumes pruned channels" if consumes else "input changed"}
            if mp.out_channels != mo.out_channels:
                changed = True
        x_o = [mo(x) for x in x_o]
        x_p = [mp(x) for x in x_p]
    return report


def refit_consumers(pruned: nn.Module, original: nn.Module, plan: CompressionPlan, calib_loader, *,
                    ridge: float = 1e-4, max_rows: int = 100_000, max_batches: int | None = None,
                    scope: str = "after_change", seed: int = 0) -> dict[str, dict]:
    """Re-fit, in place, the convs of ``pruned`` that read changed inputs; returns a per-layer report.

    ``original``: the model the plan was applied to (unchanged here). ``calib_loader`` yields
    ``x`` or ``(x, y)`` batches (its inputs are cached: memory ~ 2 x calibration activations at one
    block boundary). ``scope``: ``"after_change"`` re-fits every kept block's conv2 (chains: every
    conv) from the first pruned/dropped layer on; ``"consumers"`` only the direct consumers of
    pruned channels. ``ridge``: Tikhonov term relative to trace(A^T A)/D. ``max_rows``: im2col rows
    per layer (uniformly subsampled). Report: ``{conv name: {"before", "after", "rows", "reason"}}``
    with relative squared errors ``||y - T||^2 / ||T||^2`` over all calibration positions.
    Residual nets: blocks with conv1/bn1/conv2/bn2 and a shortcut (CifarResNet, torchvision
    BasicBlock); plain chains: a ``features`` Sequential (VGG, SmallCNN). Heads are not re-fitted.
    """
    if scope not in ("after_change", "consumers"):
        raise ValueError(f"scope must be 'after_change' or 'consumers'; got {scope!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0; got {ridge!r}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer; got {max_rows!r}")
    modes = [(m, m.training) for m in list(pruned.modules()) + list(original.modules())]
    pruned.eval()
    original.eval()
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            xs = _batches(calib_loader, max_batches)
            kw = dict(scope=scope, ridge=ridge, max_rows=max_rows, gen=gen)
            if any(_is_block(m) for m in original.modules()):
                return _residual_refit(pruned, original, plan, xs, **kw)
            if isinstance(getattr(original, "features", None), nn.Sequential) and \
                    isinstance(getattr(pruned, "features", None), nn.Sequential):
                return _chain_refit(pruned, original, plan, xs, **kw)
            raise ValueError(f"refit_consumers supports residual nets (BasicBlocks) and plain chains with a "
                             f"'features' Sequential; {type(original).__name__} is neither")
    finally:
        for m, mode in modes:
            m.training = mode


def refit_head(pruned: nn.Module, original: nn.Module, calib_loader, *, ridge: float = 1e-4,
               max_batches: int | None = None) -> dict:
    """Least-squares fit, in place, of ``pruned``'s Linear classifier to ``original``'s logits.

    For a truncated chain, whose new head reads features the old head never saw: on the
    calibration inputs, ``min_{W, b} || F W^T + b - L ||^2 + lam ||W||^2`` with ``F`` the
    pruned model's head input (N, C) and ``L`` the original model's logits (N, K); ``lam`` is
    ``ridge`` x trace(F^T F) / C (the bias is not shrunk). No labels are used. Returns
    ``{"before", "after", "rows"}`` (relative squared logit errors). A non-Linear head (an MLP)
    is left alone and reported as ``{"skipped": reason}``.
    """
    from .prune import find_classifier

    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0; got {ridge!r}")
    _, head = find_classifier(pruned)
    if not isinstance(head, nn.Linear):
        return {"skipped": f"the head is a {type(head).__name__}, not a Linear"}
    modes = [(m, m.training) for m in list(pruned.modules()) + list(original.modules())]
    pruned.eval()
    original.eval()
    seen = {}
    hook = head.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad():
            feats, logits, preds = [], [], []
            for x in _batches(calib_loader, max_batches):
                preds.append(pruned(x))
                feats.append(seen["x"].double())
                logits.append(original(x).double())
            F_, L = torch.cat(feats), torch.cat(logits)
            if F_.ndim != 2 or L.shape[1] != head.out_features:
                raise ValueError(f"refit_head: head input {tuple(F_.shape)} / original logits {tuple(L.shape)} "
                                 f"do not fit a Linear({head.in_features}, {head.out_features})")
            before = _rel_err([torch.cat(preds).double()], [L])
            A = F_ if head.bias is None else torch.cat([F_, torch.ones(F_.shape[0], 1, dtype=torch.float64)], 1)
            AtA, AtB = A.T @ A, A.T @ L
            k = F_.shape[1]
            X = _ridge_solve(AtA, AtB, k, ridge)
            head.weight.copy_(X[:k].T.to(head.weight.dtype))
            if head.bias is not None:
                head.bias.copy_(X[k].to(head.bias.dtype))
            after = _rel_err([head(F_.to(head.weight.dtype)).double()], [L])
    finally:
        hook.remove()
        for m, mode in modes:
            m.training = mode
    return {"before": before, "after": after, "rows": int(F_.shape[0])}


def recalibrate_bn(model: nn.Module, loader, *, batches: int | None = None) -> nn.Module:
    """Reset every BatchNorm's running stats and re-estimate them on ``loader`` (cumulative average,
    ``momentum=None``) in train mode without gradients; returns ``model`` in eval mode.

    ``batches``: use at most this many batches (None: all). Only BN buffers change.
    """
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ValueError(f"batches must be a positive integer or None; got {batches!r}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    try:
        with torch.no_grad():
            for item in loader:
                x = item[0] if isinstance(item, (tuple, list)) else item
                model(x)
                seen += 1
                if batches is not None and seen >= batches:
                    break
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    if seen == 0:
        raise ValueError("recalibrate_bn: the loader yielded no batches")
    return model
