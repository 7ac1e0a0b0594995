"""Export of low-bit weights as integer codes, and a reference evaluator that re-reads them.

Format of ``<name>.npz`` (:func:`export_codes`; ``FORMAT = "si_compress.codes"``, version 1)
-------------------------------------------------------------------------------------------------
Keys ``__format__``, ``__version__`` (strings) and ``__layers__`` (names of the quantized layers,
registration order). For each quantized layer ``L`` (a module name such as ``layer1.0.conv1``):

* ``L/kind``: ``"pow2"`` (shift-add layer: ``ShiftAddConv2d`` / ``ShiftAddLinear``) or ``"int"``
  (``FakeQuantConv2d`` / ``FakeQuantLinear`` with the "int" format);
* ``L/op``: ``"conv2d"`` or ``"linear"``; for conv2d ``L/stride`` (2,), ``L/padding`` (4,) as
  (top, bottom, left, right) zeros, ``L/dilation`` (2,), ``L/groups`` () int64;
* pow2: ``L/signs`` int8 (Co, ...) in {-1, 0, 1}; ``L/shifts`` int8 (T, Co, ...), the exponent of
  each term on the integer grid, -1 = term absent (T = 1 for "pot", 2 for "apot2"): the integer
  weight is ``signs * sum_t 2**shifts[t]``; ``L/bits``, ``L/variant``;
* int: ``L/codes`` int8 (Co, ...) in [-(2**(b-1) - 1), 2**(b-1) - 1], the integer weight; ``L/bits``;
* ``L/weight_scale`` float64 (Co,): real weight = ``weight_scale[c] * integer weight``;
* ``L/act_scale`` float64 (), ``L/act_bits``, ``L/act_signed`` (pow2 layers only: the input is
  ``q = clamp(round_half_even(x / act_scale), qmin, qmax)``, qmin/qmax as in
  :func:`si_compress.quant.qrange`; act_scale is a power of two);
* ``L/bias`` float32 (Co,) when the layer has one.

Every other tensor of the model's state dict (float layers such as the first conv and the last
linear, BatchNorm statistics) is stored under ``state/<key>`` as it is.

Output of a pow2 layer (what the kernels compute, bit for bit): ``acc = sum q * w`` exactly in
integers, then ``y = float32(float64(acc) * (weight_scale[c] * act_scale) + float64(bias[c]))``.

:func:`reference_model` rebuilds a model from the file: every pow2 layer becomes a
:class:`ReferenceIntLayer` that computes the integer sum with numpy int64 (im2col + matmul, no Numba,
no torch conv) and the formula above; the rest comes from ``state/``. Its logits equal the shift-add
model's bit for bit. :func:`export_c_header` writes the codes as C arrays; :func:`export_qdq_onnx`
writes an ONNX model whose quantized layers hold the same int8 codes behind ``DequantizeLinear``.
"""
from __future__ import annotations

import copy
import io
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_path

__all__ = ["FORMAT", "VERSION", "ReferenceIntLayer", "export_c_header", "export_codes", "export_qdq_onnx",
           "load_codes", "reference_model"]

FORMAT = "si_compress.codes"
VERSION = 1


def _layer_entries(name: str, m: nn.Module) -> dict | None:
    from . import FakeQuantConv2d, FakeQuantLinear, ShiftAddConv2d, ShiftAddLinear
    from .primitives import calibrate_scale, quantize

    e: dict = {}
    if isinstance(m, (ShiftAddConv2d, ShiftAddLinear)):
        if not m.calibrated:
            raise ValueError(f"{name} has no activation scale: calibrate the shift-add model before exporting")
        pw = m.pow2_weight()
        e.update(kind="pow2", signs=pw.signs, shifts=pw.shifts, bits=m.bits, variant=m.variant,
                 weight_scale=pw.scale.astype(np.float64), act_scale=np.float64(m.act_scale.item()),
                 act_bits=m.act_bits, act_signed=m.act_signed)
        conv = isinstance(m, ShiftAddConv2d)
    elif isinstance(m, (FakeQuantConv2d, FakeQuantLinear)) and m.weight_format == "int":
        w = m.weight.detach()
        scale = calibrate_scale(w, m.weight_bits, method=m.weight_method, axis=0)
        codes = quantize(w, scale, m.weight_bits, axis=0).numpy().astype(np.int8)
        e.update(kind="int", codes=codes, bits=m.weight_bits, weight_scale=scale.double().numpy())
        conv = isinstance(m, FakeQuantConv2d)
    else:
        return None
    if conv:
        from .shiftadd import conv_padding

        pad = m.padding if isinstance(m, ShiftAddConv2d) else conv_padding(m.padding, m.kernel_size, m.dilation)
        e.update(op="conv2d", stride=np.array(m.stride, np.int64), padding=np.array(pad, np.int64),
                 dilation=np.array(m.dilation, np.int64), groups=np.int64(m.groups))
    else:
        e.update(op="linear")
    if m.bias is not None:
        e["bias"] = m.bias.detach().float().numpy()
    return e


