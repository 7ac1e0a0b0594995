"""Quantization and unstructured pruning of a trained model: one entry point per step.

* :func:`quantize_model` (``QuantConfig.mode``):
  - ``"int8"``: real int8 kernels, post-training. Engine ``"onnxruntime"`` (default): ONNX export,
    ``onnxruntime.quantization.quantize_static`` in QDQ format, int8 symmetric per-channel weights,
    uint8 per-tensor activations (:mod:`si_compress.quant.engine_ort`); the result runs in an
    onnxruntime session. Engine ``"torch"``: the deprecated ``torch.ao.quantization`` FX path
    (:mod:`si_compress.quant.engine_torch`), kept behind this explicit option.
  - ``"int4"`` / ``"pot4"`` / ``"apot4"``: fixed-point fake quantization
    (:func:`si_compress.quant.prepare_qat`) of the BN-folded model: 4-bit per-channel weights
    (signed integer grid, powers of two, additive powers of two), ``act_bits`` per-tensor
    activations, the first conv and the last linear at ``first_last_bits``. Post-training
    calibration first, then ``qat_epochs`` of quantization-aware training (straight-through
    estimator, :func:`si_compress.compress.finetune`) when a training loader is given. ``pot4`` /
    ``apot4`` with ``shiftadd=True`` end in :func:`si_compress.quant.convert_to_shiftadd` (integer
    shift-add kernels).
* :func:`percentile_prune`: unstructured magnitude pruning to an exact fraction of zeros, with
  masks that keep pruned weights at zero through later fine-tuning.
* :func:`dynamic_percentile_search`: raise the pruning percentile while the fine-tuned accuracy
  holds, back off (bisect) when it drops.
* :func:`compare_latency`: interleaved median latencies of several models in one run.
"""
from __future__ import annotations

import contextlib

import numbers

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .sparsity import (  # noqa: F401 (re-exported: the API's pruning half)
    PruneResult,
    SearchResult,
    apply_masks,
    dynamic_percentile_search,
    holding_masks,
    percentile_prune,
)

__all__ = [
    "QUANT_MODES",
    "PruneResult",
    "QuantConfig",
    "QuantResult",
    "SearchResult",
    "apply_masks",
    "calibrate_activations",
    "compare_latency",
    "dynamic_percentile_search",
    "holding_masks",
    "nominal_bits_per_weight",
    "percentile_prune",
    "quantize_model",
    "run_qat",
]

QUANT_MODES = ("int8", "int4", "pot4", "apot4")
INT8_ENGINES = ("onnxruntime", "torch")
CALIBRATION = ("minmax", "percentile", "mse")  # our calibration (4-bit modes, torch int8)
ORT_CALIBRATION = ("minmax", "entropy", "percentile", "distribution")  # onnxruntime's


def default_calibration(mode: str, int8_engine: str = "onnxruntime") -> str:
    """The activation calibration used when none is named: minmax for onnxruntime int8, else mse."""
    return "minmax" if mode == "int8" and int8_engine == "onnxruntime" else "mse"
_FORMAT = {"int4": "int", "pot4": "pot", "apot4": "apot2"}
_SAMPLE_PER_BATCH = 65536  # activation values kept per quantizer per batch for percentile / MSE


# --------------------------------------------------------------------------------------------
# configuration and result
# --------------------------------------------------------------------------------------------
def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


