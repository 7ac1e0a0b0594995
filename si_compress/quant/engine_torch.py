"""Real int8 inference on x86 CPUs: the ONE module that touches ``torch.ao.quantization``.

``torch.ao.quantization`` is deprecated upstream (its successor, PT2E in ``torchao``, is not a
dependency; ``torch.ao.quantization.quantize_pt2e`` is gone from the pinned torch), so every use
of it is kept here and its deprecation notices are silenced locally, not globally.

Path: FX graph mode post-training quantization with the ``x86`` backend (fbgemm/oneDNN kernels):
``prepare_fx`` (fuses Conv-BN-ReLU, i.e. folds BN, and inserts observers) -> calibration batches
-> ``convert_fx`` (quantized modules ``QuantizedConv2d``/``QuantizedConvReLU2d``/``QuantizedLinear``
and ``quantized::add_relu`` for residual sums). The model must be ``torch.fx.symbolic_trace``-able
(the CIFAR ResNets are, option-A shortcut included: its slice + pad run on dequantized values).

Quantization scheme: weights int8 symmetric per output channel (zero point 0, torch's symmetric
qint8 scale ``max|w_c| / 127.5``); activations uint8 affine per tensor with
``reduce_range`` 7-bit ranges by default (torch's x86 default, safe on CPUs without VNNI where
the 8x8-bit products could saturate int16 accumulators). Activation range calibration:

* ``"minmax"``: running min/max (``MinMaxObserver``);
* ``"mse"``: torch's ``HistogramObserver``, which searches the clipping range minimising the
  L2 (mean squared) quantization error of the observed histogram;
* ``"percentile"``: :class:`PercentileObserver`, the running max over batches of each batch's
  ``percentile``-th / ``(100 - percentile)``-th percentile (rare outliers clip).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch
import torch.fx
from torch import Tensor, nn

from .._io import atomic_path

__all__ = [
    "INT8_METHODS",
    "check_fx_traceable",
    "int8_available",
    "int8_weights",
    "is_int8_model",
    "is_quantized_module",
    "load_int8",
    "quantize_int8",
    "save_int8",
]

INT8_METHODS = ("minmax", "percentile", "mse")
BACKEND = "x86"


@contextlib.contextmanager
def _quiet():
    """Silence the deprecation notices of torch.ao.quantization inside this module's calls only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.ao\.quantization.*")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*quantize_per_tensor.*deprecated.*")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*_empty_affine_quantized.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        # quantized ops read their (constant) scales as Python floats while tracing: expected here
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        yield


@contextlib.contextmanager
def _engine(name: str = BACKEND):
    prev = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = prev


def int8_available() -> bool:
    """True when this torch build has the x86 quantized engine."""
    return BACKEND in torch.backends.quantized.supported_engines


def check_fx_traceable(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``; ValueError naming the failure if the model has
    data-dependent Python control flow (FX graph mode quantization needs a static graph)."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # TraceError, TypeError from Proxy misuse, ...
        raise ValueError(f"{type(model).__name__} is not torch.fx traceable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); int8 conversion needs a model without "
                         "data-dependent control flow in forward()") from None


def _percentile_observer_cls():
    from torch.ao.quantization.observer import MinMaxObserver

    class PercentileObserver(MinMaxObserver):
        """MinMaxObserver whose range is the running max over batches of each batch's
        ``percentile``-th percentile (and min of the ``100 - percentile``-th), so outliers clip."""

        def __init__(self, percentile: float = 99.99, **kwargs):
            super().__init__(**kwargs)
            self.percentile = float(percentile)

        def forward(self, x_orig: Tensor) -> Tensor:
            if x_orig.numel() == 0:
                return x_orig
            x = x_orig.detach().float().reshape(-1)
            n = x.numel()
            k_hi = min(n, max(1, math.ceil(self.percentile / 100.0 * n)))
            k_lo = max(1, n + 1 - k_hi)
            hi = x.kthvalue(k_hi).values
            lo = x.kthvalue(k_lo).values
            self.min_val.copy_(torch.minimum(self.min_val, lo.to(self.min_val)))
            self.max_val.copy_(torch.maximum(self.max_val, hi.to(self.max_val)))
            return x_orig

    return PercentileObserver


def _qconfig_mapping(method: str, percentile: float, reduce_range: bool):
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver

    act_kwargs = dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=reduce_range)
    if method == "minmax":
        act = MinMaxObserver.with_args(**act_kwargs)
    elif method == "mse":
        act = HistogramObserver.with_args(**act_kwargs)
    else:
        act = _percentile_observer_cls().with_args(percentile=percentile, **act_kwargs)
    weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return get_default_qconfig_mapping(BACKEND).set_global(QConfig(activation=act, weight=weight))