def export_codes(model: nn.Module, path) -> Path:
    """Write the quantized layers' integer codes (and every other state tensor) to ``path`` (.npz),
    atomically; format in the module doc. Raises ValueError when the model has no quantized layer."""
    arrays: dict[str, np.ndarray] = {}
    layers = []
    owned = set()
    for name, m in model.named_modules():
        e = _layer_entries(name, m)
        if e is None:
            continue
        layers.append(name)
        if e["kind"] == "pow2":  # its buffers are the codes; an int fake-quant layer keeps its float state too
            owned.update(f"{name}.{k}" for k in m.state_dict())
        for k, v in e.items():
            arrays[f"{name}/{k}"] = np.asarray(v)
    if not layers:
        raise ValueError("the model has no quantized layer (shift-add or int fake-quant) to export")
    for k, v in model.state_dict().items():
        if k not in owned:
            arrays[f"state/{k}"] = v.detach().cpu().numpy()
    arrays.update(__format__=np.array(FORMAT), __version__=np.array(str(VERSION)), __layers__=np.array(layers))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    return Path(path)


def load_codes(path) -> dict[str, dict]:
    """{layer name: {field: array}} plus ``"state"`` -> {key: array}; ValueError for other files."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable .npz code file ({exc})") from None
    with z:
        if "__format__" not in z.files or str(z["__format__"]) != FORMAT:
            raise ValueError(f"{path} is not an {FORMAT} file")
        if str(z["__version__"]) != str(VERSION):
            raise ValueError(f"{path} has code-file version {z['__version__']}; this si_compress reads {VERSION}")
        out: dict[str, dict] = {"state": {}}
        for name in z["__layers__"].tolist():
            out[name] = {}
        for key in z.files:
            if key.startswith("__"):
                continue
            head, _, field = key.rpartition("/")
            if key.startswith("state/"):
                out["state"][key[len("state/"):]] = z[key]
            else:
                out[head][field] = z[key]
    return out


def _integer_weight(e: dict) -> np.ndarray:
    if str(e["kind"]) == "int":
        return e["codes"].astype(np.int64)
    shifts = e["shifts"].astype(np.int64)
    mag = np.where(shifts >= 0, np.left_shift(np.int64(1), np.maximum(shifts, 0)), 0).sum(axis=0)
    return e["signs"].astype(np.int64) * mag


def _qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class ReferenceIntLayer(nn.Module):
    """A pow2 layer from a code file, computed the obvious way (numpy int64; see the module doc).

    forward(x float (N, C, H, W) or (..., K)) -> float32, the layer's output."""

    def __init__(self, entry: dict):
        super().__init__()
        if str(entry["kind"]) != "pow2":
            raise ValueError("the integer reference evaluates shift-add (pow2) layers")
        self.e = entry
        self.w = _integer_weight(entry)

    def _quantize(self, x: Tensor) -> np.ndarray:
        s = np.float32(self.e["act_scale"])  # a power of two: x / s is exact in float32
        lo, hi = _qrange(int(self.e["act_bits"]), bool(self.e["act_signed"]))
        q = np.rint(x.detach().cpu().float().numpy() / s)  # rint: round half to even
        return np.clip(q, lo, hi).astype(np.int64)

    def _rescale(self, acc: np.ndarray, axis: int) -> Tensor:
        shape = [1] * acc.ndim
        shape[axis] = -1
        y = acc.astype(np.float64) * (self.e["weight_scale"].astype(np.float64)
                                      * np.float64(self.e["act_scale"])).reshape(shape)
        if "bias" in self.e:
            y = y + self.e["bias"].astype(np.float64).reshape(shape)
        return torch.from_numpy(y.astype(np.float32))

    def forward(self, x: Tensor) -> Tensor:
        q = self._quantize(x)
        if str(self.e["op"]) == "linear":
            flat = q.reshape(-1, q.shape[-1])
            acc = flat @ self.w.T  # int64 matmul: exact
            return self._rescale(acc, 1).reshape(*x.shape[:-1], -1)
        sh, sw = (int(v) for v in self.e["stride"])
        pt, pb, pl, pr = (int(v) for v in self.e["padding"])
        dh, dw = (int(v) for v in self.e["dilation"])
        g = int(self.e["groups"])
        n, c, h, w = q.shape
        co, cg, kh, kw = self.w.shape
        qp = np.pad(q, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        acc = np.zeros((n, co, oh, ow), np.int64)
        for gi in range(g):
            xs = qp[:, gi * cg:(gi + 1) * cg]
            cols = np.stack([xs[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                             for i in range(kh) for j in range(kw)], axis=2)  # (N, cg, KH*KW, OH, OW)
            cols = cols.reshape(n, cg * kh * kw, oh * ow)
            wg = self.w[gi * (co // g):(gi + 1) * (co // g)].reshape(co // g, -1)
            acc[:, gi * (co // g):(gi + 1) * (co // g)] = (wg @ cols).reshape(n, co // g, oh, ow)
        return self._rescale(acc, 1)


def reference_model(path, skeleton: nn.Module) -> nn.Module:
    """A copy of ``skeleton`` (a model with the same module names, e.g. the shift-add model or the
    BN-folded float model) whose pow2 layers are :class:`ReferenceIntLayer` built from the code file
    and whose other tensors are loaded from its ``state/`` entries. Eval mode."""
    from .primitives import _set_submodule

    codes = load_codes(path)
    model = copy.deepcopy(skeleton).eval()
    for name, e in codes.items():
        if name != "state" and str(e["kind"]) == "pow2":
            _set_submodule(model, name, ReferenceIntLayer(e))
    state = {k: torch.from_numpy(np.array(v)) for k, v in codes["state"].items()}
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise ValueError(f"the code file lacks {len(missing)} tensor(s) the skeleton needs, e.g. {missing[0]}; "
                         "pass the model the file was exported from")
    model.load_state_dict(state, strict=False)
    return model


def _c_name(s: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", s)


def export_c_header(path_npz, path_h) -> Path:
    """C header with the integer codes of a code file: per layer ``<layer>_signs`` / ``_shifts`` or
    ``_codes`` (int8_t, C order) with ``_shape`` arrays, ``_weight_scale`` (double) and, for pow2
    layers, ``_act_scale`` (double). Written atomically."""
    codes = load_codes(path_npz)
    guard = _c_name(Path(path_h).name).upper()
    lines = [f"/* integer weight codes exported by si_compress ({FORMAT} v{VERSION}); see lowbit_export.py */",
             f"#ifndef {guard}", f"#define {guard}", "#include <stdint.h>", ""]
    for name, e in codes.items():
        if name == "state":
            continue
        base = _c_name(name)
        for field in ("signs", "shifts", "codes"):
            if field in e:
                a = np.ascontiguousarray(e[field]).astype(np.int8)
                lines.append(f"static const int32_t {base}_{field}_shape[{a.ndim}] = "
                             f"{{{', '.join(str(d) for d in a.shape)}}};")
                lines.append(f"static const int8_t {base}_{field}[{a.size}] = {{{', '.join(map(str, a.ravel()))}}};")
        ws = e["weight_scale"].astype(np.float64)
        lines.append(f"static const double {base}_weight_scale[{ws.size}] = "
                     f"{{{', '.join(repr(float(v)) for v in ws)}}};")
        if "act_scale" in e:
            lines.append(f"static const double {base}_act_scale = {float(e['act_scale'])!r};")
        lines.append("")
    lines.append(f"#endif /* {guard} */")
    with atomic_path(path_h) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return Path(path_h)


# --------------------------------------------------------------------------------------------
# ONNX with integer codes and scales (QDQ)
# --------------------------------------------------------------------------------------------
def _surrogate(model: nn.Module, codes: dict) -> tuple[nn.Module, dict]:
    """Float copy of ``model`` whose quantized layers are plain Conv2d / Linear (dequantized weights),
    and {layer name: name of its weight parameter in the copy}."""
    from .primitives import _set_submodule

    sur = copy.deepcopy(model).eval()
    weight_names = {}
    modules = dict(sur.named_modules())
    for name, e in codes.items():
        if name == "state":
            continue
        wi = _integer_weight(e)
        w = torch.from_numpy(wi.astype(np.float64) * e["weight_scale"].reshape(-1, *[1] * (wi.ndim - 1)))
        old = modules[name]
        bias = "bias" in e
        if str(e["op"]) == "linear":
            new = nn.Linear(w.shape[1], w.shape[0], bias=bias)
            weight_names[name] = f"{name}.weight"
        else:
            pt, pb, pl, pr = (int(v) for v in e["padding"])
            if getattr(old, "padding_mode", "zeros") != "zeros":
                raise ValueError(f"{name}: only zero padding exports to ONNX codes; got {old.padding_mode}")
            conv = nn.Conv2d(w.shape[1] * int(e["groups"]), w.shape[0], tuple(w.shape[2:]),
                             stride=tuple(int(v) for v in e["stride"]), dilation=tuple(int(v) for v in e["dilation"]),
                             groups=int(e["groups"]), bias=bias)
            new = nn.Sequential(nn.ZeroPad2d((pl, pr, pt, pb)), conv)
            weight_names[name] = f"{name}.1.weight"
        target = new if isinstance(new, nn.Linear) else new[1]
        with torch.no_grad():
            target.weight.copy_(w.float())
            if bias:
                target.bias.copy_(torch.from_numpy(e["bias"]))
        _set_submodule(sur, name, new)
    return sur, weight_names


def export_qdq_onnx(model: nn.Module, path, example_input: Tensor) -> Path:
    """ONNX (opset 17) of a model with shift-add / int fake-quant layers, their weights stored as int8
    integer codes with per-output-channel float scales (``DequantizeLinear``, axis 0, zero point 0)
    and, for shift-add layers, their input as a ``QuantizeLinear`` / ``DequantizeLinear`` pair with the
    layer's power-of-two activation scale (uint8 when unsigned, int8 when signed, zero point 0). Any
    QDQ-aware runtime (onnxruntime, hardware flows) reads it; the codes equal the .npz ones. Integer
    weights must fit int8 (pot up to 4 bits, apot2 up to 6, int up to 8); wider ones: use the .npz."""
    import onnx
    from onnx import helper, numpy_helper

    from ..compress.export import export_onnx

    codes: dict = {"state": {}}
    for name, m in model.named_modules():
        e = _layer_entries(name, m)
        if e is not None:
            codes[name] = {k: np.asarray(v) for k, v in e.items()}
    if len(codes) == 1:
        raise ValueError("the model has no quantized layer (shift-add or int fake-quant) to export")
    for name, e in codes.items():
        if name != "state" and np.abs(_integer_weight(e)).max(initial=0) > 127:
            raise ValueError(f"{name}: integer weights up to {np.abs(_integer_weight(e)).max()} do not fit int8 "
                             "codes in ONNX; use the .npz export")
    sur, weight_names = _surrogate(model, codes)
    with atomic_path(path) as tmp:
        export_onnx(sur, tmp, example_input)
        m = onnx.load(str(tmp))
        g = m.graph
        inits = {i.name: i for i in g.initializer}
        nodes = list(g.node)
        new_nodes = []
        for node in nodes:
            layer = next((L for L, wn in weight_names.items() if len(node.input) > 1 and node.input[1] == wn), None)
            if layer is None:
                new_nodes.append(node)
                continue
            e = codes[layer]
            base = _c_name(layer)
            wq = _integer_weight(e).astype(np.int8)
            co = wq.shape[0]
            g.initializer.remove(inits[weight_names[layer]])
            g.initializer.extend([numpy_helper.from_array(wq, f"{base}_codes"),
                                  numpy_helper.from_array(e["weight_scale"].astype(np.float32), f"{base}_wscale"),
                                  numpy_helper.from_array(np.zeros(co, np.int8), f"{base}_wzp")])
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_codes", f"{base}_wscale", f"{base}_wzp"],
                                              [f"{base}_weight"], axis=0, name=f"{base}_weight_dq"))
            node.input[1] = f"{base}_weight"
            if str(e["kind"]) == "pow2":
                signed = bool(e["act_signed"])
                zp = np.array(0, np.int8 if signed else np.uint8)
                g.initializer.extend([numpy_helper.from_array(np.array(float(e["act_scale"]), np.float32),
                                                              f"{base}_ascale"),
                                      numpy_helper.from_array(zp, f"{base}_azp")])
                x = node.input[0]
                new_nodes += [helper.make_node("QuantizeLinear", [x, f"{base}_ascale", f"{base}_azp"], [f"{base}_xq"],
                                               name=f"{base}_input_q"),
                              helper.make_node("DequantizeLinear", [f"{base}_xq", f"{base}_ascale", f"{base}_azp"],
                                               [f"{base}_xdq"], name=f"{base}_input_dq")]
                node.input[0] = f"{base}_xdq"
            new_nodes.append(node)
        del g.node[:]
        g.node.extend(new_nodes)
        m.metadata_props.append(onnx.StringStringEntryProto(key="si_compress.codes", value=f"{FORMAT} v{VERSION}"))
        onnx.checker.check_model(m)
        onnx.save(m, str(tmp))
    return Path(path)