@dataclass(frozen=True)
class QuantConfig:
    """How :func:`quantize_model` quantizes.

    mode: "int8" (real int8 kernels), "int4", "pot4", "apot4" (fake-quant / shift-add).
    int8_engine: "onnxruntime" (default) or "torch" (deprecated torch.ao FX path).
    calibration: activation range method (None: :func:`default_calibration`). Ours (4-bit modes,
    torch int8): "minmax", "percentile" (``percentile`` of the values) or "mse" (clipping range
    with the least squared quantization error). onnxruntime's: "minmax", "entropy", "percentile",
    "distribution". calibration_samples:
    images observed. weight_method: "minmax" or "mse" per-channel weight scales (4-bit modes;
    fake-quant layers recompute the scale every forward, and "mse" tries 100 ratios each time:
    about 3x slower QAT steps, and for pot4 no better PTQ on ResNet-20, so "minmax" is the default).
    act_bits / first_last_bits: activation bits and the bits of the first conv / last linear
    (None: same as the rest) in the 4-bit modes. qat_epochs / qat_max_steps / lr / bf16 /
    momentum / weight_decay: QAT with SGD + cosine (0 epochs: PTQ only). shiftadd: convert
    pot4 / apot4 to shift-add modules at the end. reduce_range: int8 on 7 bits (safe without
    VNNI); None: off when the CPU has VNNI/AMX, else on (the torch engine's activations, the
    onnxruntime engine's weights).
    """

    mode: str = "int8"
    calibration: str | None = None
    percentile: float = 99.99
    calibration_samples: int = 512
    weight_method: str = "minmax"
    act_bits: int = 8
    first_last_bits: int | None = 8
    qat_epochs: int = 0
    qat_max_steps: int | None = None
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    bf16: bool = False
    shiftadd: bool = False
    reduce_range: bool | None = None
    seed: int = 0
    int8_engine: str = "onnxruntime"

    def __post_init__(self):
        if self.mode not in QUANT_MODES:
            raise ValueError(f"mode must be one of {', '.join(QUANT_MODES)}; got {self.mode!r}")
        if self.int8_engine not in INT8_ENGINES:
            raise ValueError(f"int8_engine must be one of {', '.join(INT8_ENGINES)}; got {self.int8_engine!r}")
        if self.calibration is None:
            object.__setattr__(self, "calibration", default_calibration(self.mode, self.int8_engine))
        ort = self.mode == "int8" and self.int8_engine == "onnxruntime"
        allowed = ORT_CALIBRATION if ort else CALIBRATION
        if self.calibration not in allowed:
            who = "onnxruntime int8" if ort else ("torch int8" if self.mode == "int8" else f"{self.mode}")
            hint = " (or the torch engine for mse)" if ort and self.calibration == "mse" else ""
            raise ValueError(f"calibration for {who} must be one of {', '.join(allowed)}{hint}; "
                             f"got {self.calibration!r}")
        if isinstance(self.percentile, bool) or not 0 < float(self.percentile) <= 100:
            raise ValueError(f"percentile must be in (0, 100]; got {self.percentile!r}")
        _check_int(self.calibration_samples, "calibration_samples", 1)
        if self.weight_method not in ("minmax", "mse"):
            raise ValueError(f"weight_method must be 'minmax' or 'mse'; got {self.weight_method!r}")
        _check_int(self.act_bits, "act_bits", 2)
        if self.act_bits > 8:
            raise ValueError(f"act_bits must be in [2, 8]; got {self.act_bits}")
        if self.first_last_bits is not None and not 2 <= _check_int(self.first_last_bits, "first_last_bits", 2) <= 8:
            raise ValueError(f"first_last_bits must be in [2, 8] or None; got {self.first_last_bits}")
        _check_int(self.qat_epochs, "qat_epochs", 0)
        if self.qat_max_steps is not None:
            _check_int(self.qat_max_steps, "qat_max_steps", 1)
        if not (isinstance(self.lr, numbers.Real) and self.lr > 0):
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        if self.mode == "int8" and self.qat_epochs:
            raise ValueError("int8 is post-training only (x86 kernels); QAT applies to int4, pot4 and apot4: "
                             "set qat_epochs=0 or pick a 4-bit mode")
        if self.shiftadd and self.mode not in ("pot4", "apot4"):
            raise ValueError(f"shiftadd needs power-of-two weights (mode 'pot4' or 'apot4'); got mode {self.mode!r}")


@dataclass(frozen=True, eq=False)
class QuantResult:
    """model: the quantized model (eval mode). kind: "int8-onnxruntime" (an
    :class:`~si_compress.quant.engine_ort.OrtModule`), "int8-x86" (torch engine),
    "fake-quant-int4", "fake-quant-pot4", "fake-quant-apot4", "shiftadd-pot4" or "shiftadd-apot4".
    bits_per_weight: nominal code bits per conv/linear weight (weighted by layer size; scales and
    sparse indices excluded: see :mod:`si_compress.quant.storage` for stored bits). details: timings,
    calibration, QAT history. reference: for onnxruntime int8, the float ONNX model it was
    quantized from, run by the same runtime (for like-for-like latency)."""

    model: nn.Module
    kind: str
    bits_per_weight: float
    details: dict = field(default_factory=dict)
    reference: nn.Module | None = None


def nominal_bits_per_weight(model: nn.Module) -> float:
    """Code bits per conv/linear weight of ``model``: 8 for x86 int8 layers, ``weight_bits`` for
    fake-quant layers, ``bits`` for shift-add layers, 32 for float layers (size-weighted mean)."""
    from .engine_torch import int8_weights, is_int8_model
    from . import FakeQuantConv2d, FakeQuantLinear, ShiftAddConv2d, ShiftAddLinear

    total = bits = 0
    int8 = int8_weights(model) if is_int8_model(model) else {}
    for name, m in model.named_modules():
        if name in int8:
            n, b = int8[name]["codes"].numel(), 8
        elif isinstance(m, (ShiftAddConv2d, ShiftAddLinear)):
            n, b = m.weight_signs.numel(), m.bits
        elif isinstance(m, (FakeQuantConv2d, FakeQuantLinear)):
            n, b = m.weight.numel(), m.weight_bits
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            n, b = m.weight.numel(), 32
        else:
            continue
        total += n
        bits += n * b
    return bits / max(total, 1)


