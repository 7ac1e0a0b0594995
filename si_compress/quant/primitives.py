"""Quantization primitives: integer grids, scale calibration, (fake) quantization, fixed-point formats.

Conventions (used by every function here):

* A real value ``x`` is stored as an integer ``q = clamp(round(x / scale), qmin, qmax)`` and read
  back as ``q * scale``. The zero point is always 0 (symmetric quantization).
* Signed grids are restricted-range: ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (int8 is
  [-127, 127]), so the grid is symmetric and ``-q`` never overflows. Unsigned grids
  (``signed=False``, for non-negative activations such as post-ReLU maps) are ``[0, 2**bits - 1]``.
* Rounding is round-half-to-even (``torch.round``), the IEEE default, so ties do not bias sums.
* Out-of-range values saturate at ``qmin``/``qmax``.
* Per-channel scales have shape ``(C,)`` and name the channel axis with ``axis=``; per-tensor
  scales are 0-d tensors.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MIN_BITS = 2
MAX_BITS = 8
CALIBRATION_METHODS = ("minmax", "percentile", "mse")
POW2_ROUNDING = ("ceil", "floor", "nearest")

__all__ = [
    "QuantSpec",
    "calibrate_scale",
    "check_bits",
    "dequantize",
    "fake_quantize",
    "fixed_point_format",
    "pow2_scale",
    "qrange",
    "quantize",
]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def check_bits(bits, *, name: str = "bits", low: int = MIN_BITS, high: int = MAX_BITS) -> int:
    """``bits`` as an int in [low, high]; ValueError otherwise (including bools and floats)."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(f"{name} must be an integer in [{low}, {high}]; got {bits!r}")
    if not low <= int(bits) <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]; got {bits}")
    return int(bits)


def _check_choice(value, choices, name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_float_tensor(x, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__} (wrap arrays with torch.as_tensor)")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); calibration needs at least one value")
    return x


def _normalize_axis(axis, ndim: int, name: str = "axis"):
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ValueError(f"{name} must be an int or None; got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for a tensor with {ndim} dimension(s)")
    return int(axis) % ndim


