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
"""
from __future__ import annotations

import contextlib
import re

__all__ = ["DEVICES", "check_device_spec", "resolve_device", "model_device", "target", "on_device", "to_device",
           "describe_device"]

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
