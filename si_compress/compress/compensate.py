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

from .. import _device
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


def _bn_affine(bn: nn.BatchNorm2d | None, channels: int, device=None):
    """(a, beta, mu) with eval BN(z) = a * (z - mu) + beta; identity when there is no BN."""
    if bn is None:
        one = torch.ones(channels, dtype=torch.float64, device=device)
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
    dev = conv.weight.device
    a, beta, mu = _bn_affine(bn, out, dev)
    # A channel with a ~ 0 outputs beta whatever its weights: nothing to fit, keep it as is.
    valid = a.abs() > 1e-12
    a_safe = torch.where(valid, a, torch.ones_like(a))
    fit_bias = conv.bias is not None or bn is not None
    total = sum(h.shape[0] * _rows(r[:1]).shape[0] for h, r in zip(inputs, residuals))
    D = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + int(fit_bias)
    AtA = torch.zeros(D, D, dtype=torch.float64, device=dev)
    AtB = torch.zeros(D, out, dtype=torch.float64, device=dev)
    used = 0
    for h, r in zip(inputs, residuals):
        P = _patches(conv, h).double()
        Z = (_rows(r).double() - beta) / a_safe + mu      # target pre-BN conv output
        n = P.shape[0]
        quota = n if total <= max_rows else max(1, (n * max_rows) // total)
        if quota < n:  # uniform subsample keeps the normal equations unbiased
            idx = torch.randperm(n, generator=gen)[:quota].to(dev)   # CPU generator: same rows on any device
            P, Z = P[idx], Z[idx]
        if fit_bias:
            P = torch.cat([P, torch.ones(P.shape[0], 1, dtype=torch.float64, device=dev)], dim=1)
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
    AtA[:k, :k] += lam * torch.eye(k, dtype=torch.float64, device=AtA.device)
    try:
        return torch.linalg.solve(AtA, AtB)
    except RuntimeError:  # singular even with the ridge (e.g. ridge=0 and dead inputs)
        return torch.linalg.lstsq(AtA, AtB).solution


def _rel_err(preds, targets) -> float:
    num = sum(float(((p - t) ** 2).sum()) for p, t in zip(preds, targets))
    den = sum(float((t ** 2).sum()) for t in targets)
    return num / den if den > 0 else num


class _Values:
    """Inputs/outputs of named modules during one forward; the forward stops once all are captured."""

    def __init__(self, model: nn.Module, wants: dict[str, str]):
        self.model, self.wants, self.got = model, dict(wants), {}

    def __call__(self, x) -> dict[str, torch.Tensor]:
        self.got = {}
        handles = []
        for name, kind in self.wants.items():
            mod = self.model.get_submodule(name)
            if kind == "in":
                handles.append(mod.register_forward_pre_hook(self._hook(name, 0)))
            else:
                handles.append(mod.register_forward_hook(self._hook(name, 1)))
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = set(self.wants) - set(self.got)
        if missing:
            raise ValueError(f"{sorted(missing)[0]!r} did not run in the forward pass")
        return self.got

    def _hook(self, name, which):
        def hook(mod, args, out=None):
            if name not in self.got:
                t = args[0] if which == 0 else out
                self.got[name] = t.detach().clone()
            if len(self.got) == len(self.wants):
                raise _Stop
        return (lambda mod, args: hook(mod, args)) if which == 0 else (lambda mod, args, out: hook(mod, args, out))


def _node_values(gm, x, nodes) -> dict:
    """Values of fx ``nodes`` when ``gm`` runs on ``x``."""
    import torch.fx as fx

    wanted = set(nodes)
    got = {}

    class Grab(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n in wanted:
                got[n] = v.detach().clone() if isinstance(v, torch.Tensor) else v
            return v

    Grab(gm).run(x)
    return got


def _section_exit(module: nn.Module):
    """(graph, add, shortcut node, exit conv node, exit BN node or None) of a residual section whose
    branch ends in ``conv [-> BN]`` before the addition; None otherwise."""
    from ..structure import _residual_add

    found, _ = _residual_add(module)
    if found is None:
        return None
    gm, add, branch, short = found
    mods = dict(gm.named_modules())
    bn = None
    n = branch
    if n.op == "call_module" and isinstance(mods.get(n.target), nn.modules.batchnorm._BatchNorm):
        bn, n = n, n.args[0]
    if n.op == "call_module" and isinstance(mods.get(n.target), nn.Conv2d) and mods[n.target].groups == 1:
        return gm, add, short, n, bn
    return None


def _followers(model: nn.Module, x: torch.Tensor):
    """(convs and linears in execution order, conv -> the BN reading its output, the adapter's traced run:
    event order per module and the cut modules)."""
    from ..structure import _Run

    outs, order, bn_of, handles = {}, [], {}, []
    named = {n: m for n, m in model.named_modules() if n and not list(m.children())}

    def post(name):
        def f(mod, args, out):
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and name not in order:
                order.append(name)
                outs[id(out)] = (name, out)
        return f

    def pre(name):
        def f(mod, args):
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and args and id(args[0]) in outs:
                conv, t = outs[id(args[0])]
                if t is args[0]:
                    bn_of.setdefault(conv, name)
        return f

    for name, m in named.items():
        handles.append(m.register_forward_hook(post(name)))
        handles.append(m.register_forward_pre_hook(pre(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order, bn_of, _Run(model, x)


def _generic_refit(pruned, original, plan, xs, *, scope, ridge, max_rows, gen, followers) -> dict:
    """Least-squares re-fit of every consumer of pruned channels (and, with ``after_change``, of every
    residual section's exit conv and every conv on the model's cut after the first change), in
    execution order so each fit absorbs the error of those before it.

    Residual section exit (``bn(conv(h)) + s -> T``): the target is the ORIGINAL section's sum ``T``
    minus the PRUNED shortcut ``s``; any other layer matches the original layer's (post-BN) output.
    """
    order, bn_of, run = followers
    cuts = run._cuts
    orig_mods = dict(original.named_modules())
    keep = plan.keep_map()
    for d in plan.layers:   # every writer of a residual stream keeps the stream's channels
        keep.update({c: d.keep for c in d.coupled})
    exits = {}
    for name, m in pruned.named_modules():
        if name and list(m.children()) and name in orig_mods:
            info = _section_exit(m)
            if info is not None:
                exits[f"{name}.{info[3].target}"] = (name, info)
    # A dropped concatenation branch narrows only its consumers' inputs: they count as changed too.
    changed = [n for n in order if n in orig_mods and (_width(pruned.get_submodule(n)) != _width(orig_mods[n]) or
                                                       _in_width(pruned.get_submodule(n)) != _in_width(orig_mods[n]))]
    dropped = [d for d in plan.dropped_blocks if d in orig_mods]
    # Convs from ``start`` on read changed inputs: after the first changed layer, or from the first
    # layer after a dropped section.
    start = next((i + 1 for i, n in enumerate(order) if n in changed), None)
    ran = [run.pre[d] for d in dropped if d in run.pre]
    if ran:
        after_drop = next((i for i, n in enumerate(order) if run.pre.get(n, 0) > min(ran)), None)
        if after_drop is not None:
            start = after_drop if start is None else min(start, after_drop)
    report = {}
    if start is None:
        return report
    for i, name in enumerate(order):
        mp = pruned.get_submodule(name)
        mo = orig_mods.get(name)
        if mo is None:
            continue
        consumes = _in_width(mp) != _in_width(mo)
        is_exit = name in exits
        # A Linear is re-fitted only when it reads pruned channels (a head fit on a small calibration
        # sample overfits; refit_head is the explicit step for that).
        candidate = consumes or (scope == "after_change" and i >= start and isinstance(mp, nn.Conv2d)
                                 and (is_exit or name in cuts))
        if not candidate:
            continue
        reason = "consumes pruned channels" if consumes else "input changed"
        if isinstance(mp, nn.Conv2d) and mp.groups != 1:
            report[name] = {"skipped": f"grouped conv (groups={mp.groups})", "reason": reason}
            continue
        out_idx = None
        if _width(mp) != _width(mo):
            if name not in keep:
                report[name] = {"skipped": "its outputs are pruned as part of another group", "reason": reason}
                continue
            out_idx = torch.tensor(keep[name], device=_device.model_device(mp))
        if is_exit:
            # a section writing a narrowed residual stream matches the original sum on its kept channels
            sec, (gm_p, add_p, short_p, conv_p, bn_p) = exits[name]
            info_o = _section_exit(orig_mods[sec])
            if info_o is None:
                continue
            gm_o, add_o = info_o[0], info_o[1]
            xin_o = [_Values(original, {sec: "in"})(x)[sec] for x in xs]
            xin_p = [_Values(pruned, {sec: "in"})(x)[sec] for x in xs]
            T = [_node_values(gm_o, x, [add_o])[add_o] for x in xin_o]
            if out_idx is not None:
                T = [t[:, out_idx] for t in T]
            vals = [_node_values(gm_p, x, [short_p, conv_p.args[0]]) for x in xin_p]
            ss = [v[short_p] for v in vals]
            hs = [v[conv_p.args[0]] for v in vals]
            bn = gm_p.get_submodule(bn_p.target) if bn_p is not None else None
            post = (lambda h: bn(mp(h))) if bn is not None else mp
            before = _rel_err([post(h) + s for h, s in zip(hs, ss)], T)
            rows = _fit_conv(mp, bn, hs, [t - s for t, s in zip(T, ss)], ridge=ridge, max_rows=max_rows, gen=gen)
            after = _rel_err([post(h) + s for h, s in zip(hs, ss)], T)
        else:
            bn_name = bn_of.get(name)
            bn = pruned.get_submodule(bn_name) if bn_name else None
            bno = orig_mods.get(bn_name) if bn_name else None
            want_o = {bn_name: "out"} if bno is not None else {name: "out"}
            targets = [next(iter(_Values(original, want_o)(x).values())) for x in xs]
            if out_idx is not None:
                targets = [t[:, out_idx] for t in targets]
            hs = [_Values(pruned, {name: "in"})(x)[name] for x in xs]
            post = (lambda h: bn(mp(h))) if bn is not None else mp
            before = _rel_err([post(h) for h in hs], targets)
            if isinstance(mp, nn.Linear):
                rows = _fit_linear(mp, hs, targets, ridge=ridge)
            else:
                rows = _fit_conv(mp, bn, hs, targets, ridge=ridge, max_rows=max_rows, gen=gen)
            after = _rel_err([post(h) for h in hs], targets)
        report[name] = {"before": before, "after": after, "rows": rows, "reason": reason}
    return report


def _width(m):
    return m.out_channels if isinstance(m, nn.Conv2d) else (m.out_features if isinstance(m, nn.Linear) else None)


def _in_width(m):
    return m.in_channels if isinstance(m, nn.Conv2d) else (m.in_features if isinstance(m, nn.Linear) else None)


@torch.no_grad()
def _fit_linear(lin: nn.Linear, inputs, targets, *, ridge: float) -> int:
    """Least-squares fit of ``lin`` (weight and bias) so that ``lin(h) ≈ target`` (rows: every sample)."""
    F_ = torch.cat([h.reshape(-1, h.shape[-1]) for h in inputs]).double()
    L = torch.cat([t.reshape(-1, t.shape[-1]) for t in targets]).double()
    A = F_ if lin.bias is None else torch.cat([F_, torch.ones(F_.shape[0], 1, dtype=torch.float64,
                                                              device=F_.device)], 1)
    k = F_.shape[1]
    if A.shape[1] > A.shape[0]:
        # More inputs than rows (a 25088-wide VGG classifier): the dual form solves an n x n system,
        # X = A^T (A A^T + lam I)^-1 L (the bias column is shrunk too here).
        G = A @ A.T
        lam = max(ridge, 1e-8) * float(torch.trace(G)) / G.shape[0]
        X = A.T @ torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=torch.float64, device=G.device), L)
    else:
        X = _ridge_solve(A.T @ A, A.T @ L, k, ridge)
    lin.weight.copy_(X[:k].T.to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_(X[k].to(lin.bias.dtype))
    return int(F_.shape[0])


def refit_consumers(pruned: nn.Module, original: nn.Module, plan: CompressionPlan, calib_loader, *,
                    ridge: float = 1e-4, max_rows: int = 100_000, max_batches: int | None = None,
                    scope: str = "after_change", seed: int = 0, device=None) -> dict[str, dict]:
    """Re-fit, in place, the convs of ``pruned`` that read changed inputs; returns a per-layer report.

    Any model (see :func:`_generic_refit`): every consumer of pruned channels (ungrouped conv or
    Linear) is fitted to the original layer's post-BN output; with ``scope="after_change"`` also
    every residual section's exit conv (target: original sum minus pruned shortcut) and every conv
    on the model's cut after the first change. Grouped convs are reported as skipped.
    ``original``: the model the plan was applied to (unchanged here). ``calib_loader`` yields
    ``x`` or ``(x, y)`` batches (the inputs are cached; each fit captures one layer's input and
    target, memory ~ 2 x that layer's calibration activations). ``ridge``: Tikhonov term relative
    to trace(A^T A)/D. ``max_rows``: im2col rows per layer (uniformly subsampled). Report:
    ``{layer name: {"before", "after", "rows", "reason"}}`` with relative squared errors
    ``||y - T||^2 / ||T||^2`` over all calibration positions. A Linear is re-fitted only when it reads
    pruned channels (``refit_head`` fits a new head to the logits). ``device``: where the forwards
    and the least-squares solves run (None: ``pruned``'s own device); the order of the layers is traced
    where the model is, before it moves, and both models come back to where they were.
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
    dev = _device.target(device, pruned)
    try:
        with torch.no_grad():
            xs = _batches(calib_loader, max_batches)
            # structure (execution order, BN of each conv, the cut) from a forward where the model is now
            followers = _followers(pruned, xs[0][:1].to(_device.model_device(pruned)))
            with _device.on_device(dev, pruned, original):
                xs = [_device.to_device(x, dev) for x in xs]
                return _generic_refit(pruned, original, plan, xs, scope=scope, ridge=ridge, max_rows=max_rows,
                                      gen=gen, followers=followers)
    finally:
        for m, mode in modes:
            m.training = mode


def refit_head(pruned: nn.Module, original: nn.Module, calib_loader, *, ridge: float = 1e-4,
               max_batches: int | None = None, device=None) -> dict:
    """Least-squares fit, in place, of ``pruned``'s Linear classifier to ``original``'s logits.

    For a truncated chain, whose new head reads features the old head never saw: on the
    calibration inputs, ``min_{W, b} || F W^T + b - L ||^2 + lam ||W||^2`` with ``F`` the
    pruned model's head input (N, C) and ``L`` the original model's logits (N, K); ``lam`` is
    ``ridge`` x trace(F^T F) / C (the bias is not shrunk). No labels are used. Returns
    ``{"before", "after", "rows"}`` (relative squared logit errors). A non-Linear head (an MLP)
    is left alone and reported as ``{"skipped": reason}``. ``device``: where it runs (None: ``pruned``'s
    own device); both models come back to where they were.
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
    dev = _device.target(device, pruned)
    seen = {}
    hook = head.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad(), _device.on_device(dev, pruned, original):
            feats, logits, preds = [], [], []
            for x in _batches(calib_loader, max_batches):
                x = _device.to_device(x, dev)
                preds.append(pruned(x))
                feats.append(seen["x"].double())
                logits.append(original(x).double())
            F_, L = torch.cat(feats), torch.cat(logits)
            if F_.ndim != 2 or L.shape[1] != head.out_features:
                raise ValueError(f"refit_head: head input {tuple(F_.shape)} / original logits {tuple(L.shape)} "
                                 f"do not fit a Linear({head.in_features}, {head.out_features})")
            before = _rel_err([torch.cat(preds).double()], [L])
            A = F_ if head.bias is None else torch.cat([F_, torch.ones(F_.shape[0], 1, dtype=torch.float64,
                                                                      device=F_.device)], 1)
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


def recalibrate_bn(model: nn.Module, loader, *, batches: int | None = None, device=None) -> nn.Module:
    """Reset every BatchNorm's running stats and re-estimate them on ``loader`` (cumulative average,
    ``momentum=None``) in train mode without gradients; returns ``model`` in eval mode.

    ``batches``: use at most this many batches (None: all). Only BN buffers change. ``device``: where
    the forwards run (None: the model's own); the model comes back to where it was.
    """
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ValueError(f"batches must be a positive integer or None; got {batches!r}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    dev = _device.target(device, model)
    model.train()
    seen = 0
    try:
        with torch.no_grad(), _device.on_device(dev, model):
            for item in loader:
                x = item[0] if isinstance(item, (tuple, list)) else item
                model(_device.to_device(x, dev))
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