def _batches(data, max_samples: int | None):
    """Input tensors from a tensor (N, ...), a DataLoader / iterable of x or (x, y), up to max_samples."""
    if isinstance(data, Tensor):
        data = [data]
    seen = 0
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor):
            raise TypeError(f"calibration data must yield tensors or (tensor, label) pairs; got {type(x).__name__}")
        if max_samples is not None:
            x = x[: max(0, max_samples - seen)]
        if x.shape[0] == 0:
            break
        seen += x.shape[0]
        yield x
        if max_samples is not None and seen >= max_samples:
            break


def quantize_int8(model: nn.Module, calibration_data, *, method: str = "mse", percentile: float = 99.99,
                  max_samples: int | None = 512, reduce_range: bool = True) -> torch.fx.GraphModule:
    """x86 int8 model from a float ``model`` by FX post-training quantization (see module doc).

    ``calibration_data``: a tensor (N, C, H, W) or an iterable of ``x`` / ``(x, y)`` batches;
    at most ``max_samples`` images are observed (None: all). The input model is not modified
    (FX works on a deep copy). Returns the converted GraphModule in eval mode: float32 in,
    float32 logits out, int8 kernels inside.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if method not in INT8_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, INT8_METHODS))}; got {method!r}")
    if not 0 < float(percentile) <= 100:
        raise ValueError(f"percentile must be in (0, 100]; got {percentile!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) < 1):
        raise ValueError(f"max_samples must be a positive integer or None; got {max_samples!r}")
    if not int8_available():
        raise ValueError(f"this torch build has no {BACKEND!r} quantized engine (engines: "
                         f"{torch.backends.quantized.supported_engines}); int8 needs an x86 CPU build of torch")
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    check_fx_traceable(model)
    import copy

    float_model = copy.deepcopy(model).eval()
    first = None
    with _quiet(), _engine():
        for x in _batches(calibration_data, max_samples):
            first = x[:1]
            break
        if first is None:
            raise ValueError("calibration_data yielded no samples; pass a few hundred representative inputs")
        prepared = prepare_fx(float_model, _qconfig_mapping(method, percentile, reduce_range), (first,))
        with torch.no_grad():
            for x in _batches(calibration_data, max_samples):
                prepared(x)
        converted = convert_fx(prepared)
    return converted.eval()


def is_quantized_module(m: nn.Module) -> bool:
    """True for torch.ao quantized modules, fused ones (``torch.ao.nn.intrinsic.quantized``) included."""
    mod = type(m).__module__
    return mod.startswith("torch.ao.nn.") and ".quantized" in mod


def is_int8_model(model: nn.Module) -> bool:
    """True when ``model`` holds torch.ao quantized modules (a :func:`quantize_int8` result)."""
    return any(is_quantized_module(m) for m in model.modules())


def int8_weights(model: nn.Module) -> dict[str, dict]:
    """Per quantized Conv/Linear module: ``{"codes": int8 Tensor, "scales": float Tensor (C_out,),
    "bias": float Tensor or None}``, read from the packed int8 kernels' weights."""
    out = {}
    with _quiet():
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)
            if not (is_quantized_module(m) and callable(w)):
                continue
            qw = w()
            if qw.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine):
                scales = qw.q_per_channel_scales().float()
            else:
                scales = torch.full((qw.shape[0],), float(qw.q_scale()))
            b = m.bias() if callable(getattr(m, "bias", None)) else None
            out[name] = {"codes": qw.int_repr(), "scales": scales, "bias": None if b is None else b.detach().float()}
    return out


def save_int8(model: nn.Module, path, example_input: Tensor) -> Path:
    """Save an int8 model as TorchScript (traced with ``example_input``), atomically.

    The traced program runs at any batch size (the CIFAR ResNet graph has no batch-dependent
    shapes). Loads with :func:`load_int8` or ``torch.jit.load`` without si_compress.
    """
    model.eval()
    with _quiet(), _engine(), torch.no_grad():
        traced = torch.jit.trace(model, example_input)
        with atomic_path(path) as tmp:
            traced.save(str(tmp))
    return Path(path)


def load_int8(path) -> torch.jit.ScriptModule:
    """The TorchScript int8 model written by :func:`save_int8`, in eval mode (x86 engine set)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; write it with save_int8(model, path, example_input)")
    torch.backends.quantized.engine = BACKEND  # the packed weights were made for this engine
    with _quiet():
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as exc:
            raise ValueError(f"{path} is not a TorchScript model ({str(exc).splitlines()[0]})") from None
