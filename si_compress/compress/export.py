"""Saving, loading and exporting compressed models.

A compressed model is stored as architecture + plan + state dict (never a pickled module):
``{"format": "si_compress.compressed", "format_version": 1, "arch", "num_classes", "input_shape",
"plan": plan.to_dict(), "state_dict"}``. :func:`load_compressed` reads it with
``weights_only=True``, rebuilds the skeleton with :func:`~si_compress.compress.prune.rebuild` and
loads the weights strictly.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_path
from ..plan import CompressionPlan
from .prune import rebuild

__all__ = ["save_compressed", "load_compressed", "export_torchscript", "export_onnx", "FORMAT", "FORMAT_VERSION"]

FORMAT = "si_compress.compressed"
FORMAT_VERSION = 1


def save_compressed(path, model: nn.Module, plan: CompressionPlan, *, arch: str, num_classes: int,
                    input_shape=None, base: nn.Module | None = None, arch_kwargs: dict | None = None,
                    prior: dict | None = None) -> Path:
    """Atomically write ``model``'s weights with the ``plan`` that shaped it.

    ``arch``/``num_classes``: the BASE model (``build_model(arch, num_classes)``) the plan applies to.
    ``input_shape``: one sample's shape (C, H, W) used to re-trace the plan on load; default
    ``(model.in_channels or 3, 32, 32)`` (any size the network accepts gives the same skeleton).
    ``base``: the base model itself; a CIFAR ResNet / VGG stores its constructor config, so a base
    whose widths are not the named arch's (an already-pruned or narrow checkpoint) rebuilds too.
    ``arch_kwargs``: the base's constructor options (``--arch-kwargs``), stored so it rebuilds the same.
    ``prior``: when ``model`` was compressed from an already compressed file, that file's payload: its
    plans are applied first on rebuild (and its base spec is kept).
    """
    if not isinstance(plan, CompressionPlan):
        raise TypeError(f"plan must be a CompressionPlan; got {type(plan).__name__}")
    if input_shape is None:
        input_shape = (int(getattr(model, "in_channels", 3)), 32, 32)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": str(arch),
        "arch_kwargs": dict(arch_kwargs or {}),
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "plan": plan.to_dict(),
        "prior_plans": ([*prior.get("prior_plans", []), prior["plan"]] if prior else []),
        "base": prior.get("base") if prior else _base_spec(base),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _base_spec(base: nn.Module | None) -> dict | None:
    from ..models.cifar_resnet import CifarResNet
    from ..models.vgg import VGG

    if isinstance(base, (CifarResNet, VGG)):
        return {"class": type(base).__name__, "config": base.config()}
    return None


def load_compressed(path, *, arch: str | None = None, arch_kwargs: dict | None = None) -> tuple[nn.Module, CompressionPlan]:
    """(model in eval mode, plan) from a file written by :func:`save_compressed`; ValueError otherwise.

    The base is rebuilt from the stored arch and options, then the plan applied to it. A base that
    is the user's own class (``file.py:Class`` / ``package.module:Class``) imports that code, so it
    must be named again with ``arch`` (never taken from the file alone).
    """
    from ..models.loading import is_user_code

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except Exception as exc:  # pickle/zip/EOF errors from corrupt or foreign files
        raise ValueError(f"{path} is not a readable si_compress compressed model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not an si_compress compressed model (no 'format': {FORMAT!r}); "
                         "for a plain checkpoint use si_compress.models.load_model")
    if obj.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has compressed-model format version {obj.get('format_version')!r}; "
                         f"this si_compress reads version {FORMAT_VERSION}")
    try:
        plan = CompressionPlan.from_dict(obj["plan"])
        stored, num_classes, state = obj["arch"], int(obj["num_classes"]), obj["state_dict"]
        shape = tuple(int(s) for s in obj.get("input_shape", (3, 32, 32)))
        kwargs = dict(obj.get("arch_kwargs") or {}) if arch_kwargs is None else dict(arch_kwargs)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is missing an entry of a compressed model: {exc}") from None
    if arch is None and is_user_code(stored):
        raise ValueError(f"{path} is a compressed {stored} (your own class); loading it imports that code: pass "
                         f"--arch {stored} (arch=...) to allow it")
    if arch is not None and arch.strip() != stored and stored.lower() != arch.strip().lower():
        raise ValueError(f"{path} was compressed from {stored} but --arch {arch} was given; pass --arch {stored} "
                         "or omit --arch")
    arch = stored
    try:
        priors = [CompressionPlan.from_dict(p) for p in obj.get("prior_plans") or []]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} has a malformed earlier plan: {exc}") from None
    x = torch.zeros(1, *shape)
    if priors:
        from .prune import apply_plan

        model = rebuild(arch, num_classes, priors[0], example_input=x, base=obj.get("base"), arch_kwargs=kwargs)
        for p in priors[1:] + [plan]:
            model = apply_plan(model, p, example_input=x)
    else:
        model = rebuild(arch, num_classes, plan, example_input=x, base=obj.get("base"), arch_kwargs=kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: the weights do not fit the rebuilt {arch} + plan "
                         f"({str(exc).splitlines()[0]}); the file was edited or written by another version") from None
    return model.eval(), plan


def export_torchscript(model: nn.Module, path, example_input: torch.Tensor) -> Path:
    """Trace ``model`` (eval mode) with ``example_input`` and save it atomically as TorchScript."""
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export but remains the portable format here.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        traced = torch.jit.trace(model, example_input)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))
    return Path(path)


def export_onnx(model: nn.Module, path, example_input: torch.Tensor, *, opset: int = 17) -> Path:
    """Export to ONNX (opset 17, dynamic batch axis 0 of ``input`` and ``logits``) atomically.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs no extra packages and works
    offline; the dynamo exporter is tried only if the legacy one is unavailable.
    """
    model.eval()
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=opset,
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # The option-A shortcut's x[:, :, ::2, ::2] cannot be constant-folded; harmless, not actionable.
        warnings.filterwarnings("ignore", message=r"Constant folding.*")
        # The legacy exporter is chosen on purpose (offline, no onnxscript); its notice is not actionable.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*legacy TorchScript-based ONNX.*")
        try:
            torch.onnx.export(model, (example_input,), str(tmp), dynamo=False, **kwargs)
        except TypeError:  # a torch without the dynamo switch or without the legacy exporter
            torch.onnx.export(model, (example_input,), str(tmp), **kwargs)
    return Path(path)
