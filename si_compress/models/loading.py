"""Architecture registry and safe checkpoint loading.

``build_model(arch, num_classes, arch_kwargs)`` builds a fresh network by name: the CIFAR ResNets
(``resnet20`` ... ``resnet110``), ``vgg16_bn`` (CIFAR VGG-16-BN; ``vgg16_bn_half`` /
``vgg16_bn_quarter`` with every width halved / quartered), any torchvision classifier as
``torchvision:<name>`` (random weights), or the user's own class as ``path/to/file.py:Class`` or
``package.module:Class`` (this imports and runs that code). ``load_model(path)`` reads a checkpoint
with ``torch.load(..., weights_only=True)`` (no code from the file runs), finds the state dict,
strips a DataParallel ``module.`` prefix, infers the architecture when it can and loads strictly;
a file written by ``si_compress.compress.save_compressed`` is handed to ``load_compressed``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import numbers
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .cifar_resnet import CIFAR_RESNET_DEPTHS, CifarResNet, cifar_resnet
from .small_cnn import SmallCNN
from .vgg import VGG, VGG16_CFG, vgg16_bn_cifar

__all__ = [
    "ModelLoadError",
    "LoadedModel",
    "available_archs",
    "build_model",
    "register_arch",
    "infer_arch",
    "is_user_code",
    "load_model",
]

TORCHVISION_PREFIX = "torchvision:"
# Entries of a checkpoint dict that may hold the state dict, in order of preference.
_STATE_DICT_ENTRIES = ("state_dict", "model", "model_state_dict")
_MAX_LISTED = 4  # keys named per category in mismatch messages
# The "format" entry of a file written by si_compress.compress.save_compressed.
_COMPRESSED_FORMAT = "si_compress.compressed"


class ModelLoadError(ValueError):
    """A checkpoint could not be read or does not fit the requested architecture (one-line message)."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference (eval mode, on CPU) and where it came from.

    ``key_style``: ``"plain"`` (keys as in the model), ``"dataparallel"`` (a ``module.`` prefix was
    stripped), ``"pickled-module"`` (a full nn.Module loaded with ``trust_model=True``) or
    ``"compressed"`` (a file from ``save_compressed``).
    ``container``: where the weights sat in the file: ``"state_dict"``, ``"model"``,
    ``"model_state_dict"`` (a dict entry), ``"top-level"`` (the file is the state dict itself),
    ``"module"`` (a pickled nn.Module) or ``"compressed"``.
    ``arch_kwargs``: the constructor options the model was built with (``build_model(arch,
    num_classes, arch_kwargs)`` rebuilds it).
    """

    model: nn.Module
    arch: str
    num_classes: int
    path: Path
    key_style: str
    container: str
    arch_kwargs: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[[int], nn.Module]] = {}


def register_arch(name: str, builder: Callable[[int], nn.Module], *, overwrite: bool = False) -> None:
    """Register ``builder(num_classes) -> nn.Module`` under the lower-case ``name``."""
    if not isinstance(name, str) or not name or name.lower().startswith(TORCHVISION_PREFIX):
        raise ValueError(f"arch name must be a non-empty string not starting with {TORCHVISION_PREFIX!r}; got {name!r}")
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"arch {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(builder):
        raise TypeError(f"builder for {name!r} must be callable(num_classes) -> nn.Module; got {builder!r}")
    _REGISTRY[key] = builder


def _resnet_builder(depth: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return cifar_resnet(depth, num_classes)

    build.__name__ = f"resnet{depth}"
    return build


for _depth in CIFAR_RESNET_DEPTHS:
    register_arch(f"resnet{_depth}", _resnet_builder(_depth))
register_arch("vgg16_bn", lambda num_classes: vgg16_bn_cifar(num_classes))
# Narrow VGG-16-BN (every width halved / quartered): small enough to train on a CPU.
VGG16_NARROW = {"vgg16_bn_half": 0.5, "vgg16_bn_quarter": 0.25}
for _name, _mult in VGG16_NARROW.items():
    register_arch(_name, lambda num_classes, _m=_mult: vgg16_bn_cifar(num_classes, width_mult=_m))
register_arch("digits_cnn", lambda num_classes: SmallCNN(in_channels=1, num_classes=num_classes))
# The SI paper's other CIFAR-10 networks (and narrow variants that train on a CPU).
register_arch("googlenet_cifar", lambda num_classes: _cifar_nets().googlenet_cifar(num_classes))
register_arch("googlenet_cifar_quarter", lambda num_classes: _cifar_nets().googlenet_cifar(num_classes, width_mult=0.25))
register_arch("densenet40", lambda num_classes: _cifar_nets().densenet40(num_classes))


def _cifar_nets():
    from . import cifar_nets

    return cifar_nets


def _torchvision_classifiers() -> list[str]:
    import torchvision  # lazy: torchvision import costs about a second

    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_archs(*, include_torchvision: bool = False) -> list[str]:
    """Sorted registered arch names; with ``include_torchvision`` also every ``torchvision:<name>``
    classifier (any of them can always be passed to ``build_model``)."""
    names = sorted(_REGISTRY)
    if include_torchvision:
        names += [TORCHVISION_PREFIX + n for n in _torchvision_classifiers()]
    return names


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    return int(num_classes)


def _check_arch_kwargs(arch_kwargs) -> dict:
    if arch_kwargs is None:
        return {}
    if not isinstance(arch_kwargs, Mapping) or not all(isinstance(k, str) for k in arch_kwargs):
        raise TypeError(f"arch_kwargs must be a dict of constructor options (str keys); got {arch_kwargs!r}")
    return dict(arch_kwargs)


def build_model(arch: str, num_classes: int = 10, arch_kwargs: Mapping | None = None) -> nn.Module:
    """A freshly initialised (train-mode) network for ``arch`` with ``num_classes`` outputs.

    ``arch_kwargs``: constructor options for ``torchvision:<name>`` (passed to
    ``torchvision.models.get_model``) and for user code (``path/to/file.py:Class`` or
    ``package.module:Class``: that code is imported and run, and ``Class(**arch_kwargs)`` gets
    ``num_classes`` too when its signature has that parameter and ``arch_kwargs`` lacks it).
    Registered names take no options.
    """
    num_classes = _check_num_classes(num_classes)
    kwargs = _check_arch_kwargs(arch_kwargs)
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a string such as 'resnet20'; got {arch!r}")
    key = arch.strip().lower()
    if key.startswith(TORCHVISION_PREFIX):
        name = arch.strip()[len(TORCHVISION_PREFIX):]
        known = _torchvision_classifiers()
        if name not in known:
            close = [n for n in known if name.lower() in n][:5]
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown torchvision classifier {name!r}{hint} (see available_archs(include_torchvision=True))")
        import torchvision

        kwargs.setdefault("num_classes", num_classes)
        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"torchvision:{name} rejected the options {_call_repr(name, kwargs)} ({_first_line(exc)}); "
                f"fix --arch-kwargs to match the constructor of torchvision.models.{name}"
            ) from None
    if key not in _REGISTRY and is_user_code(arch):
        return _build_user_model(arch.strip(), num_classes, kwargs)
    if key not in _REGISTRY:
        hint = ""
        if ":" in arch:
            hint = "; for your own code write path/to/file.py:Class or package.module:Class"
        elif key.endswith(".py"):
            hint = f"; to use a class from that file write {arch.strip()}:ClassName"
        raise ValueError(
            f"unknown arch {arch!r}; choose one of {', '.join(available_archs())}, 'torchvision:<name>', "
            f"'path/to/file.py:Class' or 'package.module:Class'{hint}"
        )
    if kwargs:
        raise ModelLoadError(
            f"arch {key} takes no constructor options (got arch_kwargs {kwargs!r}); --arch-kwargs is for "
            "torchvision:<name> and your own path/to/file.py:Class or package.module:Class"
        )
    return _REGISTRY[key](num_classes)


# --------------------------------------------------------------------------- user code

_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_ATTR_PATH = _MODULE_PATH  # Class, or Outer.Inner / a factory function


def _split_user_code(arch: str) -> tuple[str, str, bool] | None:
    """(file or module, attribute, is_file) for ``file.py:Class`` / ``pkg.mod:Class``, else None."""
    target, sep, attr = arch.strip().rpartition(":")
    if not sep or not target or not _ATTR_PATH.match(attr) or target.lower() + ":" == TORCHVISION_PREFIX:
        return None
    if target.endswith(".py") or "/" in target or "\\" in target:
        return target, attr, True
    if _MODULE_PATH.match(target):
        return target, attr, False
    return None


def is_user_code(arch) -> bool:
    """True for ``path/to/file.py:Class`` and ``package.module:Class`` (arch names that import and
    run the user's code), False for registered names and ``torchvision:<name>``."""
    return isinstance(arch, str) and _split_user_code(arch) is not None


# resolved file -> ((mtime_ns, size), module): one import per file version, not one per build
_USER_FILES: dict[Path, tuple[tuple[int, int], ModuleType]] = {}


def _import_user_file(arch: str, target: str) -> ModuleType:
    path = Path(target).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"arch {arch!r}: no such Python file {str(path)!r}; pass an existing path/to/file.py:Class"
        )
    path = path.resolve()
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _USER_FILES.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_si_compress_user_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"arch {arch!r}: {path} cannot be imported as a Python module; pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, typing and pickle look the module up by name
    folder = str(path.parent)
    added = folder not in sys.path
    if added:  # so the file can import modules that sit next to it
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if not isinstance(exc, Exception):
            raise
        raise ModelLoadError(
            f"arch {arch!r}: importing {path} failed ({_first_line(exc)}); fix that file, or add the folder "
            "of the modules it imports to PYTHONPATH"
        ) from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    _USER_FILES[path] = (stamp, module)
    return module


