"""Fake quantization for PTQ / QAT: BatchNorm folding, activation observers, fake-quant Conv2d /
Linear (integer, power-of-two and additive power-of-two weights), ``prepare_qat`` and ``calibrating``.

Grid conventions: :mod:`si_compress.quant.primitives`; power-of-two formats: :mod:`si_compress.quant.pow2`.
"""
from __future__ import annotations

import copy
import math
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pow2 import POT_MAX_BITS, pow2_fake_quantize
from .primitives import (
    _check_choice,
    _set_submodule,
    calibrate_scale,
    check_bits,
    fake_quantize,
    qrange,
)

WEIGHT_FORMATS = ("int", "pot", "apot2")

__all__ = [
    "ActivationQuantizer",
    "FakeQuantConv2d",
    "FakeQuantLinear",
    "calibrating",
    "find_conv_bn_pairs",
    "first_conv_last_linear",
    "fold_bn",
    "fold_bn_model",
    "prepare_qat",
]


# --------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """New Conv2d (with bias) equal to ``bn(conv(x))`` in eval mode.

    w' = w * g,  b' = (b - mean) * g + beta,  g = gamma / sqrt(running_var + eps), per output
    channel. Computed in float64, stored in the conv's dtype. Inputs are not modified.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d; got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be an nn.BatchNorm2d; got {type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn has {bn.num_features} features but conv has {conv.out_channels} output channels")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False); it cannot be folded "
                         "because its output depends on the batch")
    with torch.no_grad():
        w = conv.weight.double()
        b = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64,
                                                                        device=w.device)
        g = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.affine:
            g = g * bn.weight.double()
            beta = bn.bias.double()
        else:
            beta = torch.zeros_like(g)
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                           padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        folded.weight.copy_(w * g.view(-1, 1, 1, 1))
        folded.bias.copy_((b - bn.running_mean.double()) * g + beta)
    folded.train(conv.training)
    return folded


_CONV_NAME = re.compile(r"conv(.*)")


def _is_foldable_conv(m) -> bool:
    return isinstance(m, nn.Conv2d) and not isinstance(m, FakeQuantConv2d)


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs that :func:`fold_bn_model` folds by the naming rule.

    Pairing rule, per parent module (the two must be direct children of the same parent):
      1. in an nn.Sequential, a Conv2d immediately followed by a BatchNorm2d;
      2. children named ``conv<K>`` and ``bn<K>`` with the same suffix K (``conv1``/``bn1``,
         ``conv``/``bn``, ``conv_a``/``bn_a``), as in CIFAR and torchvision ResNets.
    Both rules also require ``bn.num_features == conv.out_channels``. Rule 2 trusts that the
    parent's forward computes ``bnK(convK(x))`` with nothing in between; pass ``example_input``
    to :func:`fold_bn_model` to pair by traced data flow instead (needed for pre-activation
    blocks, where ``bn1`` runs before ``conv1``).
    """
    pairs: list[tuple[str, str]] = []
    used: set[int] = set()
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = list(parent.named_children())
        candidates = []
        if isinstance(parent, nn.Sequential):
            candidates += [(children[i], children[i + 1]) for i in range(len(children) - 1)]
        by_name = dict(children)
        for name, child in children:
            match = _CONV_NAME.fullmatch(name)
            if match and f"bn{match.group(1)}" in by_name:
                bn_name = f"bn{match.group(1)}"
                candidates.append(((name, child), (bn_name, by_name[bn_name])))
        for (cname, conv), (bname, bn) in candidates:
            if (_is_foldable_conv(conv) and isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels
                    and id(conv) not in used and id(bn) not in used):
                used.update((id(conv), id(bn)))
                pairs.append((prefix + cname, prefix + bname))
    return pairs


def _traced_conv_bn_pairs(model: nn.Module, example_input) -> list[tuple[str, str]]:
    """Pairs where the bn's input is the very tensor the conv returned, unmodified (one call each)."""
    names = {id(m): n for n, m in model.named_modules()}
    calls: dict[int, int] = {}
    produced: dict[int, tuple[str, int]] = {}  # id(output tensor) -> (conv name, version)
    found: list[tuple[str, str]] = []
    keep_alive = []  # hold conv outputs so their ids are not reused during the trace

    def conv_hook(mod, inp, out):
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        keep_alive.append(out)
        produced[id(out)] = (names[id(mod)], out._version)

    def bn_hook(mod, inp):
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        t = inp[0]
        hit = produced.get(id(t))
        if hit is not None and hit[1] == t._version:  # an in-place op in between changes the version
            found.append((hit[0], names[id(mod)]))

    handles = []
    try:
        for m in model.modules():
            if _is_foldable_conv(m):
                handles.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, nn.BatchNorm2d):
                handles.append(m.register_forward_pre_hook(bn_hook))
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    return [(c, b) for c, b in found
            if calls[id(modules[c])] == 1 and calls[id(modules[b])] == 1
            and modules[b].num_features == modules[c].out_channels]