# --------------------------------------------------------------------------------------------
# data helpers
# --------------------------------------------------------------------------------------------
def _batches(data, max_samples: int | None):
    """Input tensors from a tensor, a DataLoader or an iterable of x / (x, y), up to max_samples."""
    from .engine_torch import _batches as batches

    return batches(data, max_samples)


def _first_input(data) -> Tensor:
    for x in _batches(data, 1):
        return x
    raise ValueError("calibration_data yielded no samples; pass a few hundred representative inputs")


# --------------------------------------------------------------------------------------------
# fake-quant calibration and QAT
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_activations(model: nn.Module, calibration_data, *, method: str = "mse", percentile: float = 99.99,
                          max_samples: int | None = 512, seed: int = 0) -> int:
    """Set the ranges of every :class:`~si_compress.quant.ActivationQuantizer` in ``model``.

    Runs the batches inside :func:`~si_compress.quant.calibrating` (running min/max: the "minmax"
    result). For "percentile" / "mse" a random sample of each quantizer's inputs (at most 65,536
    values per batch) is kept and the range replaced by ``calibrate_scale(sample, method) * qmax``
    (symmetric ``[-a, a]`` for signed inputs, ``[0, a]`` for non-negative ones). Returns the
    number of images seen.
    """
    from . import ActivationQuantizer, calibrate_scale, calibrating, qrange

    if method not in CALIBRATION:
        raise ValueError(f"method must be one of {', '.join(CALIBRATION)}; got {method!r}")
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    samples: dict[int, list[Tensor]] = {id(q): [] for q in quantizers}
    gen = torch.Generator().manual_seed(seed)
    handles = []
    if method != "minmax":
        def keep(mod, args):
            x = args[0].detach().float().reshape(-1)
            if x.numel() > _SAMPLE_PER_BATCH:
                x = x[torch.randint(0, x.numel(), (_SAMPLE_PER_BATCH,), generator=gen)]
            samples[id(mod)].append(x)

        handles = [q.register_forward_pre_hook(keep) for q in quantizers]
    was = model.training
    model.eval()
    seen = 0
    try:
        with calibrating(model):
            for x in _batches(calibration_data, max_samples):
                model(x)
                seen += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if seen == 0:
        raise ValueError("calibration_data yielded no samples; pass a few hundred representative inputs")
    if method != "minmax":
        for q in quantizers:
            if not samples[id(q)]:
                continue
            signed = q.signed
            sample = torch.cat(samples[id(q)])
            scale = calibrate_scale(sample, q.bits, method=method, percentile=percentile, signed=signed)
            amax = scale * qrange(q.bits, signed=signed)[1]
            q.max_val.fill_(float(amax))
            if signed:
                q.min_val.fill_(-float(amax))
    return seen