def qrange(bits: int, *, signed: bool = True) -> tuple[int, int]:
    """Integer range (qmin, qmax): signed ``[-(2**(b-1) - 1), 2**(b-1) - 1]``, unsigned ``[0, 2**b - 1]``."""
    bits = check_bits(bits)
    if signed:
        hi = 2 ** (bits - 1) - 1
        return -hi, hi
    return 0, 2**bits - 1


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    bits: 2..8. signed: signed restricted-range grid, or unsigned [0, 2**bits - 1] for
    non-negative data. Both have zero point 0 (symmetric). axis: channel axis for per-channel
    scales, or None for one scale. method/percentile: see :func:`calibrate_scale`.
    """

    bits: int = 8
    signed: bool = True
    axis: int | None = None
    method: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self):
        check_bits(self.bits)
        if not isinstance(self.signed, bool):
            raise ValueError(f"signed must be True or False; got {self.signed!r}")
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, numbers.Integral)):
            raise ValueError(f"axis must be an int (the channel axis) or None (per-tensor); got {self.axis!r}")
        _check_choice(self.method, CALIBRATION_METHODS, "method")
        _check_percentile(self.percentile)

    @property
    def qmin(self) -> int:
        return qrange(self.bits, signed=self.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, signed=self.signed)[1]

    def calibrate(self, x: Tensor) -> Tensor:
        """Scale for ``x``: shape () or (x.shape[axis],)."""
        return calibrate_scale(x, self.bits, method=self.method, axis=self.axis, percentile=self.percentile,
                               signed=self.signed)

    def quantize(self, x: Tensor, scale) -> Tensor:
        return quantize(x, scale, self.bits, signed=self.signed, axis=self.axis)

    def dequantize(self, q: Tensor, scale) -> Tensor:
        return dequantize(q, scale, axis=self.axis)

    def fake_quantize(self, x: Tensor, scale) -> Tensor:
        return fake_quantize(x, scale, self.bits, signed=self.signed, axis=self.axis)


def _check_percentile(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < float(p) <= 100.0:
        raise ValueError(f"percentile must be a number in (0, 100]; got {p!r}")
    return float(p)


# --------------------------------------------------------------------------------------------
# calibration and (fake) quantization
# --------------------------------------------------------------------------------------------
def _channel_rows(x: Tensor, axis) -> Tensor:
    """x as (C, -1) with channels on rows (C = 1 when axis is None), at least float32."""
    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)


def calibrate_scale(x: Tensor, bits: int, *, method: str = "minmax", axis: int | None = None,
                    percentile: float = 99.99, signed: bool = True, grid: int = 100) -> Tensor:
    """Quantization scale for ``x`` so that ``x ≈ scale * q`` with q on the ``bits`` grid.

    method:
      * "minmax": ``scale = max|x| / qmax`` (no clipping).
      * "percentile": ``max|x|`` replaced by the ``percentile``-th percentile of ``|x|``
        (clips rare outliers).
      * "mse": ``scale = r * max|x| / qmax`` with r among ``grid`` evenly spaced ratios in
        (0, 1], the one with the smallest mean squared quantization error. Since r = 1 is a
        candidate, the error is never above the minmax error and the scale never above it.
    For ``signed=False`` the magnitude is ``max(x, 0)``. Returns a 0-d tensor, or shape
    ``(x.shape[axis],)`` when ``axis`` is given. All-zero channels get scale 1.
    """
    x = _check_float_tensor(x)
    bits = check_bits(bits)
    _check_choice(method, CALIBRATION_METHODS, "method")
    axis = _normalize_axis(axis, x.ndim)
    percentile = _check_percentile(percentile)
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 1:
        raise ValueError(f"grid must be a positive integer (number of clipping ratios tried); got {grid!r}")
    rows = _channel_rows(x, axis)
    if not torch.isfinite(rows).all():
        raise ValueError("x contains NaN or infinite values; a scale cannot be calibrated from them")
    qmin, qmax = qrange(bits, signed=signed)
    mag = rows.abs() if signed else rows.clamp(min=0)
    if method == "percentile":
        n = mag.shape[1]
        # kthvalue rather than torch.quantile: quantile refuses inputs above 2**24 elements.
        k = min(n, max(1, math.ceil(percentile / 100.0 * n)))
        amax = mag.kthvalue(k, dim=1).values
    else:
        amax = mag.amax(dim=1)
    scale = amax / qmax
    if method == "mse":
        best_err = torch.full_like(scale, math.inf)
        best = scale.clone()
        for r in torch.linspace(1.0 / grid, 1.0, grid).tolist():
            s = torch.where(scale > 0, scale * r, torch.ones_like(scale)).unsqueeze(1)
            err = ((torch.round(rows / s).clamp(qmin, qmax) * s - rows) ** 2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s.squeeze(1), best)
        scale = best
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.reshape(()) if axis is None else scale


def _broadcast_scale(scale, x: Tensor, axis) -> Tensor:
    """scale as a tensor broadcastable against x (per-channel scales need ``axis``)."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    s = torch.as_tensor(scale, dtype=dtype, device=x.device)
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError("scale must be finite and > 0; calibrate it with calibrate_scale()")
    if s.numel() == 1:
        return s.reshape(())
    axis = _normalize_axis(axis, x.ndim)
    if axis is None:
        raise ValueError(f"scale has {s.numel()} values but axis=None; pass axis= (the channel axis of x) "
                         "for per-channel scales")
    if s.numel() != x.shape[axis]:
        raise ValueError(f"scale has {s.numel()} values but x has {x.shape[axis]} channels on axis {axis}")
    shape = [1] * x.ndim
    shape[axis] = -1
    return s.reshape(shape)


