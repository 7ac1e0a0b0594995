"""Where the model runs: ``--device auto|cpu|cuda`` for the stages that push batches through a model.

Feature collection, least-squares compensation, BatchNorm re-calibration, reconstruction, head
training, fine-tuning and evaluation run on the device asked for; planning, structure tracing,
plan application, MAC counting, latency timing, quantization and export stay on the CPU, so every
stage moves the model there and back (:func:`on_device`): a model handed to a stage comes back on
the device it was on.

- :func:`resolve_device` turns a spec (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a
  ``torch.device`` or None = auto) into a ``torch.device``; a CUDA request on a machine without CUDA
  is a ValueError that says what to pass instead.
- :func:`target` is the device a library stage runs on: the one asked for, else the model's own.
- :func:`to_device` moves one batch tensor (the one place batches are moved: tests watch it).
- :func:`channels_last` holds models' 4-D weights in the channels-last layout while they train
  (:func:`use_channels_last` says where that is the default) and gives each its own layout back.
"""
from __future__ import annotations

import contextlib
import re

__all__ = ["DEVICES", "check_device_spec", "resolve_device", "model_device", "target", "on_device", "to_device",
           "describe_device", "channels_last", "use_channels_last", "as_layout"]

DEVICES = ("auto", "cpu", "cuda")
_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_spec(spec) -> str:
    """The spec as a string when it is auto, cpu, cuda or cuda:N (availability is not checked here)."""
    import torch

    if spec is None:
        return "auto"
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str) or not _SPEC.match(spec.strip().lower()):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {spec!r}")
    return spec.strip().lower()


def resolve_device(spec="auto"):
    """``torch.device`` for ``spec``: ``auto`` (or None) is CUDA when ``torch.cuda.is_available()``, else CPU.

    ValueError for anything else than auto/cpu/cuda/cuda:N, for ``cuda`` without a usable CUDA device
    and for a ``cuda:N`` index beyond the devices present.
    """
    import torch

    spec = check_device_spec(spec)
    if spec == "auto":
        return resolve_device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for but torch finds no CUDA device (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu or auto")
    dev = torch.device(spec)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r} asked for but only {torch.cuda.device_count()} CUDA device(s) exist; "
                         "use --device cuda (the first one) or auto")
    # with its index, so that it compares equal to the device a moved parameter reports
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def describe_device(dev) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H200)``: what the output says ran the model."""
    import torch

    dev = torch.device(dev)
    if dev.type != "cuda":
        return str(dev)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def model_device(module):
    """The device of ``module``'s first parameter (or buffer); CPU for a module with neither."""
    import torch

    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def target(device, module):
    """The device a stage runs ``module`` on: ``device`` resolved, or (None) the module's own."""
    return model_device(module) if device is None else resolve_device(device)


@contextlib.contextmanager
def on_device(device, *modules):
    """Move ``modules`` (None entries skipped) to ``device`` for the enclosed code and back to the device
    each was on afterwards, also when the code raises. ``device`` None: nothing moves."""
    mods = [m for m in modules if m is not None]
    if device is None:
        yield
        return
    homes = [model_device(m) for m in mods]
    try:
        for m, home in zip(mods, homes):
            if home != device:
                m.to(device)
        yield
    finally:
        for m, home in zip(mods, homes):
            if home != device:
                m.to(home)


def to_device(t, device):
    """``t`` on ``device`` (non-blocking: a pinned CPU batch overlaps its copy with compute)."""
    return t.to(device, non_blocking=True)


def use_channels_last(spec, device) -> bool:
    """Whether training runs convolutions in the channels-last layout: ``spec`` True/False, or None = on the CPU
    only. Measured on the CPU (2 cores, ResNet-56 at -50% MACs, batch 128): the teacher's forward 328 -> 229 ms,
    the student's forward + backward + Adam 660 -> 622 ms; not measured on a GPU, so off there by default."""
    if spec is None:
        return getattr(device, "type", str(device)) == "cpu"
    return bool(spec)


@contextlib.contextmanager
def channels_last(enabled: bool, *modules):
    """Within the block, the 4-D parameters and buffers of ``modules`` (None skipped) are stored channels-last
    (same values, same tensors: an optimizer made inside sees them); afterwards each goes back to the layout
    it had. ``enabled`` False: nothing changes."""
    import torch

    changed = []
    if enabled:
        for m in modules:
            if m is None:
                continue
            for t in list(m.parameters()) + list(m.buffers()):
                if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                    changed.append((t, t.stride()))
                    t.data = t.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for t, stride in changed:
            t.data = _restrided(t.data, stride)
            if t.grad is not None:
                t.grad = _restrided(t.grad, stride)


def _restrided(x, stride):
    import torch

    return x if x.stride() == tuple(stride) else torch.empty_strided(x.shape, stride, dtype=x.dtype,
                                                                    device=x.device).copy_(x)


def as_layout(x, enabled: bool):
    """A 4-D batch ``x`` in the channels-last layout when ``enabled`` (other tensors unchanged)."""
    import torch

    return x.contiguous(memory_format=torch.channels_last) if enabled and x.dim() == 4 else x
