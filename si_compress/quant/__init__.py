"""Quantization: one package.

* :mod:`.primitives`: integer grids, scale calibration, (fake) quantization, fixed-point formats;
* :mod:`.pow2`: power-of-two / additive power-of-two weight formats;
* :mod:`.fakequant`: BN folding, fake-quant modules for PTQ / QAT, ``prepare_qat``, ``calibrating``;
* :mod:`.shiftadd` (+ :mod:`._kernels`): shift-add layers on integer Numba kernels;
* :mod:`.engine_ort` (int8 through onnxruntime, the default) and :mod:`.engine_torch` (deprecated
  torch.ao FX path);
* :mod:`.sparsity`: unstructured percentile pruning and its masks;
* :mod:`.storage`: packed low-bit weights on disk; :mod:`.export`: integer-code export and the
  reference evaluator;
* :mod:`.api`: ``QuantConfig`` / ``quantize_model``, the entry point the CLI calls.

Importing this package loads torch but neither numba nor onnxruntime; those load on first use.
"""
from .fakequant import (
    ActivationQuantizer,
    FakeQuantConv2d,
    FakeQuantLinear,
    calibrating,
    find_conv_bn_pairs,
    first_conv_last_linear,
    fold_bn,
    fold_bn_model,
    prepare_qat,
)
from .pow2 import Pow2Codebook, PowerOfTwoWeight, pow2_codebook, pow2_fake_quantize, quantize_pow2_weight
from .primitives import (
    QuantSpec,
    calibrate_scale,
    dequantize,
    fake_quantize,
    fixed_point_format,
    pow2_scale,
    qrange,
    quantize,
)
from .shiftadd import ShiftAddConv2d, ShiftAddLinear, conv2d_mul, conv2d_shift, convert_to_shiftadd, linear_mul, linear_shift

__all__ = [
    "ActivationQuantizer",
    "FakeQuantConv2d",
    "FakeQuantLinear",
    "Pow2Codebook",
    "PowerOfTwoWeight",
    "QuantSpec",
    "ShiftAddConv2d",
    "ShiftAddLinear",
    "calibrate_scale",
    "calibrating",
    "conv2d_mul",
    "conv2d_shift",
    "convert_to_shiftadd",
    "dequantize",
    "fake_quantize",
    "find_conv_bn_pairs",
    "first_conv_last_linear",
    "fixed_point_format",
    "fold_bn",
    "fold_bn_model",
    "linear_mul",
    "linear_shift",
    "pow2_codebook",
    "pow2_fake_quantize",
    "pow2_scale",
    "prepare_qat",
    "qrange",
    "quantize",
    "quantize_pow2_weight",
]