def fold_bn_model(model: nn.Module, *, example_input: Tensor | None = None, inplace: bool = False,
                  atol: float = 1e-4) -> nn.Module:
    """Fold every Conv2d -> BatchNorm2d pair: the conv becomes the folded conv, the bn nn.Identity.

    Pairs come from :func:`find_conv_bn_pairs` (naming rule), or, when ``example_input`` is given,
    from tracing one forward pass: a pair is folded only if the bn consumes the conv's output
    tensor unmodified and each runs once; the folded model is then checked against the original
    on that input (eval mode) and a ValueError is raised if the max abs difference exceeds
    ``atol`` times the output's max magnitude (e.g. a conv output also used elsewhere). Works on a
    deep copy unless ``inplace``; the result keeps the input's train/eval flag. Folding uses the
    running statistics, so it reproduces eval-mode outputs only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    was_training = target.training
    reference = None
    if example_input is not None:
        target.eval()
        pairs = _traced_conv_bn_pairs(target, example_input)
        with torch.no_grad():
            reference = target(example_input)
    else:
        pairs = find_conv_bn_pairs(target)
    modules = dict(target.named_modules())
    for conv_name, bn_name in pairs:
        _set_submodule(target, conv_name, fold_bn(modules[conv_name], modules[bn_name]))
        _set_submodule(target, bn_name, nn.Identity())
    if reference is not None and isinstance(reference, Tensor):
        with torch.no_grad():
            out = target(example_input)
        err = (out - reference).abs().max().item()
        tol = atol * max(1.0, reference.abs().max().item())
        if err > tol:
            raise ValueError(f"folding changed the model's output by {err:.3g} (> {tol:.3g}); a folded conv's "
                             "output is probably used by more than its BatchNorm. Fold those pairs by hand.")
    target.train(was_training)
    return target


# --------------------------------------------------------------------------------------------
# fake-quant modules (PTQ and QAT)
# --------------------------------------------------------------------------------------------
class ActivationQuantizer(nn.Module):
    """Per-tensor activation fake quantizer with a running min-max observer.

    While ``observing`` (see :func:`calibrating`), each forward widens the running [min, max];
    afterwards the range is frozen. The grid is unsigned [0, 2**bits - 1] if the observed min is
    >= 0 (post-ReLU inputs keep all bits), else signed restricted-range. Scale = range / qmax.
    """

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = check_bits(bits, name="act_bits")
        self.observing = False
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    @property
    def signed(self) -> bool:
        return bool(self.min_val < 0)

    def scale(self) -> Tensor:
        """0-d scale from the observed range."""
        if not self.calibrated:
            raise RuntimeError("activation range not calibrated: run a few batches through the model inside "
                               "`with calibrating(model):` first")
        _, qmax = qrange(self.bits, signed=self.signed)
        amax = torch.maximum(self.max_val.abs(), self.min_val.abs()) if self.signed else self.max_val
        return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            with torch.no_grad():
                self.min_val.copy_(torch.minimum(self.min_val, x.detach().amin().to(self.min_val)))
                self.max_val.copy_(torch.maximum(self.max_val, x.detach().amax().to(self.max_val)))
        return fake_quantize(x, self.scale(), self.bits, signed=self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, observing={self.observing}"


def _fake_quant_weight(w: Tensor, *, bits: int, method: str, fmt: str) -> Tensor:
    if fmt == "int":
        scale = calibrate_scale(w, bits, method=method, axis=0)
        return fake_quantize(w, scale, bits, axis=0)
    return pow2_fake_quantize(w, bits=bits, variant=fmt, method=method)


def _check_weight_options(bits, method, fmt) -> int:
    _check_choice(fmt, WEIGHT_FORMATS, "weight_format")
    _check_choice(method, ("minmax", "mse"), "weight_method")
    if fmt == "pot":
        return check_bits(bits, name="weight_bits", high=POT_MAX_BITS)
    return check_bits(bits, name="weight_bits")


class FakeQuantConv2d(nn.Conv2d):
    """Conv2d with fake-quantized per-output-channel weights and per-tensor input activations.

    weight_format: "int" (``weight_bits`` signed grid), "pot" or "apot2" (power-of-two codebooks
    of :mod:`si_compress.quant.pow2`). weight_method: "minmax" or "mse" per-channel scales,
    recomputed from the current weights each forward (so QAT tracks them). Gradients reach the
    weights through the STE.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, weight_bits: int = 8,
                 act_bits: int = 8, weight_method: str = "minmax", weight_format: str = "int"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.weight_bits = _check_weight_options(weight_bits, weight_method, weight_format)
        self.weight_method = weight_method
        self.weight_format = weight_format
        self.act_quant = ActivationQuantizer(act_bits)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, *, weight_bits: int = 8, act_bits: int = 8,
                   weight_method: str = "minmax", weight_format: str = "int") -> "FakeQuantConv2d":
        """Copy of ``conv`` (weights shared by value, not reference) with fake quantization."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d; got {type(conv).__name__}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, conv.weight.device, conv.weight.dtype,
                  weight_bits=weight_bits, act_bits=act_bits, weight_method=weight_method,
                  weight_format=weight_format)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.train(conv.training)
        return new

    def quantized_weight(self) -> Tensor:
        return _fake_quant_weight(self.weight, bits=self.weight_bits, method=self.weight_method,
                                  fmt=self.weight_format)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.act_quant(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_bits={self.weight_bits}, weight_format={self.weight_format!r}, "
                f"act_bits={self.act_quant.bits}")


class FakeQuantLinear(nn.Linear):
    """Linear layer with fake-quantized per-output-row weights and per-tensor input activations.

    Options as in :class:`FakeQuantConv2d`.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, weight_bits: int = 8,
                 act_bits: int = 8, weight_method: str = "minmax", weight_format: str = "int"):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.weight_bits = _check_weight_options(weight_bits, weight_method, weight_format)
        self.weight_method = weight_method
        self.weight_format = weight_format
        self.act_quant = ActivationQuantizer(act_bits)

    @classmethod
    def from_float(cls, linear: nn.Linear, *, weight_bits: int = 8, act_bits: int = 8,
                   weight_method: str = "minmax", weight_format: str = "int") -> "FakeQuantLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                  linear.weight.dtype, weight_bits=weight_bits, act_bits=act_bits, weight_method=weight_method,
                  weight_format=weight_format)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.train(linear.training)
        return new

    def quantized_weight(self) -> Tensor:
        return _fake_quant_weight(self.weight, bits=self.weight_bits, method=self.weight_method,
                                  fmt=self.weight_format)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act_quant(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_bits={self.weight_bits}, weight_format={self.weight_format!r}, "
                f"act_bits={self.act_quant.bits}")


