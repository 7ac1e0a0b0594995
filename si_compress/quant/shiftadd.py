"""Shift-add layers: power-of-two weights (:mod:`si_compress.quant.pow2`), power-of-two activation
scales, integer Numba kernels (:mod:`si_compress.quant._kernels`).

Activations: signed int (restricted range) or unsigned int with a power-of-two scale (rounded up
from max / qmax), i.e. a Qm.n fixed-point format; unsigned when the calibrated minimum is >= 0.

Output: ``y = acc * (scale_w[c] * scale_x) + bias`` with the integer accumulator ``acc`` (exact), in
float64 then cast to the input dtype. The bias is added in float (not quantized).
"""
from __future__ import annotations

import copy
import math
import numbers
import threading

import numpy as np
import torch
from torch import Tensor, nn

from .fakequant import first_conv_last_linear
from .pow2 import (
    POT_MAX_BITS,
    VARIANTS,
    WEIGHT_METHODS,
    Pow2Codebook,
    PowerOfTwoWeight,
    _check_variant_bits,
    pow2_codebook,
    pow2_fake_quantize,
    quantize_pow2_weight,
)
from .primitives import _check_choice, _check_float_tensor, _set_submodule, check_bits, pow2_scale, qrange, quantize

_ACC_LIMIT = 2**63 - 1

__all__ = [
    "POT_MAX_BITS",
    "VARIANTS",
    "Pow2Codebook",
    "PowerOfTwoWeight",
    "ShiftAddConv2d",
    "ShiftAddLinear",
    "conv2d_mul",
    "conv2d_shift",
    "convert_to_shiftadd",
    "linear_mul",
    "linear_shift",
    "pow2_codebook",
    "pow2_fake_quantize",
    "quantize_pow2_weight",
]


# --------------------------------------------------------------------------------------------
# kernel wrappers (numpy in, numpy out)
# --------------------------------------------------------------------------------------------
def _kernels():
    from . import _kernels as k  # lazy: numba is heavy

    return k


def _pair(v, name: str, *, minimum: int) -> tuple[int, int]:
    vals = (v, v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else tuple(v)
    if len(vals) != 2 or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) or a < minimum for a in vals):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them; got {v!r}")
    return int(vals[0]), int(vals[1])