def _import_user_module(arch: str, target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise ModelLoadError(
                f"arch {arch!r}: no module named {exc.name!r} on the Python path; add the folder that holds "
                "it to PYTHONPATH, or pass path/to/file.py:Class"
            ) from None
        raise ModelLoadError(
            f"arch {arch!r}: importing module {target!r} failed ({_first_line(exc)}); install that "
            "dependency or add its folder to PYTHONPATH"
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"arch {arch!r}: importing module {target!r} failed ({_first_line(exc)}); fix that module"
        ) from None


def _module_classes(module: ModuleType) -> list[str]:
    """nn.Module subclasses defined in ``module`` (for "did you mean" hints)."""
    return sorted(
        n for n, v in vars(module).items()
        if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__
    )


def _accepts_num_classes(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins / C extensions)
        return False
    p = params.get("num_classes")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _call_repr(name: str, kwargs: Mapping) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def _build_user_model(arch: str, num_classes: int, kwargs: dict) -> nn.Module:
    target, attr, is_file = _split_user_code(arch)
    module = _import_user_file(arch, target) if is_file else _import_user_module(arch, target)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            classes = _module_classes(module)
            found = f"nn.Module classes there: {', '.join(classes[:8])}" if classes else "it defines no nn.Module class"
            raise ModelLoadError(f"arch {arch!r}: {target} has no attribute {attr!r} ({found}); fix the name after ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(
            f"arch {arch!r}: {attr} has type {type(obj).__name__}, not a class; point --arch at the model class "
            "or a function that returns an nn.Module"
        )
    if "num_classes" not in kwargs and _accepts_num_classes(obj):
        kwargs = {**kwargs, "num_classes": num_classes}
    call = _call_repr(attr, kwargs)
    try:
        model = obj(**kwargs)
    except TypeError as exc:
        raise ModelLoadError(
            f"arch {arch!r}: {call} failed ({_first_line(exc)}); pass the constructor's arguments as JSON "
            """with --arch-kwargs '{"name": value}'"""
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"arch {arch!r}: {call} raised {_first_line(exc)}; check --arch-kwargs and that code"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"arch {arch!r}: {call} returned type {type(model).__name__}, not an nn.Module; point --arch at the "
            "model class or a function that returns one"
        )
    return model


# --------------------------------------------------------------------------- inference

_BLOCK_KEY = re.compile(r"^layer([1-3])\.(\d+)\.conv1\.weight$")


def _cifar_resnet_config(state_dict: Mapping[str, torch.Tensor]) -> dict | None:
    """CifarResNet constructor kwargs read from tensor shapes, or None if not a CIFAR ResNet."""
    for key in ("conv1.weight", "linear.weight"):
        if key not in state_dict or not isinstance(state_dict[key], torch.Tensor):
            return None
    blocks: dict[int, set[int]] = {1: set(), 2: set(), 3: set()}
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
        elif key.startswith("layer4."):
            return None  # a torchvision/ImageNet-style ResNet, not the 3-stage CIFAR one
    counts = []
    for stage in (1, 2, 3):
        idx = blocks[stage]
        if not idx or idx != set(range(len(idx))):
            return None
        counts.append(len(idx))
    try:
        width = []
        block_widths = []
        for stage, n in zip((1, 2, 3), counts):
            width.append(int(state_dict[f"layer{stage}.0.conv2.weight"].shape[0]))
            block_widths.append([int(state_dict[f"layer{stage}.{b}.conv1.weight"].shape[0]) for b in range(n)])
        conv1 = state_dict["conv1.weight"]
        linear = state_dict["linear.weight"]
        if conv1.ndim != 4 or linear.ndim != 2:
            return None
        return {
            "num_blocks": counts,
            "num_classes": int(linear.shape[0]),
            "width": width,
            "block_widths": block_widths,
            "in_channels": int(conv1.shape[1]),
        }
    except (KeyError, AttributeError, IndexError):
        return None


_FEATURE_CONV = re.compile(r"^features\.(\d+)\.weight$")
# Module indices of the convs in VGG(cfg=VGG16_CFG).features (conv, BN, ReLU per conv; 1 per 'M').
_VGG16_CONV_POS: list[int] = []
_pos = 0
for _v in VGG16_CFG:
    if _v != "M":
        _VGG16_CONV_POS.append(_pos)
    _pos += 1 if _v == "M" else 3


def _vgg16_config(state_dict: Mapping[str, torch.Tensor]) -> dict | None:
    """VGG constructor kwargs for a VGG-16-BN layout of ANY widths (narrow or pruned), or None.

    The layout (where the max-pools sit, including the one after the last conv) cannot be read
    from the weights alone; a state dict whose convs sit exactly where VGG-16's do is taken to
    have VGG-16's layout.
    """
    head = state_dict.get("classifier.weight")
    if not isinstance(head, torch.Tensor) or head.ndim != 2:
        return None
    convs = {}
    for key, v in state_dict.items():
        m = _FEATURE_CONV.match(key)
        if m and isinstance(v, torch.Tensor) and v.ndim == 4:
            convs[int(m.group(1))] = v
    if sorted(convs) != _VGG16_CONV_POS:
        return None
    widths = [int(convs[i].shape[0]) for i in _VGG16_CONV_POS]
    ins = [int(convs[i].shape[1]) for i in _VGG16_CONV_POS]
    if ins[1:] != widths[:-1] or int(head.shape[1]) != widths[-1]:
        return None
    it = iter(widths)
    cfg = ["M" if v == "M" else next(it) for v in VGG16_CFG]
    return {"cfg": cfg, "num_classes": int(head.shape[0]), "in_channels": ins[0]}


def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """(arch, num_classes) for a state dict with plain keys, or None if it is not recognised.

    CIFAR ResNets are recognised by counting ``layerS.B`` blocks (depth = 6n + 2) and the classes
    from ``linear.weight``; the CIFAR VGG-16-BN by its ``features``/``classifier`` shapes: full
    width is ``vgg16_bn``, half / quarter width ``vgg16_bn_half`` / ``vgg16_bn_quarter``, and any
    other widths in VGG-16's layout (e.g. a pruned VGG) ``vgg`` (rebuilt from the shapes).
    """
    cfg = _cifar_resnet_config(state_dict)
    if cfg is not None:
        n = cfg["num_blocks"]
        if n[0] == n[1] == n[2]:
            return f"resnet{6 * n[0] + 2}", cfg["num_classes"]
        return "cifar_resnet", cfg["num_classes"]
    head = state_dict.get("classifier.weight")
    if isinstance(head, torch.Tensor) and head.ndim == 2 and any(k.startswith("features.") for k in state_dict):
        convs = [v for k, v in state_dict.items() if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4]
        if [int(v.shape[0]) for v in convs] == [c for c in VGG16_CFG if c != "M"]:
            return "vgg16_bn", int(head.shape[0])
        vgg = _vgg16_config(state_dict)
        if vgg is not None:
            for name, mult in VGG16_NARROW.items():
                if vgg["in_channels"] == 3 and vgg["cfg"] == list(vgg16_bn_cifar(width_mult=mult).cfg):
                    return name, vgg["num_classes"]
            return "vgg", vgg["num_classes"]
    return None


def _build_inferred(arch: str, state_dict: Mapping[str, torch.Tensor], num_classes: int) -> nn.Module:
    """Build the inferred arch; CIFAR ResNets take their widths from the checkpoint, so pruned
    (narrower) ones rebuild too."""
    cfg = _cifar_resnet_config(state_dict)
    if cfg is not None:
        cfg["num_classes"] = num_classes
        return CifarResNet(**cfg)
    if arch == "vgg":
        cfg = _vgg16_config(state_dict)
        if cfg is not None:
            cfg["num_classes"] = num_classes
            return VGG(**cfg)
    return build_model(arch, num_classes)


# --------------------------------------------------------------------------- reading files


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__


def _read_checkpoint(path: Path, *, trust_model: bool):
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol 4": torch's note on files written by pickle itself; what
            # matters is whether the safe load succeeds, reported below.
            warnings.filterwarnings("ignore", message=r".*pickle protocol.*", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if m is None and "weights only load failed" not in str(exc).lower():
            raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)})") from None
        if not trust_model:
            what = f"it references {m.group(1)}" if m else _refusal(exc)
            raise ModelLoadError(
                f"{path} is a pickled Python object ({what}), not just weights; loading it "
                "would execute code from the file. Pass --trust-model (trust_model=True) only if you trust "
                "its source, or re-save it with torch.save(model.state_dict(), path)"
            ) from None
    except Exception as exc:  # zip/EOF/key errors from truncated, empty or non-torch files
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    # Only reached for trusted files that need full unpickling.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as exc:  # the pickled class's module or name is not importable
        missing = _first_line(exc)
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            missing = f"no module named {exc.name!r}"
        raise ModelLoadError(
            f"{path} holds a pickled object whose class cannot be imported ({missing}); the model's class must be "
            "importable: add the folder of its module to PYTHONPATH, or save a state dict with "
            "torch.save(model.state_dict(), path) and pass --arch path/to/file.py:Class"
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"{path} could not be unpickled even with --trust-model ({_first_line(exc)}); write it "
                             "with torch.save(model.state_dict(), path) (plain pickle.dump files are not read)") from None


