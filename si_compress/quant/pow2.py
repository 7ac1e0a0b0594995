"""Power-of-two weight formats: codebooks, per-channel power-of-two weights, fake quantization.

Weights (per output channel c, scale ``s_c``):

* ``variant="pot"``: ``w = s_c * sign * 2**e``. With ``bits`` b: 1 sign bit + a (b-1)-bit
  exponent code k in [0, 2**(b-1) - 1]; k = 0 is zero, k >= 1 is ``2**(k - L)`` with
  L = 2**(b-1) - 1. bits=4: k=0 -> 0, k=1..7 -> 2**-6 .. 2**0 (15 distinct values with the sign).
  bits is limited to 2..6 (bits=7 would need 2**62 on the integer grid).
* ``variant="apot2"`` (additive powers of two, Li et al., ICLR 2020): ``w = s_c * sign * (t1 + t2)``.
  The (b-1)-bit magnitude code is split into k1 = ceil((b-1)/2) high bits for t1 and k2 = floor((b-1)/2)
  low bits for t2; a field value j = 0 means the term is absent, j >= 1 gives
  ``t1 = 2**-(2(j-1))`` (even exponents 0, -2, -4, ...) and ``t2 = 2**-(2(j-1)+1)`` (odd exponents
  -1, -3, ...). The exponent sets are disjoint, so all 2**(b-1) magnitudes are distinct; the
  largest is 1.5. bits=4: t1 in {0, 1, 1/4, 1/16}, t2 in {0, 1/2}. Storage is still b bits.
  bits is 2..8.

``s_c = max|w_c| / max_level`` ("minmax") or the MSE-best fraction of it ("mse"); each weight
goes to the nearest level in the linear domain (ties to the smaller magnitude). On the integer grid
a magnitude is ``sum_t 2**(e_t - e_min) >= 1``, so every shift is a non-negative left shift and the
shift kernel (:mod:`si_compress.quant.shiftadd`) is bit-exact with the integer-multiply reference.
This module imports only :mod:`.primitives` (no import circle with the fake-quant or shift-add modules).
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .primitives import _check_choice, _check_float_tensor, check_bits

VARIANTS = ("pot", "apot2")
POT_MAX_BITS = 6
WEIGHT_METHODS = ("minmax", "mse")

__all__ = [
    "POT_MAX_BITS",
    "Pow2Codebook",
    "PowerOfTwoWeight",
    "VARIANTS",
    "pow2_codebook",
    "pow2_fake_quantize",
    "quantize_pow2_weight",
]


# --------------------------------------------------------------------------------------------
# codebooks and weight quantization
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Pow2Codebook:
    """Magnitude levels of one (bits, variant), indexed by code.

    magnitudes (n_codes,) float64, relative to the channel scale; shifts (n_terms, n_codes) int8
    exponents on the integer grid (-1 = term absent), so ``magnitude = sum_t 2**shift_t * 2**e_min``.
    """

    bits: int
    variant: str
    magnitudes: np.ndarray
    shifts: np.ndarray
    e_min: int

    @property
    def max_level(self) -> float:
        return float(self.magnitudes.max())

    @property
    def n_terms(self) -> int:
        return int(self.shifts.shape[0])

    def table(self) -> list[tuple[int, float, tuple[int, ...]]]:
        """(code, magnitude, exponents of the present terms) for each code."""
        return [(code, float(self.magnitudes[code]),
                 tuple(int(s) + self.e_min for s in self.shifts[:, code] if s >= 0))
                for code in range(self.magnitudes.shape[0])]


def _check_variant_bits(bits, variant, name="bits") -> int:
    _check_choice(variant, VARIANTS, "variant")
    high = POT_MAX_BITS if variant == "pot" else 8
    return check_bits(bits, name=name, high=high)


@functools.lru_cache(maxsize=None)
def pow2_codebook(bits: int, *, variant: str = "pot") -> Pow2Codebook:
    """The code table of a power-of-two weight format (see the module docstring)."""
    bits = _check_variant_bits(bits, variant)
    n_codes = 2 ** (bits - 1)
    if variant == "pot":
        exps = [[None] + [k - (n_codes - 1) for k in range(1, n_codes)]]
    else:
        k1 = math.ceil((bits - 1) / 2)
        k2 = (bits - 1) // 2
        t1 = [None] + [-2 * (j - 1) for j in range(1, 2**k1)]
        t2 = [None] + [-(2 * (j - 1) + 1) for j in range(1, 2**k2)]
        exps = [[t1[c >> k2] for c in range(n_codes)], [t2[c & (2**k2 - 1)] for c in range(n_codes)]]
    e_min = min(e for row in exps for e in row if e is not None)
    shifts = np.array([[-1 if e is None else e - e_min for e in row] for row in exps], dtype=np.int8)
    magnitudes = np.array([sum(2.0**e for e in col if e is not None) for col in zip(*exps)], dtype=np.float64)
    shifts.setflags(write=False)
    magnitudes.setflags(write=False)
    return Pow2Codebook(bits=bits, variant=variant, magnitudes=magnitudes, shifts=shifts, e_min=e_min)


def _magnitudes(cb: Pow2Codebook, like: Tensor) -> Tensor:
    # copy: the codebook's arrays are read-only and torch warns on wrapping those
    return torch.tensor(cb.magnitudes.tolist(), dtype=like.dtype, device=like.device)


def _assign_codes(rows: Tensor, scale: Tensor, cb: Pow2Codebook) -> Tensor:
    """Nearest code (linear domain, ties to the smaller magnitude) of |rows| / scale; rows (C, K)."""
    mags = _magnitudes(cb, rows)
    sorted_mags, order = torch.sort(mags)
    mids = (sorted_mags[1:] + sorted_mags[:-1]) / 2
    return order[torch.bucketize(rows.abs() / scale.unsqueeze(1), mids)]


def _pow2_codes(rows: Tensor, cb: Pow2Codebook, method: str, grid: int) -> tuple[Tensor, Tensor]:
    """(codes (C, K), per-channel scale (C,)) for weight rows (C, K)."""
    mags = _magnitudes(cb, rows)
    amax = rows.abs().amax(dim=1)
    base = torch.where(amax > 0, amax / cb.max_level, torch.ones_like(amax))
    if method == "minmax":
        return _assign_codes(rows, base, cb), base
    best_err = torch.full_like(base, math.inf)
    best = base.clone()
    for r in torch.linspace(1.0 / grid, 1.0, grid).tolist():
        s = base * r
        deq = torch.sign(rows) * mags[_assign_codes(rows, s, cb)] * s.unsqueeze(1)
        err = ((deq - rows) ** 2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return _assign_codes(rows, best, cb), best


def _weight_rows(weight, name="weight") -> Tensor:
    w = _check_float_tensor(weight, name).detach()
    if w.ndim < 2:
        raise ValueError(f"{name} must have an output-channel axis and at least one more; got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return w.reshape(w.shape[0], -1)


def _check_grid(grid) -> int:
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 1:
        raise ValueError(f"grid must be a positive integer (number of scale ratios tried); got {grid!r}")
    return int(grid)


@dataclass(frozen=True, eq=False)
class PowerOfTwoWeight:
    """A weight tensor W (C, ...) as ``W[c] = scale[c] * signs[c] * sum_t 2**shifts[t, c]``.

    shifts (n_terms, C, ...) int8 integer-grid exponents (-1 = absent term); signs (C, ...) int8 in
    {-1, 0, 1}; scale (C,) float64 (includes the grid's 2**e_min).
    """

    shifts: np.ndarray
    signs: np.ndarray
    scale: np.ndarray
    bits: int
    variant: str

    def __post_init__(self):
        _check_variant_bits(self.bits, self.variant)
        if self.shifts.dtype != np.int8 or self.signs.dtype != np.int8:
            raise ValueError(f"shifts and signs must be int8; got {self.shifts.dtype} and {self.signs.dtype}")
        if self.shifts.shape[1:] != self.signs.shape:
            raise ValueError(f"shifts shape {self.shifts.shape} must be (n_terms, *signs.shape) with signs "
                             f"shape {self.signs.shape}")
        if self.scale.shape != (self.signs.shape[0],):
            raise ValueError(f"scale must have shape ({self.signs.shape[0]},); got {self.scale.shape}")

    def integer_weight(self) -> np.ndarray:
        """int64 weight on the integer grid, shape of ``signs``."""
        mag = np.where(self.shifts >= 0, np.left_shift(np.int64(1), np.maximum(self.shifts, 0).astype(np.int64)), 0)
        return self.signs.astype(np.int64) * mag.sum(axis=0)

    def dequantize(self, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """Real-valued weight ``scale[c] * integer_weight`` (exact in float64)."""
        w = self.integer_weight().astype(np.float64)
        w *= self.scale.reshape((-1,) + (1,) * (w.ndim - 1))
        return torch.from_numpy(w).to(dtype)


def quantize_pow2_weight(weight: Tensor, *, bits: int = 4, variant: str = "pot", method: str = "minmax",
                         grid: int = 100) -> PowerOfTwoWeight:
    """Power-of-two quantization of ``weight`` (C_out, ...) with one scale per output channel.

    method "minmax": ``s_c = max|w_c| / max_level``; "mse": the best of ``grid`` ratios in (0, 1]
    of that scale by mean squared error (never worse than minmax). Computed in float64.
    """
    bits = _check_variant_bits(bits, variant)
    _check_choice(method, WEIGHT_METHODS, "method")
    grid = _check_grid(grid)
    rows = _weight_rows(weight).double().cpu()
    cb = pow2_codebook(bits, variant=variant)
    codes, scale = _pow2_codes(rows, cb, method, grid)
    codes = codes.numpy()
    signs = (np.sign(rows.numpy()) * (codes != 0)).astype(np.int8)
    shape = tuple(weight.shape)
    return PowerOfTwoWeight(shifts=np.ascontiguousarray(cb.shifts[:, codes]).reshape((cb.n_terms,) + shape),
                            signs=signs.reshape(shape), scale=scale.numpy() * 2.0**cb.e_min, bits=bits,
                            variant=variant)


def pow2_fake_quantize(weight: Tensor, *, bits: int = 4, variant: str = "pot", method: str = "minmax",
                       grid: int = 100) -> Tensor:
    """Power-of-two quantize-dequantize of ``weight`` (C_out, ...) for QAT, in its dtype and device.

    Straight-through gradient (identity) for every weight: with "minmax" no weight is clipped.
    """
    bits = _check_variant_bits(bits, variant)
    _check_choice(method, WEIGHT_METHODS, "method")
    rows = _weight_rows(weight)
    cb = pow2_codebook(bits, variant=variant)
    codes, scale = _pow2_codes(rows, cb, method, _check_grid(grid))
    mags = _magnitudes(cb, rows)
    deq = (torch.sign(rows) * mags[codes] * scale.unsqueeze(1)).reshape(weight.shape)
    return weight + (deq - weight).detach()
