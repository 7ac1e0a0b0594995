"""int8 through ONNX Runtime: the default int8 engine (the deprecated torch.ao path is ``engine="torch"``).

Path: the float model (BatchNorms as they are: ORT's graph optimizer folds them) is exported to
ONNX (:func:`si_compress.compress.export_onnx`, opset 17, dynamic batch), pre-processed
(``onnxruntime.quantization.quant_pre_process``: shape inference and graph optimization) and
quantized statically with ``onnxruntime.quantization.quantize_static``:

* format QDQ (QuantizeLinear / DequantizeLinear pairs around each quantized op; ORT's CPU kernels
  fuse them into integer Conv / MatMul / Add);
* weights int8 symmetric **per output channel**; activations uint8 affine per tensor;
* ``reduce_range`` (7-bit weights) is chosen at run time: off on CPUs with a VNNI dot-product
  instruction (AVX-512 VNNI, AVX-VNNI, AMX) where 8x8-bit products cannot saturate, on otherwise
  (ORT's own guidance for x86 without VNNI);
* activation ranges from the calibration batches (``max_samples`` images; the caller passes a
  class-balanced sample) with one of ORT's calibration methods, :data:`ORT_CALIBRATION`:
  ``"minmax"`` (running min/max), ``"entropy"`` (KL-divergence threshold of a histogram),
  ``"percentile"`` (``percentile`` of |x| of the histogram), ``"distribution"`` (ORT's
  distribution-based ranges, meant for float8; offered as ORT offers it).

The result is an :class:`OrtModule`: an ``nn.Module`` that runs an ``InferenceSession`` on CPU
(float32 tensor in, float32 logits out), so ``evaluate`` and latency helpers take it like any
model. Its ``onnx_bytes`` are the ``model.int8.onnx`` file the CLI writes.
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_path

__all__ = ["ORT_CALIBRATION", "OrtModule", "OrtInt8Result", "cpu_has_vnni", "ort_available", "quantize_int8_ort"]

ORT_CALIBRATION = ("minmax", "entropy", "percentile", "distribution")
_VNNI_FLAGS = ("avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8", "amx_tile")


def ort_available() -> bool:
    """True when onnxruntime (with its quantization tools) and onnx import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        return False
    return True