def _refusal(exc: BaseException) -> str:
    """Why torch's safe loader refused a file, in a few words (its message is a paragraph)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", str(exc))
    return f"torch's safe loader refused it: {m.group(1)}" if m else "torch's safe loader refused it"


def _extract(obj, path: Path) -> tuple[object, str]:
    """(state dict or nn.Module, container name)."""
    if isinstance(obj, nn.Module):
        return obj, "module"
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a state dict or a dict with a 'state_dict' entry")
    for entry in _STATE_DICT_ENTRIES:
        inner = obj.get(entry)
        if isinstance(inner, nn.Module):
            return inner, "module"
        if isinstance(inner, Mapping) and inner:
            return inner, entry
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "top-level"
    keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
    raise ModelLoadError(
        f"{path} has no state dict: top-level keys are {keys}; expected tensors or a "
        f"{' / '.join(repr(e) for e in _STATE_DICT_ENTRIES)} entry"
    )


def _clean_state_dict(sd: Mapping, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelLoadError(f"{path}: state dict entries must map names to tensors; bad entries: {bad[:_MAX_LISTED]}")
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in sd.items()}, "dataparallel"
    return dict(sd), "plain"


def _head_key(model: nn.Module) -> str | None:
    """Name of the last Linear layer's weight (the classifier), or None."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = f"{n}.weight"
    return name


