"""Compressed weights on disk: packed low-bit codes plus a sparse index, and the bytes they take.

``save_packed(path, model)`` writes every Conv2d / Linear weight as integer codes packed at their
bit width, one float32 scale per output channel, and (where it saves bytes) a sparse index of
the non-zero weights; every other tensor (biases, BatchNorm statistics, activation ranges) is
stored raw. ``load_packed(path)`` returns the state dict with the weights dequantized, so a float
model of the same layout reloads with ``load_state_dict``. ``size_on_disk(path)`` is the file size.

Codes (``bits`` b per weight, per output channel c with scale ``s_c``):

* ``"int"``: two's complement of ``q = clamp(round(w / s_c))``; ``w = q * s_c``.
* ``"pot"`` / ``"apot2"``: sign-magnitude, ``code = sign << (b-1) | k`` with the magnitude code k
  of :mod:`si_compress.quant.pow2`'s codebook; ``w = ±m_k * s_c`` with ``m_k`` an integer
  (the codebook level on the integer grid) and ``s_c`` including ``2**e_min``.
* ``"float32"``: the raw IEEE bits (32 per weight), for layers kept in float.

Sparse formats (per tensor; ``sparse="auto"`` picks the smallest for each):

* ``"dense"``: all codes.
* ``"bitmap"``: 1 bit per weight marking non-zeros (numpy ``packbits``), codes of non-zeros only.
* ``"delta"``: Deep-Compression-style relative index: for each stored weight, its distance from
  the previous stored one as uint8 (row-major order); a gap above 255 stores an explicit zero
  entry every 255 positions. Codes of the stored entries only.

File layout (little-endian): ``b"SIQP"``, uint8 version, uint32 header length, a compact JSON
header (names, shapes, formats, byte lengths), then the byte blobs in header order. The file is
written with numpy bytes, no compression on top, so its size is what the packing achieves.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_path

__all__ = [
    "PackedLayer",
    "StorageReport",
    "bits_per_weight",
    "fp32_state_dict_bytes",
    "load_packed",
    "pack_bits",
    "save_packed",
    "size_on_disk",
    "unpack_bits",
]

MAGIC = b"SIQP"
VERSION = 1
FORMATS = ("int", "pot", "apot2", "float32")
SPARSE_FORMATS = ("auto", "dense", "bitmap", "delta")
_MAX_GAP = 255


# --------------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------------
def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 buffer of ceil(n * bits / 8) bytes holding the low ``bits`` of each code, LSB first.

    codes: 1-D unsigned integers < 2**bits. bits 8/16/32 are plain little-endian byte copies;
    other widths go through an (n, bits) bit matrix (``np.packbits``, little bit order).
    """
    codes = np.ascontiguousarray(codes).reshape(-1)
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32]; got {bits}")
    if bits in (8, 16, 32):
        return codes.astype(f"<u{bits // 8}").view(np.uint8).copy()
    c = codes.astype(np.uint32)
    if c.size and int(c.max()) >= 2**bits:
        raise ValueError(f"a code does not fit in {bits} bits (max {int(c.max())})")
    matrix = ((c[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(matrix.reshape(-1), bitorder="little")


def unpack_bits(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The ``n`` codes (uint32) written by :func:`pack_bits`."""
    buf = np.asarray(buf, dtype=np.uint8)
    if bits in (8, 16, 32):
        return buf.view(f"<u{bits // 8}")[:n].astype(np.uint32)
    flat = np.unpackbits(buf, bitorder="little", count=n * bits).reshape(n, bits).astype(np.uint32)
    return (flat << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


# --------------------------------------------------------------------------------------------
# weight codes
# --------------------------------------------------------------------------------------------
def _int_codes(q: np.ndarray, bits: int) -> np.ndarray:
    return (q.astype(np.int64) & (2**bits - 1)).astype(np.uint32)


def _int_values(codes: np.ndarray, bits: int) -> np.ndarray:
    c = codes.astype(np.int64)
    return c - (c >= 2 ** (bits - 1)) * 2**bits


def _pow2_table(bits: int, variant: str) -> np.ndarray:
    """Integer magnitude of each code on the integer grid (levels / 2**e_min)."""
    from .pow2 import pow2_codebook

    cb = pow2_codebook(bits, variant=variant)
    return np.rint(cb.magnitudes / 2.0**cb.e_min).astype(np.int64)


def _pow2_codes(integer_weight: np.ndarray, bits: int, variant: str) -> np.ndarray:
    table = _pow2_table(bits, variant)
    lookup = np.full(int(table.max()) + 1, -1, dtype=np.int64)
    lookup[table] = np.arange(table.size)
    mag = np.abs(integer_weight.astype(np.int64))
    if mag.size and (int(mag.max()) > table.max() or (lookup[mag] < 0).any()):
        raise ValueError("integer weights are not on the power-of-two codebook")
    k = lookup[mag]
    return ((integer_weight < 0).astype(np.int64) << (bits - 1) | k).astype(np.uint32)


def _pow2_values(codes: np.ndarray, bits: int, variant: str) -> np.ndarray:
    table = _pow2_table(bits, variant)
    c = codes.astype(np.int64)
    sign = 1 - 2 * (c >> (bits - 1))
    return sign * table[c & (2 ** (bits - 1) - 1)]


@dataclass(frozen=True, eq=False)
class _QWeight:
    """One weight as integer values (C, ...) int64 (0 = zero weight) and per-channel float scales."""

    values: np.ndarray
    scale: np.ndarray
    fmt: str
    bits: int


def _float_weight(w: Tensor) -> _QWeight:
    return _QWeight(values=w.detach().float().cpu().numpy(), scale=np.ones(w.shape[0], np.float32),
                    fmt="float32", bits=32)


def _quantize_weight(w: Tensor, *, fmt: str, bits: int, method: str) -> _QWeight:
    from .primitives import calibrate_scale, quantize
    from .pow2 import quantize_pow2_weight

    w = w.detach().float().cpu()
    if fmt == "float32":
        return _float_weight(w)
    if fmt == "int":
        scale = calibrate_scale(w, bits, method=method, axis=0)
        q = quantize(w, scale, bits, axis=0).numpy()
        return _QWeight(values=q.astype(np.int64), scale=scale.numpy().astype(np.float32), fmt="int", bits=bits)
    pw = quantize_pow2_weight(w, bits=bits, variant=fmt, method=method)
    return _QWeight(values=pw.integer_weight(), scale=pw.scale.astype(np.float32), fmt=fmt, bits=bits)


def _codes(qw: _QWeight) -> np.ndarray:
    flat = qw.values.reshape(-1)
    if qw.fmt == "float32":
        return np.ascontiguousarray(flat, dtype="<f4").view("<u4").astype(np.uint32)
    if qw.fmt == "int":
        return _int_codes(flat, qw.bits)
    return _pow2_codes(flat, qw.bits, qw.fmt)


def _decode(codes: np.ndarray, fmt: str, bits: int) -> np.ndarray:
    if fmt == "float32":
        return codes.astype("<u4").view("<f4").astype(np.float64)
    if fmt == "int":
        return _int_values(codes, bits).astype(np.float64)
    return _pow2_values(codes, bits, fmt).astype(np.float64)


# --------------------------------------------------------------------------------------------
# sparse index
# --------------------------------------------------------------------------------------------
def _delta_index(nonzero: np.ndarray) -> np.ndarray:
    """Positions stored by the relative index: non-zeros plus a filler every 255 positions of gap."""
    pos = np.flatnonzero(nonzero)
    out, prev = [], -1
    for p in pos.tolist():
        while p - prev > _MAX_GAP:
            prev += _MAX_GAP
            out.append(prev)
        out.append(p)
        prev = p
    return np.asarray(out, dtype=np.int64)


def _encode_sparse(codes: np.ndarray, nonzero: np.ndarray, bits: int,
                   sparse: str) -> tuple[str, np.ndarray, np.ndarray, int]:
    """(format, index bytes, packed code bytes, number of stored codes) for one flat tensor."""
    candidates = {}
    if sparse in ("auto", "dense"):
        candidates["dense"] = (np.zeros(0, np.uint8), pack_bits(codes, bits), codes.size)
    if sparse in ("auto", "bitmap"):
        idx = np.packbits(nonzero.astype(np.uint8), bitorder="little")
        candidates["bitmap"] = (idx, pack_bits(codes[nonzero], bits), int(nonzero.sum()))
    if sparse in ("auto", "delta"):
        pos = _delta_index(nonzero)
        gaps = np.diff(np.concatenate([[-1], pos])).astype(np.uint8)
        candidates["delta"] = (gaps, pack_bits(codes[pos], bits), int(pos.size))
    name = min(candidates, key=lambda k: candidates[k][0].size + candidates[k][1].size)
    return (name, *candidates[name])


def _decode_sparse(fmt: str, index: np.ndarray, packed: np.ndarray, bits: int, n_stored: int, n: int,
                   zero_code: int) -> np.ndarray:
    stored = unpack_bits(packed, bits, n_stored)
    if fmt == "dense":
        return stored
    out = np.full(n, zero_code, dtype=np.uint32)
    if fmt == "bitmap":
        mask = np.unpackbits(index, bitorder="little", count=n).astype(bool)
        out[mask] = stored
    else:
        out[np.cumsum(index.astype(np.int64)) - 1] = stored
    return out


# --------------------------------------------------------------------------------------------
# collecting the weights of a model
# --------------------------------------------------------------------------------------------
def _collect(model: nn.Module, *, bits: int | None, weight_format: str, method: str,
             first_last_bits: int | None) -> tuple[dict, dict]:
    """(quantized weights by state-dict key, raw tensors by key) of ``model``."""
    from .fakequant import FakeQuantConv2d, FakeQuantLinear, first_conv_last_linear
    from .shiftadd import ShiftAddConv2d, ShiftAddLinear

    qweights: dict[str, _QWeight] = {}
    skip: set[str] = set()
    first, last = first_conv_last_linear(model)
    int8_layers = {}
    from .engine_torch import int8_weights, is_int8_model

    if is_int8_model(model):
        int8_layers = int8_weights(model)
    for name, m in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if name in int8_layers:
            entry = int8_layers[name]
            qweights[key] = _QWeight(values=entry["codes"].numpy().astype(np.int64),
                                     scale=entry["scales"].numpy().astype(np.float32), fmt="int", bits=8)
            skip.add(f"{name}.bias")
            if entry["bias"] is not None:
                qweights[f"{name}.bias"] = None  # placeholder: stored raw below
        elif isinstance(m, (ShiftAddConv2d, ShiftAddLinear)):
            pw = m.pow2_weight()
            qweights[key] = _QWeight(values=pw.integer_weight(), scale=pw.scale.astype(np.float32),
                                     fmt=pw.variant, bits=pw.bits)
            skip.update(f"{name}.{b}" for b in ("weight_shifts", "weight_signs", "weight_scale"))
        elif isinstance(m, (FakeQuantConv2d, FakeQuantLinear)):
            qweights[key] = _quantize_weight(m.weight, fmt=m.weight_format, bits=m.weight_bits,
                                             method=m.weight_method)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            edge = bits is not None and first_last_bits is not None and name in (first, last)
            b, fmt = (first_last_bits, "int") if edge else (bits, weight_format)
            qweights[key] = _float_weight(m.weight) if b is None else _quantize_weight(
                m.weight, fmt=fmt, bits=b, method=method)
    raw = {}
    for k, v in model.state_dict().items():
        if k in qweights and qweights[k] is not None:
            continue
        if isinstance(v, Tensor) and not v.is_quantized and k not in skip and "_packed_params" not in k:
            raw[k] = v.detach().cpu()
    for name, entry in int8_layers.items():
        if entry["bias"] is not None:
            raw[f"{name}.bias"] = entry["bias"]
    return {k: v for k, v in qweights.items() if v is not None}, raw


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedLayer:
    """Storage of one weight: formats, counts and bytes (codes + index + scales)."""

    name: str
    shape: tuple[int, ...]
    fmt: str
    bits: int
    sparse: str
    n_weights: int
    n_nonzero: int
    code_bytes: int
    index_bytes: int
    scale_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.index_bytes + self.scale_bytes


@dataclass(frozen=True)
class StorageReport:
    """What :func:`save_packed` wrote. ``size_bytes`` is the file size; ``weight_bytes`` the bytes of
    conv/linear weights (codes + sparse index + scales); ``raw_bytes`` the other tensors'."""

    path: Path
    size_bytes: int
    layers: tuple[PackedLayer, ...]
    raw_bytes: int
    header_bytes: int

    @property
    def n_weights(self) -> int:
        return sum(lay.n_weights for lay in self.layers)

    @property
    def n_nonzero(self) -> int:
        return sum(lay.n_nonzero for lay in self.layers)

    @property
    def weight_bytes(self) -> int:
        return sum(lay.total_bytes for lay in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of conv/linear weights equal to zero."""
        return 1.0 - self.n_nonzero / max(self.n_weights, 1)

    @property
    def bits_per_weight(self) -> float:
        """8 * weight_bytes / n_weights: codes, sparse index and scales per conv/linear weight."""
        return 8.0 * self.weight_bytes / max(self.n_weights, 1)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "size_bytes": self.size_bytes, "weight_bytes": self.weight_bytes,
                "raw_bytes": self.raw_bytes, "header_bytes": self.header_bytes, "n_weights": self.n_weights,
                "n_nonzero": self.n_nonzero, "sparsity": self.sparsity, "bits_per_weight": self.bits_per_weight,
                "layers": [{**lay.__dict__, "shape": list(lay.shape)} for lay in self.layers]}


def bits_per_weight(report: "StorageReport") -> float:
    """Stored bits per conv/linear weight (codes + sparse index + per-channel scales)."""
    return report.bits_per_weight


def size_on_disk(path) -> int:
    """Bytes of the file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    return os.path.getsize(path)


def fp32_state_dict_bytes(model: nn.Module, path) -> int:
    """Size of ``torch.save(model.state_dict())`` written to ``path`` (the fp32 reference size)."""
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    return size_on_disk(path)


# --------------------------------------------------------------------------------------------
# writer and reader
# --------------------------------------------------------------------------------------------
def save_packed(path, model: nn.Module, *, bits: int | None = 8, weight_format: str = "int",
                method: str = "minmax", first_last_bits: int | None = 8, sparse: str = "auto") -> StorageReport:
    """Write ``model``'s weights packed (see the module doc) and return what was stored.

    Layers that carry their own quantization are stored as they compute: x86 int8 modules
    (their int8 codes and scales), ``FakeQuant*`` (their weight_bits / weight_format),
    ``ShiftAdd*`` (their power-of-two codes). Plain Conv2d / Linear use ``bits`` and
    ``weight_format`` ("int", "pot", "apot2"; ``bits=None``: float32), with per-channel scales
    from ``method`` ("minmax" or "mse"); when ``bits`` is set, the first conv and last linear use
    ``first_last_bits`` "int" (None: as the rest). Fold BatchNorms first to store the folded model. ``sparse``:
    "auto", "dense", "bitmap" or "delta".
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if weight_format not in FORMATS[:3]:
        raise ValueError(f"weight_format must be 'int', 'pot' or 'apot2'; got {weight_format!r}")
    if sparse not in SPARSE_FORMATS:
        raise ValueError(f"sparse must be one of {', '.join(SPARSE_FORMATS)}; got {sparse!r}")
    if method not in ("minmax", "mse"):
        raise ValueError(f"method must be 'minmax' or 'mse'; got {method!r}")
    qweights, raw = _collect(model, bits=bits, weight_format=weight_format, method=method,
                             first_last_bits=first_last_bits)
    entries, blobs, layers = [], [], []
    raw_bytes = 0
    for key, qw in qweights.items():
        codes = _codes(qw)
        nonzero = (qw.values.reshape(-1) != 0)
        fmt, index, packed, n_stored = _encode_sparse(codes, nonzero, qw.bits, sparse)
        scale = np.ascontiguousarray(qw.scale, dtype="<f4").view(np.uint8) if qw.fmt != "float32" \
            else np.zeros(0, np.uint8)
        blobs += [index, packed, scale]
        entries.append({"k": key, "t": "q", "s": list(qw.values.shape), "f": qw.fmt, "b": qw.bits, "sp": fmt,
                        "ns": n_stored, "l": [int(index.size), int(packed.size), int(scale.size)]})
        layers.append(PackedLayer(name=key, shape=tuple(qw.values.shape), fmt=qw.fmt, bits=qw.bits, sparse=fmt,
                                  n_weights=int(codes.size), n_nonzero=int(nonzero.sum()),
                                  code_bytes=int(packed.size), index_bytes=int(index.size),
                                  scale_bytes=int(scale.size)))
    for key, t in raw.items():
        arr = t.numpy()
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        blobs.append(data)
        raw_bytes += data.size
        entries.append({"k": key, "t": "r", "s": list(arr.shape), "d": arr.dtype.str, "l": [int(data.size)]})
    header = json.dumps({"format": "si_compress.packed", "entries": entries}, separators=(",", ":")).encode()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + struct.pack("<BI", VERSION, len(header)))
            fh.write(header)
            for b in blobs:
                fh.write(b.tobytes())
    return StorageReport(path=Path(path), size_bytes=size_on_disk(path), layers=tuple(layers), raw_bytes=raw_bytes,
                         header_bytes=len(MAGIC) + 5 + len(header))


def load_packed(path) -> dict[str, Tensor]:
    """State dict from a :func:`save_packed` file: weights dequantized to float32 (``q * s_c``
    computed in float64), other tensors as stored."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    if data[:4] != MAGIC or len(data) < 9:
        raise ValueError(f"{path} is not an si_compress packed-weights file (no {MAGIC!r} magic)")
    version, hlen = struct.unpack("<BI", data[4:9])
    if version != VERSION:
        raise ValueError(f"{path} has packed format version {version}; this si_compress reads {VERSION}")
    header = json.loads(data[9:9 + hlen].decode())
    buf = np.frombuffer(data, dtype=np.uint8)
    off = 9 + hlen
    out = {}
    for e in header["entries"]:
        parts = []
        for n in e["l"]:
            parts.append(buf[off:off + n])
            off += n
        shape = tuple(e["s"])
        if e["t"] == "r":
            out[e["k"]] = torch.from_numpy(parts[0].view(np.dtype(e["d"])).reshape(shape).copy())
            continue
        index, packed, scale = parts
        n = int(np.prod(shape)) if shape else 1
        zero_code = 0  # code 0 decodes to 0 in every format (int: q=0; pot: +k=0; float32: +0.0)
        codes = _decode_sparse(e["sp"], index, packed, e["b"], e["ns"], n, zero_code)
        values = _decode(codes, e["f"], e["b"]).reshape(shape)
        if e["f"] != "float32":
            values = values * scale.view("<f4").astype(np.float64).reshape((-1,) + (1,) * (len(shape) - 1))
        out[e["k"]] = torch.from_numpy(values.astype(np.float32))
    if off != len(data):
        raise ValueError(f"{path} is truncated or has trailing bytes ({len(data) - off} unread)")
    return out