def conv_padding(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding from an int, a pair, a 4-tuple, "valid" or "same"
    ("same" puts the extra pixel at the bottom/right, as torch does)."""
    kh, kw = kernel_size
    dh, dw = dilation
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return th // 2, th - th // 2, tw // 2, tw - tw // 2
        raise ValueError(f"padding must be an int, a tuple, 'valid' or 'same'; got {padding!r}")
    if not isinstance(padding, numbers.Integral) and len(padding) == 4:
        vals = tuple(padding)
        if any(isinstance(a, bool) or not isinstance(a, numbers.Integral) or a < 0 for a in vals):
            raise ValueError(f"padding values must be ints >= 0; got {padding!r}")
        return tuple(int(a) for a in vals)
    ph, pw = _pair(padding, "padding", minimum=0)
    return ph, ph, pw, pw


def _int_activations(x, ndim: int, name: str = "x", dtype=np.int32) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array (quantize activations first); got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {x.shape}")
    if x.size and not np.can_cast(x.dtype, np.int32) and (x.min() < np.iinfo(np.int32).min
                                                          or x.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} values must fit in int32")
    return np.ascontiguousarray(x, dtype=dtype)


def _max_abs(x: np.ndarray) -> int:
    return max(abs(int(x.min())), abs(int(x.max()))) if x.size else 0


def _check_headroom(max_x: int, max_abs_weight: int, fan_in: int) -> None:
    """Refuse inputs whose worst-case accumulator could overflow int64 (max_x: max |x|)."""
    if max_x * max_abs_weight * fan_in > _ACC_LIMIT:
        raise ValueError(f"worst-case accumulator {max_x} * {max_abs_weight} * {fan_in} overflows int64; "
                         "use fewer activation bits or a smaller exponent range")


def _shift_weights(shifts, signs, ndim: int) -> tuple[np.ndarray, np.ndarray, int]:
    shifts = np.asarray(shifts)
    signs = np.asarray(signs)
    if shifts.ndim != ndim + 1 or signs.ndim != ndim or shifts.shape[1:] != signs.shape:
        raise ValueError(f"shifts must be (n_terms, *signs.shape) with signs {ndim}-D; got {shifts.shape} "
                         f"and {signs.shape}")
    if shifts.size and (shifts.min() < -1 or shifts.max() > 62):
        raise ValueError("shifts must be in [-1, 62] (-1 marks an absent term)")
    if signs.size and (signs.min() < -1 or signs.max() > 1):
        raise ValueError("signs must be in {-1, 0, 1}")
    max_w = sum(2 ** int(s.max()) for s in shifts if s.size and s.max() >= 0)
    return (np.ascontiguousarray(shifts, dtype=np.int8), np.ascontiguousarray(signs, dtype=np.int8), max_w)


def _conv_geometry(x_shape, w_shape, stride, padding, dilation, groups):
    n, c, h, w = x_shape
    co, cg, kh, kw = w_shape
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive integer; got {groups!r}")
    if c != cg * groups or co % groups:
        raise ValueError(f"x has {c} channels and the weight is {w_shape} with groups={groups}; need "
                         f"in_channels == weight.shape[1] * groups and out_channels divisible by groups")
    sh, sw = _pair(stride, "stride", minimum=1)
    dh, dw = _pair(dilation, "dilation", minimum=1)
    pt, pb, pl, pr = conv_padding(padding, (kh, kw), (dh, dw))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{w} with padding {(pt, pb, pl, pr)} is smaller than the dilated kernel "
                         f"{dh * (kh - 1) + 1}x{dw * (kw - 1) + 1}")
    return sh, sw, pt, pb, pl, pr, dh, dw, int(groups), oh, ow


def _acc_dtype(x: np.ndarray, row_abs_sums: np.ndarray, max_x: int | None = None):
    """int32 when the worst-case accumulator ``max|x| * max_c sum_k |w[c, k]|`` fits in int32, else int64.

    Every partial sum the kernels form is bounded by that worst case, so int32 never wraps. The bound
    is computed in float64 (relative error far below the 1e-6 margin kept). ``max_x``: max|x| if known."""
    max_x = float(_max_abs(x) if max_x is None else max_x)
    bound = max_x * (float(row_abs_sums.max()) if row_abs_sums.size else 0.0)
    return np.int32 if bound <= np.iinfo(np.int32).max * (1 - 1e-6) else np.int64


def _shift_row_abs_sums(shifts: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """sum_k |w[c, k]| per output channel, float64 (Co,)."""
    c = signs.shape[0]
    mag = np.where(shifts >= 0, np.exp2(shifts.astype(np.float64)), 0.0).reshape(shifts.shape[0], c, -1).sum(axis=0)
    return np.where(signs.reshape(c, -1) != 0, mag, 0.0).sum(axis=1)


_SCRATCH = threading.local()


def _scratch(shape, dtype, key: str = "cols") -> np.ndarray:
    """A reused, grow-only scratch array of ``shape`` (per calling thread, dtype and ``key``): a fresh
    allocation per call costs page faults comparable to the convolution itself."""
    cache = _SCRATCH.__dict__.setdefault("buffers", {})
    size = int(np.prod(shape))
    buf = cache.get((key, np.dtype(dtype)))
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=dtype)
        cache[(key, np.dtype(dtype))] = buf
    return buf[:size].reshape(shape)


def _num_threads() -> int:
    import numba

    return numba.get_num_threads()


def _padded(x, w_shape, geo, dtype):
    """x zero-padded (only as far as the kernel reads) in the accumulator dtype."""
    sh, sw, pt, pb, pl, pr, dh, dw, groups, oh, ow = geo
    h_need = (oh - 1) * sh + dh * (w_shape[2] - 1) + 1
    w_need = (ow - 1) * sw + dw * (w_shape[3] - 1) + 1
    xp = np.zeros((x.shape[0], x.shape[1], h_need, w_need), dtype=dtype)
    hs, ws = min(x.shape[2], h_need - pt), min(x.shape[3], w_need - pl)
    xp[:, :, pt:pt + hs, pl:pl + ws] = x[:, :, :hs, :ws]
    return xp


def _conv_tiles(k_size: int, n_q: int, direct: bool = False):
    """(tile, n_chunks): output pixels per job and parallel chunks (one scratch buffer each)."""
    n_threads = _num_threads()
    tile = _kernels().tile_pixels(k_size, n_q, n_threads, direct)
    return tile, min(n_threads, -(-n_q // tile))


def _run_conv_shift(x, max_x, shifts, signs, w_shape, geo):
    k = _kernels()
    sh, sw, pt, pb, pl, pr, dh, dw, groups, oh, ow = geo
    c = w_shape[0]
    k_size = int(np.prod(w_shape[1:]))
    pptr, pd, pneg, pn, prow, elast, row_sums = k.shift_passes(
        np.ascontiguousarray(shifts.reshape(shifts.shape[0], c, -1)), np.ascontiguousarray(signs.reshape(c, -1)), k_size)
    dtype = _acc_dtype(x, row_sums, max_x)
    pd = pd.astype(dtype)
    n = x.shape[0]
    out = np.empty((n, c, oh, ow), dtype=np.int64)
    # no im2col: the passes read a phase-split (C, SH * SW, Hph, Wph, N) padded copy in place (conv2d_shift_direct)
    hph = oh + (w_shape[2] - 1) * dh // sh
    wph = ow + (w_shape[3] - 1) * dw // sw
    tile, n_chunks = _conv_tiles(k_size, oh * wph * n, direct=True)
    tile = max(1, tile // n) * n  # whole pixels (all N images) per tile
    n_chunks = min(n_chunks, -(-oh * wph * n // tile))
    size = x.shape[1] * sh * sw * hph * wph * n
    xf = _scratch((size + tile + (w_shape[3] - 1) * dw // sw * n,), dtype, "input")
    xf.fill(0)
    k.fill_phases(xf[:size].reshape(x.shape[1], sh, sw, hph, wph, n), x, pt, pl)
    k.conv2d_shift_direct(xf, pptr, pd, pneg, pn, prow, elast, out.reshape(n, c, oh * ow), x.shape[1], hph, wph,
                          w_shape[2], w_shape[3], sh, sw, dh, dw, groups, tile, n_chunks,
                          _scratch((n_chunks, c // groups, tile), dtype, "acc"))
    return out


def _run_conv_mul(x, max_x, weight, geo):
    k = _kernels()
    sh, sw, pt, pb, pl, pr, dh, dw, groups, oh, ow = geo
    ks, ws, n_all = k.mul_terms(np.ascontiguousarray(weight.reshape(weight.shape[0], -1)))
    dtype = _acc_dtype(x, np.abs(weight.astype(np.float64)).reshape(weight.shape[0], -1).sum(axis=1), max_x)
    xp = _padded(x, weight.shape, geo, dtype)
    n = x.shape[0]
    out = np.zeros((weight.shape[0], n * oh * ow), dtype=dtype)
    k_size = int(np.prod(weight.shape[1:]))
    tile, n_chunks = _conv_tiles(k_size, n * oh * ow)
    k.conv2d_mul_terms(xp, ks, ws.astype(dtype), n_all, out, weight.shape[2], weight.shape[3], sh, sw, dh, dw, groups,
                       oh, ow, _scratch((n_chunks, k_size, tile), dtype))
    res = np.empty((n, weight.shape[0], oh, ow), dtype=np.int64)
    res[...] = out.reshape(weight.shape[0], n, oh, ow).transpose(1, 0, 2, 3)
    return res


def _run_linear(x, terms, is_shift, row_sums):
    k = _kernels()
    dtype = _acc_dtype(x, row_sums)
    ks, vals, n_pos, n_all = terms
    xt = np.ascontiguousarray(x.T, dtype=dtype)
    out = np.zeros((ks.shape[0], x.shape[0]), dtype=dtype)
    tile = k.tile_pixels(1, x.shape[0], _num_threads())
    k.linear_terms(xt, ks, vals.astype(dtype), n_pos, n_all, is_shift, out, tile)
    return np.ascontiguousarray(out.T, dtype=np.int64)  # C order: the next float layer sees the usual layout


def _mul_term_lists(weight: np.ndarray):
    ks, ws, n_all = _kernels().mul_terms(np.ascontiguousarray(weight.reshape(weight.shape[0], -1)))
    return ks, ws, n_all, n_all


def _shift_term_lists(shifts: np.ndarray, signs: np.ndarray):
    c = signs.shape[0]
    return _kernels().shift_terms(np.ascontiguousarray(shifts.reshape(shifts.shape[0], c, -1)),
                                  np.ascontiguousarray(signs.reshape(c, -1)))


def conv2d_shift(x, shifts, signs, *, stride=1, padding=0, dilation=1, groups: int = 1) -> np.ndarray:
    """Shift-add conv2d on integers: x (N, C, H, W) int, shifts (T, Co, C/groups, KH, KW) (-1 = absent),
    signs (Co, C/groups, KH, KW) -> (N, Co, OH, OW) int64, equal to the conv with the integer weight
    ``signs * sum_t 2**shifts[t]``. Zero padding: int, pair, 4-tuple (top, bottom, left, right), "same"/"valid"."""
    x = _int_activations(x, 4)
    shifts, signs, max_w = _shift_weights(shifts, signs, 4)
    geo = _conv_geometry(x.shape, signs.shape, stride, padding, dilation, groups)
    max_x = _max_abs(x)
    _check_headroom(max_x, max_w, int(np.prod(signs.shape[1:])))
    return _run_conv_shift(x, max_x, shifts, signs, signs.shape, geo)


def conv2d_mul(x, weight, *, stride=1, padding=0, dilation=1, groups: int = 1) -> np.ndarray:
    """Integer-multiply reference conv2d (im2col, ``acc += x * w``; the same integers as ``conv2d_shift``):
    weight (Co, C/groups, KH, KW) int."""
    x = _int_activations(x, 4)
    weight = _int_activations(weight, 4, "weight", np.int64)
    geo = _conv_geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    max_x = _max_abs(x)
    _check_headroom(max_x, int(np.abs(weight).max()) if weight.size else 0, int(np.prod(weight.shape[1:])))
    return _run_conv_mul(x, max_x, weight, geo)


def linear_shift(x, shifts, signs) -> np.ndarray:
    """Shift-add linear layer on integers: x (N, K), shifts (T, M, K), signs (M, K) -> (N, M) int64."""
    x = _int_activations(x, 2)
    shifts, signs, max_w = _shift_weights(shifts, signs, 2)
    if x.shape[1] != signs.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but the weight expects {signs.shape[1]}")
    _check_headroom(_max_abs(x), max_w, signs.shape[1])
    return _run_linear(x, _shift_term_lists(shifts, signs), True, _shift_row_abs_sums(shifts, signs))


def linear_mul(x, weight) -> np.ndarray:
    """Integer-multiply reference linear layer: x (N, K), weight (M, K) int -> (N, M) int64."""
    x = _int_activations(x, 2)
    weight = _int_activations(weight, 2, "weight", np.int64)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but the weight expects {weight.shape[1]}")
    _check_headroom(_max_abs(x), int(np.abs(weight).max()) if weight.size else 0, weight.shape[1])
    return _run_linear(x, _mul_term_lists(weight), False, np.abs(weight.astype(np.float64)).sum(axis=1))


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
_NP_PAD_MODE = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


class _ShiftAddBase(nn.Module):
    """Shared weight buffers, activation calibration and rescaling."""

    def _init_quant(self, weight_shape, *, bits, act_bits, variant, bias: bool):
        self.bits = _check_variant_bits(bits, variant)
        self.variant = variant
        self.act_bits = check_bits(act_bits, name="act_bits")
        self.observing = False
        n_terms = pow2_codebook(self.bits, variant=variant).n_terms
        self.register_buffer("weight_shifts", torch.full((n_terms, *weight_shape), -1, dtype=torch.int8))
        self.register_buffer("weight_signs", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(weight_shape[0], dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(weight_shape[0]) if bias else None)
        self.register_buffer("act_min", torch.tensor(math.inf))
        self.register_buffer("act_max", torch.tensor(-math.inf))
        self.register_buffer("act_scale", torch.tensor(0.0, dtype=torch.float64))  # 0 = not calibrated

    def _load_weight(self, weight: Tensor, bias, method: str, act_range) -> None:
        pw = quantize_pow2_weight(weight, bits=self.bits, variant=self.variant, method=method)
        self.weight_shifts.copy_(torch.from_numpy(pw.shifts))
        self.weight_signs.copy_(torch.from_numpy(pw.signs))
        self.weight_scale.copy_(torch.from_numpy(pw.scale))
        if bias is not None:
            self.bias.copy_(bias.detach())
        if act_range is not None:
            self._observe(*act_range)

    def pow2_weight(self) -> PowerOfTwoWeight:
        """The stored weight as a :class:`PowerOfTwoWeight` (numpy copies)."""
        return PowerOfTwoWeight(shifts=self.weight_shifts.cpu().numpy().copy(),
                                signs=self.weight_signs.cpu().numpy().copy(),
                                scale=self.weight_scale.cpu().double().numpy().copy(), bits=self.bits,
                                variant=self.variant)

    def dequantized_weight(self) -> Tensor:
        """Float32 weight the kernel computes with (for a float fake-quant reference)."""
        return self.pow2_weight().dequantize()

    @property
    def calibrated(self) -> bool:
        return bool(self.act_scale > 0)

    @property
    def act_signed(self) -> bool:
        return bool(self.act_min < 0)

    def _observe(self, lo: Tensor, hi: Tensor) -> None:
        self.act_min.copy_(torch.minimum(self.act_min, lo.detach().to(self.act_min)))
        self.act_max.copy_(torch.maximum(self.act_max, hi.detach().to(self.act_max)))
        _, qmax = qrange(self.act_bits, signed=self.act_signed)
        amax = max(abs(self.act_min.item()), abs(self.act_max.item())) if self.act_signed else self.act_max.item()
        self.act_scale.fill_(pow2_scale(amax / qmax if amax > 0 else 1.0, rounding="ceil").item())

    @torch.no_grad()
    def calibrate(self, x: Tensor):
        """Widen the running activation [min, max] with ``x`` and set the power-of-two input scale
        ``2**ceil(log2(max|x| / qmax))``. Call on several batches; returns self."""
        x = _check_float_tensor(x)
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        self._observe(x.amin(), x.amax())
        return self

    def quantize_input(self, x: Tensor) -> Tensor:
        """int32 activations ``clamp(round(x / act_scale))`` on the act_bits grid."""
        if not self.calibrated:
            raise RuntimeError(f"{type(self).__name__} has no activation scale: call .calibrate(x) on sample "
                               "inputs (or run batches inside `with calibrating(model):`) first")
        return quantize(x, self.act_scale, self.act_bits, signed=self.act_signed)

    def _rescale(self, acc: np.ndarray, channel_axis: int, like: Tensor) -> Tensor:
        shape = [1] * acc.ndim
        shape[channel_axis] = -1
        y = acc.astype(np.float64)
        y *= (self.weight_scale.cpu().double().numpy() * float(self.act_scale)).reshape(shape)
        if self.bias is not None:
            y += self.bias.cpu().double().numpy().reshape(shape)
        return torch.from_numpy(y).to(device=like.device, dtype=like.dtype)


class ShiftAddConv2d(_ShiftAddBase):
    """Inference-only Conv2d computed with integer shifts and adds (see the module docstring).

    forward(x (N, C, H, W) float) -> (N, Co, OH, OW) float; no autograd. Activations need a
    calibrated scale: :meth:`calibrate` or :func:`~si_compress.quant.fakequant.calibrating`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", bits: int = 4,
                 act_bits: int = 8, variant: str = "pot"):
        super().__init__()
        kh, kw = _pair(kernel_size, "kernel_size", minimum=1)
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        self.kernel_size = (kh, kw)
        self.stride = _pair(stride, "stride", minimum=1)
        self.dilation = _pair(dilation, "dilation", minimum=1)
        self.padding = conv_padding(padding, self.kernel_size, self.dilation)
        self.padding_mode = _check_choice(padding_mode, ("zeros", *_NP_PAD_MODE), "padding_mode")
        self._init_quant((out_channels, in_channels // groups, kh, kw), bits=bits, act_bits=act_bits,
                         variant=variant, bias=bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, bits: int = 4, act_bits: int = 8, variant: str = "pot",
                  weight_method: str = "minmax") -> "ShiftAddConv2d":
        """Quantize ``conv``'s weights to powers of two. A calibrated FakeQuantConv2d passes on its
        observed input range; otherwise call :meth:`calibrate` before the first forward."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d; got {type(conv).__name__}")
        _check_choice(weight_method, WEIGHT_METHODS, "weight_method")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, bits=bits, act_bits=act_bits, variant=variant)
        new._load_weight(conv.weight, conv.bias, weight_method, _observed_range(conv))
        return new

    def forward(self, x: Tensor) -> Tensor:
        x = _check_float_tensor(x)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W); got shape {tuple(x.shape)}")
        if self.observing:
            self.calibrate(x)
        q = self.quantize_input(x).cpu().numpy()
        padding = self.padding
        if self.padding_mode != "zeros":
            pt, pb, pl, pr = padding
            q = np.pad(q, ((0, 0), (0, 0), (pt, pb), (pl, pr)), mode=_NP_PAD_MODE[self.padding_mode])
            padding = 0
        acc = conv2d_shift(q, self.weight_shifts.cpu().numpy(), self.weight_signs.cpu().numpy(), stride=self.stride,
                           padding=padding, dilation=self.dilation, groups=self.groups)
        return self._rescale(acc, 1, x)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bits={self.bits}, variant={self.variant!r}, "
                f"act_bits={self.act_bits}")


class ShiftAddLinear(_ShiftAddBase):
    """Inference-only Linear layer computed with integer shifts and adds.

    forward(x (..., in_features) float) -> (..., out_features) float; no autograd.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, bits: int = 4, act_bits: int = 8,
                 variant: str = "pot"):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_quant((self.out_features, self.in_features), bits=bits, act_bits=act_bits, variant=variant,
                         bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int = 4, act_bits: int = 8, variant: str = "pot",
                    weight_method: str = "minmax") -> "ShiftAddLinear":
        """As :meth:`ShiftAddConv2d.from_conv`, for an nn.Linear."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        _check_choice(weight_method, WEIGHT_METHODS, "weight_method")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=bits,
                  act_bits=act_bits, variant=variant)
        new._load_weight(linear.weight, linear.bias, weight_method, _observed_range(linear))
        return new

    def forward(self, x: Tensor) -> Tensor:
        x = _check_float_tensor(x)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}); got shape {tuple(x.shape)}")
        if self.observing:
            self.calibrate(x)
        q = self.quantize_input(x).reshape(-1, self.in_features).cpu().numpy()
        acc = linear_shift(q, self.weight_shifts.cpu().numpy(), self.weight_signs.cpu().numpy())
        return self._rescale(acc, 1, x).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"variant={self.variant!r}, act_bits={self.act_bits}")


def _observed_range(module):
    aq = getattr(module, "act_quant", None)
    if aq is not None and getattr(aq, "calibrated", False):
        return aq.min_val, aq.max_val
    return None


def convert_to_shiftadd(model: nn.Module, *, bits: int = 4, act_bits: int = 8, variant: str = "pot",
                        weight_method: str = "minmax", keep_first_last: bool = True,
                        inplace: bool = False) -> nn.Module:
    """Replace Conv2d / Linear layers by ShiftAddConv2d / ShiftAddLinear.

    keep_first_last leaves the first Conv2d and last Linear (registration order) in float, the
    usual choice for shift-add networks. Fold BatchNorms first. Then calibrate activations:
    ``with torch.no_grad(), calibrating(m): m(batch)``. Deep copy unless ``inplace``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    _check_variant_bits(bits, variant)
    check_bits(act_bits, name="act_bits")
    _check_choice(weight_method, WEIGHT_METHODS, "weight_method")
    target = model if inplace else copy.deepcopy(model)
    first, last = first_conv_last_linear(target)
    skip = {first, last} if keep_first_last else set()
    opts = dict(bits=bits, act_bits=act_bits, variant=variant, weight_method=weight_method)
    swaps = []
    for name, m in target.named_modules():
        if not name or name in skip:
            continue
        if isinstance(m, nn.Conv2d):
            swaps.append((name, ShiftAddConv2d.from_conv(m, **opts)))
        elif isinstance(m, nn.Linear):
            swaps.append((name, ShiftAddLinear.from_linear(m, **opts)))
    for name, new in swaps:
        _set_submodule(target, name, new)
    return target