def first_conv_last_linear(model: nn.Module) -> tuple[str | None, str | None]:
    """Names of the first Conv2d and the last Linear in registration order (None if absent)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (convs[0] if convs else None), (linears[-1] if linears else None)


def prepare_qat(model: nn.Module, *, weight_bits: int = 4, act_bits: int = 8, first_last_bits: int | None = 8,
                weight_method: str = "minmax", weight_format: str = "int", inplace: bool = False) -> nn.Module:
    """Swap every Conv2d / Linear for FakeQuantConv2d / FakeQuantLinear, for PTQ or QAT.

    The first Conv2d and the last Linear (registration order, which is execution order for
    the usual CNNs) use ``first_last_bits`` for weights and activations with the "int" format
    (None: same options as the rest). Fold BatchNorms first (:func:`fold_bn_model`). Then:
    PTQ: ``with calibrating(m): run batches``, then ``m.eval()``; QAT: calibrate the same way, then
    train (activation ranges stay frozen, weight scales follow the weights). Deep copy unless
    ``inplace``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    _check_weight_options(weight_bits, weight_method, weight_format)
    check_bits(act_bits, name="act_bits")
    if first_last_bits is not None:
        check_bits(first_last_bits, name="first_last_bits")
    target = model if inplace else copy.deepcopy(model)
    first, last = first_conv_last_linear(target)
    swaps = []
    for name, m in target.named_modules():
        if isinstance(m, (FakeQuantConv2d, FakeQuantLinear)) or not name:
            continue
        edge = first_last_bits is not None and name in (first, last)
        opts = dict(weight_bits=first_last_bits if edge else weight_bits,
                    act_bits=first_last_bits if edge else act_bits,
                    weight_method=weight_method, weight_format="int" if edge else weight_format)
        if isinstance(m, nn.Conv2d):
            swaps.append((name, FakeQuantConv2d.from_float(m, **opts)))
        elif isinstance(m, nn.Linear):
            swaps.append((name, FakeQuantLinear.from_float(m, **opts)))
    for name, new in swaps:
        _set_submodule(target, name, new)
    return target


@contextmanager
def calibrating(model: nn.Module):
    """Within the block, observers of ``model`` record activation ranges; on exit they freeze.

    Applies to every submodule with a boolean ``observing`` attribute (ActivationQuantizer,
    ShiftAddConv2d, ShiftAddLinear). Wrap the batches in ``torch.no_grad()`` yourself.
    """
    observers = [m for m in model.modules() if isinstance(getattr(m, "observing", None), bool)]
    for m in observers:
        m.observing = True
    try:
        yield model
    finally:
        for m in observers:
            m.observing = False