def _fmt_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _mismatch_message(model: nn.Module, sd: Mapping[str, torch.Tensor], arch: str) -> str | None:
    expected = model.state_dict()
    # Checkpoints from PyTorch < 0.4.1 lack BatchNorm's num_batches_tracked; BatchNorm fills it in.
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"missing keys {_fmt_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_fmt_keys(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches {_fmt_keys(shapes)}")
    msg = f"checkpoint does not match arch {arch}: " + "; ".join(parts)
    guess = infer_arch(sd)
    if guess is not None and guess[0] not in (arch.lower(), "cifar_resnet", "vgg"):
        msg += f"; did you mean --arch {guess[0]}?"
    elif guess is not None and guess[0] == "vgg":
        msg += "; it looks like a narrow or pruned VGG-16: omit --arch to rebuild it from the checkpoint's shapes"
    elif guess is not None:
        # Same block layout but other widths (or uneven stages): a pruned CIFAR ResNet.
        msg += "; it looks like a pruned CIFAR ResNet: omit --arch to rebuild it from the checkpoint's shapes"
    return msg


def load_model(
    path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    trust_model: bool = False,
    arch_kwargs: Mapping | None = None,
) -> LoadedModel:
    """Load a checkpoint into a CPU model in eval mode.

    Accepts a plain state dict, a dict with the state dict under 'state_dict' / 'model' /
    'model_state_dict', a file written by ``si_compress.compress.save_compressed``, and (only with
    ``trust_model=True``) a fully pickled nn.Module. Without ``arch`` the architecture and class
    count are inferred from the state dict (CIFAR ResNets and VGG-16-BN). ``arch`` may also be
    ``torchvision:<name>`` or user code (``path/to/file.py:Class`` / ``package.module:Class``,
    which imports and runs it); ``arch_kwargs`` are its constructor options (see ``build_model``).
    Raises ModelLoadError with a one-line message on any problem.
    """
    if num_classes is not None:
        num_classes = _check_num_classes(num_classes)
    if arch is not None and not isinstance(arch, str):
        raise TypeError(f"arch must be a string such as 'resnet20'; got {arch!r}")
    kwargs = _check_arch_kwargs(arch_kwargs)
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; pass the checkpoint file itself (e.g. model.pth)")

    obj = _read_checkpoint(path, trust_model=trust_model)
    if isinstance(obj, Mapping) and obj.get("format") == _COMPRESSED_FORMAT:
        return _load_compressed(obj, path, arch=arch, num_classes=num_classes,
                                arch_kwargs=None if arch_kwargs is None else kwargs)
    if kwargs and arch is None:
        raise ModelLoadError(
            "--arch-kwargs (arch_kwargs) needs --arch: the options go to that architecture's constructor"
        )
    found, container = _extract(obj, path)

    if isinstance(found, nn.Module):
        if arch is None:
            return _loaded_module(found, path, num_classes)
        sd, key_style = _clean_state_dict(found.state_dict(), path)
    else:
        sd, key_style = _clean_state_dict(found, path)

    inferred = infer_arch(sd)
    if arch is None:
        if inferred is None:
            raise ModelLoadError(
                f"cannot infer the architecture of {path} from its keys (first: {_fmt_keys(list(sd))}); "
                f"pass --arch (one of {', '.join(available_archs())}, torchvision:<name> or your own "
                "path/to/file.py:Class)"
            )
        arch_name, ckpt_classes = inferred
    else:
        arch_name = arch.strip()
        try:
            probe = build_model(arch_name, num_classes or 10, kwargs)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        head = _head_key(probe)
        ckpt_classes = int(sd[head].shape[0]) if head in sd and sd[head].ndim >= 1 else None
        head_w = probe.state_dict().get(head) if head is not None else None
        probe_classes = int(head_w.shape[0]) if head_w is not None else None

    if num_classes is not None and ckpt_classes is not None and num_classes != ckpt_classes:
        raise ModelLoadError(
            f"{path} has a {ckpt_classes}-class head but num_classes={num_classes} was requested; "
            f"drop --num-classes or pass a checkpoint trained for {num_classes} classes"
        )
    n_cls = num_classes or ckpt_classes or 10

    if arch is None:
        model = _build_inferred(arch_name, sd, n_cls)
    elif n_cls == (num_classes or 10) or probe_classes == n_cls:
        model = probe  # also user code that ignores num_classes: no second run of its constructor
    else:
        model = build_model(arch_name, n_cls, kwargs)

    problem = _mismatch_message(model, sd, arch_name)
    if problem is not None:
        raise ModelLoadError(problem)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # anything the pre-check did not foresee
        raise ModelLoadError(f"checkpoint does not match arch {arch_name}: {_first_line(exc)}") from None
    model.eval()
    if container == "module":
        key_style = "pickled-module"
    if arch_name.lower() in _REGISTRY:
        arch_name = arch_name.lower()  # registry names are case-insensitive; report the canonical one
    return LoadedModel(model=model, arch=arch_name, num_classes=n_cls, path=path, key_style=key_style,
                       container=container, arch_kwargs=kwargs)