def run_qat(model: nn.Module, train_loader, *, epochs: int, lr: float = 1e-3, momentum: float = 0.9,
            weight_decay: float = 0.0, max_steps: int | None = None, bf16: bool = False,
            augment: Callable[[Tensor], Tensor] | None = None, masks: "PruneResult | None" = None,
            progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Quantization-aware training of a calibrated fake-quant model in place (STE gradients).

    SGD + Nesterov with a per-step cosine schedule (:func:`si_compress.compress.finetune`);
    activation ranges stay frozen, weight scales follow the weights. ``masks``: pruned weights
    stay zero. Returns finetune's per-epoch history; the model ends in eval mode.
    """
    from ..compress import finetune

    hold = holding_masks(model, masks) if masks is not None else contextlib.nullcontext()
    with hold:
        return finetune(model, train_loader, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                        augment=augment, bf16=bf16, max_steps=max_steps, progress=progress)


def quantize_model(model: nn.Module, config: QuantConfig, calibration_data, *, train_loader=None,
                   augment: Callable[[Tensor], Tensor] | None = None, masks: "PruneResult | None" = None,
                   progress: Callable[[dict], None] | None = None) -> QuantResult:
    """Quantize a trained float ``model`` (not modified) as ``config`` says; see the module doc.

    calibration_data: a tensor (N, C, H, W) or an iterable of ``x`` / ``(x, y)`` batches
    (``config.calibration_samples`` images are used). train_loader: (x, y) batches for QAT
    (required when ``config.qat_epochs > 0``). augment: per-batch augmentation during QAT.
    masks: a :class:`PruneResult` whose zeros QAT must keep.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig; got {type(config).__name__}")
    if config.qat_epochs and train_loader is None:
        raise ValueError(f"qat_epochs={config.qat_epochs} needs train_loader=...; pass the training split or "
                         "set qat_epochs=0 for post-training quantization")
    details: dict = {"mode": config.mode, "calibration": config.calibration}
    t0 = time.perf_counter()
    if config.mode == "int8" and config.int8_engine == "onnxruntime":
        from .engine_ort import quantize_int8_ort

        res = quantize_int8_ort(model, calibration_data, method=config.calibration, percentile=config.percentile,
                                max_samples=config.calibration_samples, reduce_range=config.reduce_range)
        details.update(res.details, seconds_calibrate=time.perf_counter() - t0)
        return QuantResult(model=res.int8, kind="int8-onnxruntime", bits_per_weight=8.0, details=details,
                           reference=res.fp32)
    if config.mode == "int8":
        from .engine_torch import quantize_int8
        from .engine_ort import cpu_has_vnni

        reduce_range = (not cpu_has_vnni()) if config.reduce_range is None else config.reduce_range
        qmodel = quantize_int8(model, calibration_data, method=config.calibration, percentile=config.percentile,
                               max_samples=config.calibration_samples, reduce_range=reduce_range)
        details.update(engine="torch", backend="x86 FX graph mode (torch.ao.quantization, deprecated)",
                       reduce_range=reduce_range,
                       calibration_samples=sum(x.shape[0] for x in _batches(calibration_data,
                                                                             config.calibration_samples)),
                       seconds_calibrate=time.perf_counter() - t0)
        return QuantResult(model=qmodel, kind="int8-x86", bits_per_weight=nominal_bits_per_weight(qmodel),
                           details=details)

    from . import convert_to_shiftadd, fold_bn_model, prepare_qat

    example = _first_input(calibration_data)
    was = model.training
    model.eval()
    try:
        folded = fold_bn_model(model, example_input=example[:1])
    finally:
        model.train(was)
    fmt = _FORMAT[config.mode]
    qmodel = prepare_qat(folded, weight_bits=4, act_bits=config.act_bits, first_last_bits=config.first_last_bits,
                         weight_method=config.weight_method, weight_format=fmt, inplace=True)
    if masks is not None:
        apply_masks(qmodel, masks)
    details["calibration_samples"] = calibrate_activations(
        qmodel, calibration_data, method=config.calibration, percentile=config.percentile,
        max_samples=config.calibration_samples, seed=config.seed)
    details["weight_method"] = config.weight_method
    details["seconds_calibrate"] = time.perf_counter() - t0
    if config.qat_epochs:
        t1 = time.perf_counter()
        torch.manual_seed(config.seed)
        details["qat_history"] = run_qat(qmodel, train_loader, epochs=config.qat_epochs, lr=config.lr,
                                         momentum=config.momentum, weight_decay=config.weight_decay,
                                         max_steps=config.qat_max_steps, bf16=config.bf16, augment=augment,
                                         masks=masks, progress=progress)
        details["seconds_qat"] = time.perf_counter() - t1
    qmodel.eval()
    kind = f"fake-quant-{config.mode}"
    if config.shiftadd:
        t1 = time.perf_counter()
        qmodel = convert_to_shiftadd(qmodel, bits=4, act_bits=config.act_bits, variant=fmt,
                                     weight_method=config.weight_method, keep_first_last=True).eval()
        details["seconds_shiftadd"] = time.perf_counter() - t1
        kind = f"shiftadd-{config.mode}"
    return QuantResult(model=qmodel, kind=kind, bits_per_weight=nominal_bits_per_weight(qmodel), details=details)


# --------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------
def compare_latency(models: dict, example: Tensor, *, repeats: int = 7, warmup: int = 2) -> dict:
    """Median seconds per forward pass of each model on ``example``, measured interleaved by the one
    timing harness (``si_compress.latency.interleaved_times``: every round runs each model in turn,
    ``warmup`` rounds discarded). Returns ``{name: {"median_s", "spread", "times_s"}}``; ratios of
    medians from one call compare models under the same conditions."""
    from ..latency import interleaved_times

    _check_int(repeats, "repeats", 1)
    for m in models.values():
        m.eval()
    with torch.inference_mode():
        return interleaved_times({name: (lambda m=m: m(example)) for name, m in models.items()},
                                 repeats=repeats, warmup=warmup)