def _require_ort():
    if not ort_available():
        raise RuntimeError("int8 through ONNX Runtime needs the packages onnx and onnxruntime: "
                           "pip install 'si_compress[export]' (or use --int8-engine torch)")


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """True when /proc/cpuinfo (or the given text) lists an int8 dot-product extension (VNNI / AMX).

    Elsewhere (no /proc, non-x86) False: the conservative choice (7-bit weights, never saturates)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags") or line.startswith("Features"):
            flags = set(line.split(":", 1)[-1].split())
            return any(f in flags for f in _VNNI_FLAGS)
    return False


class OrtModule(nn.Module):
    """An ONNX model run by onnxruntime on CPU: forward(x (N, ...) float) -> logits float32 tensor.

    threads: intra-op threads (default: torch's current count, so timings compare like with like).
    No autograd, no parameters; ``onnx_bytes`` is the serialized model.
    """

    def __init__(self, onnx_bytes: bytes, *, threads: int | None = None, label: str = "onnx"):
        super().__init__()
        _require_ort()
        import onnxruntime as ort

        self.onnx_bytes = bytes(onnx_bytes)
        self.label = label
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(self.onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        out = self._session.run(None, {self._input: x.detach().cpu().float().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    def save(self, path) -> Path:
        """Write the ONNX file atomically."""
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(self.onnx_bytes)
        return Path(path)

    def __deepcopy__(self, memo):
        return OrtModule(self.onnx_bytes, threads=self._session.get_session_options().intra_op_num_threads,
                         label=self.label)

    def extra_repr(self) -> str:
        return f"{self.label}, {len(self.onnx_bytes)} bytes"


@dataclass(frozen=True, eq=False)
class OrtInt8Result:
    """int8: the quantized model; fp32: the exported float ONNX model (same graph before quantization);
    details: what was done (method, reduce_range, samples, op counts)."""

    int8: OrtModule
    fp32: OrtModule
    details: dict


def _calibration_reader(calibration_data, max_samples: int, input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    from .engine_torch import _batches  # plain batching helper; does not import torch.ao

    batches = [x.detach().cpu().float().contiguous().numpy() for x in _batches(calibration_data, max_samples)]
    if not batches:
        raise ValueError("int8 calibration got no images; pass calibration batches (x or (x, y))")

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {input_name: x}

        def rewind(self):
            self._it = iter(batches)

    return _Reader(), sum(b.shape[0] for b in batches)


@contextlib.contextmanager
def _quiet_ort():
    """ORT's quantizer logs through ``logging`` and warns about pre-processing hints; keep the user's
    console to our own progress lines. DeprecationWarnings raised by the toolchain are silenced here
    only (they are not actionable for a user of si_compress)."""
    import io
    import logging

    logger = logging.getLogger()
    prev = logger.level
    logger.setLevel(logging.ERROR)
    try:
        # the histogram calibrators print their progress to stdout
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(prev)


def quantize_int8_ort(model: nn.Module, calibration_data, *, method: str = "minmax", percentile: float = 99.999,
                      max_samples: int = 512, per_channel: bool = True, reduce_range: bool | None = None,
                      threads: int | None = None) -> OrtInt8Result:
    """Static int8 quantization of ``model`` with onnxruntime (see the module doc).

    calibration_data: a tensor (N, C, H, W) or an iterable of ``x`` / ``(x, y)`` batches; the first
    ``max_samples`` images calibrate. reduce_range None: off with VNNI, on without
    (:func:`cpu_has_vnni`). ``model`` is not modified.
    """
    _require_ort()
    if method not in ORT_CALIBRATION:
        raise ValueError(f"onnxruntime int8 calibration must be one of {', '.join(ORT_CALIBRATION)}; got {method!r}")
    if not 0 < float(percentile) <= 100:
        raise ValueError(f"percentile must be in (0, 100]; got {percentile!r}")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..compress.export import export_onnx
    from .engine_torch import _batches

    first = next(iter(_batches(calibration_data, 1)), None)
    if first is None:
        raise ValueError("int8 calibration got no images; pass calibration batches (x or (x, y))")
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    cal = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}[method]
    was = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="si_ort_") as tmp, _quiet_ort():
            tmp = Path(tmp)
            export_onnx(model, tmp / "fp32.onnx", first[:1].float())
            quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "prep.onnx"), skip_symbolic_shape=True)
            reader, n_cal = _calibration_reader(calibration_data, max_samples, "input")
            quantize_static(str(tmp / "prep.onnx"), str(tmp / "int8.onnx"), reader, quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=cal,
                            extra_options={"CalibPercentile": float(percentile), "WeightSymmetric": True,
                                           "ActivationSymmetric": False})
            fp32_bytes = (tmp / "fp32.onnx").read_bytes()
            int8_bytes = (tmp / "int8.onnx").read_bytes()
    finally:
        model.train(was)
    details = {"engine": "onnxruntime", "format": "QDQ", "weights": "int8 symmetric per-channel" if per_channel
               else "int8 symmetric per-tensor", "activations": "uint8 affine per-tensor", "calibration": method,
               "reduce_range": bool(reduce_range), "vnni": cpu_has_vnni(), "calibration_samples": n_cal,
               "quantized_ops": _count_qdq(int8_bytes)}
    if method == "percentile":
        details["percentile"] = float(percentile)
    return OrtInt8Result(int8=OrtModule(int8_bytes, threads=threads, label="int8 QDQ"),
                         fp32=OrtModule(fp32_bytes, threads=threads, label="fp32"), details=details)


def _count_qdq(onnx_bytes: bytes) -> dict:
    """Op-type counts of the quantized graph's QuantizeLinear / DequantizeLinear nodes and quantized ops."""
    import onnx

    m = onnx.load_from_string(onnx_bytes)
    counts: dict = {}
    for node in m.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {k: counts[k] for k in sorted(counts) if k in ("QuantizeLinear", "DequantizeLinear", "Conv", "Gemm",
                                                          "MatMul", "Add")}


def int8_weight_codes(onnx_bytes: bytes) -> dict[str, np.ndarray]:
    """Initializer name -> int8 array of the quantized weights in a QDQ model (for tests and size)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(onnx_bytes)
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8}