def _load_compressed(payload: Mapping, path: Path, *, arch: str | None, num_classes: int | None,
                     arch_kwargs: dict | None) -> LoadedModel:
    """A file from ``save_compressed``, rebuilt by ``si_compress.compress.export.load_compressed``
    (``arch`` / ``arch_kwargs``: None keeps the stored ones)."""
    from ..compress.export import load_compressed  # lazy: the compress package imports this module

    n_cls = payload.get("num_classes")
    if num_classes is not None and n_cls is not None and num_classes != n_cls:
        raise ModelLoadError(
            f"{path} is a compressed {n_cls}-class model but num_classes={num_classes} was requested; "
            "drop --num-classes"
        )
    try:
        model, _plan = load_compressed(path, arch=arch, arch_kwargs=arch_kwargs)
    except ValueError as exc:  # ModelLoadError included
        raise ModelLoadError(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
    used_kwargs = arch_kwargs if arch_kwargs is not None else payload.get("arch_kwargs") or {}
    return LoadedModel(
        model=model.cpu().eval(), arch=str(arch if arch is not None else payload.get("arch")),
        num_classes=int(n_cls if n_cls is not None else num_classes), path=path, key_style="compressed",
        container="compressed", arch_kwargs=dict(used_kwargs),
    )


def _loaded_module(model: nn.Module, path: Path, num_classes: int | None) -> LoadedModel:
    """A trusted, fully pickled module used as is."""
    model = model.cpu().eval()
    sd = model.state_dict()
    inferred = infer_arch(sd)
    if inferred is not None:
        arch, n_cls = inferred
    else:
        arch = type(model).__name__
        head = _head_key(model)
        n_cls = int(sd[head].shape[0]) if head is not None else None
    if num_classes is not None and n_cls is not None and num_classes != n_cls:
        raise ModelLoadError(
            f"{path} has a {n_cls}-class head but num_classes={num_classes} was requested; drop --num-classes"
        )
    n_cls = n_cls if n_cls is not None else num_classes
    if n_cls is None:
        raise ModelLoadError(f"cannot tell how many classes the pickled {type(model).__name__} in {path} has; pass --num-classes")
    return LoadedModel(model=model, arch=arch, num_classes=n_cls, path=path, key_style="pickled-module", container="module")