def quantize(x: Tensor, scale, bits: int, *, signed: bool = True, axis: int | None = None) -> Tensor:
    """int32 tensor ``clamp(round_half_even(x / scale), qmin, qmax)`` (saturating), shape of x."""
    x = _check_float_tensor(x)
    qmin, qmax = qrange(bits, signed=signed)
    s = _broadcast_scale(scale, x, axis)
    return torch.round(x / s).clamp_(qmin, qmax).to(torch.int32)


def dequantize(q: Tensor, scale, *, axis: int | None = None) -> Tensor:
    """Float tensor ``q * scale`` (float32 unless scale is float64)."""
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor; got {type(q).__name__}")
    s = torch.as_tensor(scale, device=q.device)
    dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    qf = q.to(dtype)
    return qf * _broadcast_scale(s.to(dtype), qf, axis)


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize with a clipped straight-through estimator.

    d out / d x = 1 where qmin * scale <= x <= qmax * scale, else 0: rounding is treated as the
    identity, saturation as a constant. No gradient flows to the scale.
    """

    @staticmethod
    def forward(ctx, x, s, qmin, qmax):
        inside = (x >= qmin * s) & (x <= qmax * s)
        ctx.save_for_backward(inside)
        return torch.round(x / s).clamp(qmin, qmax) * s

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None


def fake_quantize(x: Tensor, scale, bits: int, *, signed: bool = True, axis: int | None = None) -> Tensor:
    """``dequantize(quantize(x))`` in x's dtype, differentiable with a clipped STE (see module doc)."""
    x = _check_float_tensor(x)
    qmin, qmax = qrange(bits, signed=signed)
    s = _broadcast_scale(scale, x, axis).detach()
    return _FakeQuantSTE.apply(x, s, qmin, qmax)


# --------------------------------------------------------------------------------------------
# fixed-point (Qm.n) view
# --------------------------------------------------------------------------------------------
def _scalar(scale, name: str = "scale") -> float:
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{name} must be a single value; got a tensor with {scale.numel()} values "
                             "(call this once per channel)")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"{name} must be a real number; got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name} must be finite and > 0; got {scale}")
    return scale


def fixed_point_format(scale, bits: int, *, signed: bool = True) -> tuple[int, int]:
    """(m, n) of the Qm.n format equal to a ``bits`` grid with ``scale = 2**-n``.

    Signed: 1 sign bit + m integer bits + n fractional bits (m = bits - 1 - n, ARM notation).
    Unsigned (UQm.n): m = bits - n. m or n may be negative (e.g. all-fractional weights with
    n > bits - 1 give m < 0). Raises ValueError when ``scale`` is not a power of two; round it
    with :func:`pow2_scale` first.
    """
    bits = check_bits(bits)
    s = _scalar(scale)
    mant, exp = math.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    if mant != 0.5:
        raise ValueError(f"scale={s!r} is not a power of two; round it with pow2_scale(scale) first")
    n = 1 - exp
    m = bits - 1 - n if signed else bits - n
    return m, n


def pow2_scale(scale, *, rounding: str = "ceil") -> Tensor:
    """Round positive scale(s) to powers of two (float32 tensor, same shape).

    rounding: "ceil" (default: never smaller, so calibrated data never saturates on the
    coarser grid), "floor", or "nearest" in the log domain (threshold 2**(k - 1/2)).
    """
    _check_choice(rounding, POW2_ROUNDING, "rounding")
    s = torch.as_tensor(scale, dtype=torch.float64)
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError("scale must be finite and > 0")
    mant, exp = torch.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    exact = mant == 0.5
    if rounding == "floor":
        k = exp - 1
    elif rounding == "ceil":
        k = torch.where(exact, exp - 1, exp)
    else:
        k = torch.where(mant >= math.sqrt(0.5), exp, exp - 1)
    return torch.ldexp(torch.ones_like(s), k).to(torch.float32)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)

