"""Record intermediate activations by module name, and choose which layers to record.

Layer names are module names from ``model.named_modules()`` (``"layer2.0"``, ``"features.3"``).
A name with the suffix ``":input"`` (``"linear:input"``) means the *input* of that module,
captured with a forward pre-hook: this is how the pooled pre-classifier features are recorded
when the pooling is functional (``F.avg_pool2d``) and has no module of its own.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

INPUT_SUFFIX = ":input"

#: Activation modules that count as "conv activations" for plain (non-residual) nets.
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish)
_GLOB_CHARS = set("*?[")

Transform = Callable[[str, torch.Tensor], torch.Tensor]


def _first_tensor(obj, *, what: str) -> torch.Tensor:
    """The tensor itself, or the first tensor of a tuple/list (e.g. ``(out, aux)``)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                return item
    raise ValueError(
        f"{what} produced {type(obj).__name__}, not a tensor or a tuple containing one; "
        "record a module whose output is a tensor"
    )


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")


def _as_name_list(names, what: str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of strings; got {type(names).__name__}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what} must contain strings only; got {bad[0]!r} ({type(bad[0]).__name__})")
    return names


def _split(name: str) -> tuple[str, bool]:
    """``"fc:input"`` -> ("fc", True); ``"fc"`` -> ("fc", False)."""
    if name.endswith(INPUT_SUFFIX):
        return name[: -len(INPUT_SUFFIX)], True
    return name, False


def _unknown_name_error(name: str, modules: dict[str, nn.Module]) -> ValueError:
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f" Did you mean {close}?" if close else ""
    shown = valid[:8] + (["..."] if len(valid) > 8 else [])
    return ValueError(
        f"model has no module named {name!r}.{hint} Valid names include {shown} "
        f"({len(valid)} in all; see dict(model.named_modules())); append {INPUT_SUFFIX!r} to a name "
        "to record that module's input"
    )


def _lookup(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module, bool]]:
    modules = dict(model.named_modules())
    out = []
    for name in names:
        base, is_input = _split(name)
        if base not in modules or (base == "" and not is_input):
            raise _unknown_name_error(base if base else name, modules)
        out.append((name, modules[base], is_input))
    return out


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        return True


class FeatureRecorder:
    """Context manager that records module outputs (or inputs, ``"name:input"``) by name.

    Usage, for any number of batches::

        with FeatureRecorder(model, ["layer1.0", "linear:input"]) as rec:
            for x, _ in loader:
                model(x)
                maps = rec.take()   # {name: Tensor (batch, ...)} for this forward pass

    Captured tensors are detached copies, so in-place ops after the hook (``ReLU(inplace=True)``)
    cannot change them. ``transform(name, tensor)``, if given, is applied inside the hook (e.g. to
    pool a large map at once instead of keeping it); its result is copied too if it still shares
    memory with the activation. Tuple outputs are reduced to their first tensor. Hooks are
    registered on ``__enter__`` and always removed on ``__exit__``, also when the forward raises.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str], *, transform: Transform | None = None):
        _check_model(model)
        names = _as_name_list(layer_names, "layer_names")
        if not names:
            raise ValueError("layer_names is empty; pass at least one module name (see resolve_layers)")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"layer_names contains duplicates: {dupes}; list each layer once")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable(name, tensor) -> tensor; got {type(transform).__name__}")
        self.model = model
        self.layer_names: tuple[str, ...] = tuple(names)
        self._targets = _lookup(model, names)
        self._transform = transform
        self._handles: list = []
        self._captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def _make_hook(self, name: str, is_input: bool):
        def store(value) -> None:
            what = f"layer {name!r}" if not is_input else f"the input of {name[: -len(INPUT_SUFFIX)]!r}"
            t = _first_tensor(value, what=what).detach()
            if self._transform is None:
                kept = t.clone()
            else:
                kept = self._transform(name, t)
                if not isinstance(kept, torch.Tensor):
                    raise TypeError(f"transform returned {type(kept).__name__} for layer {name!r}; expected a tensor")
                kept = kept.detach()
                if _shares_storage(kept, t):
                    kept = kept.clone()
            self._captured[name].append(kept)

        if is_input:
            def pre_hook(module, args):
                store(args)
            return pre_hook

        def hook(module, args, output):
            store(output)
        return hook

    def __enter__(self) -> "FeatureRecorder":
        if self._handles:
            raise RuntimeError("this FeatureRecorder is already active; do not nest it inside itself")
        self.clear()
        try:
            for name, module, is_input in self._targets:
                hook = self._make_hook(name, is_input)
                if is_input:
                    self._handles.append(module.register_forward_pre_hook(hook))
                else:
                    self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def clear(self) -> None:
        """Forget everything captured so far."""
        for v in self._captured.values():
            v.clear()

    def take(self) -> dict[str, torch.Tensor]:
        """Return ``{name: tensor}`` for the forward pass since the last ``take`` and clear.

        Raises ValueError if a layer did not run, or ran more than once (a module reused inside
        one forward pass, such as a shared ``self.relu``, cannot be recorded by name).
        """
        out = {}
        try:
            for name in self.layer_names:
                got = self._captured[name]
                if len(got) == 0:
                    raise ValueError(
                        f"layer {name!r} did not run during the forward pass; it may be unused by "
                        "forward() (check the model's forward) or model(x) was not called before take()"
                    )
                if len(got) > 1:
                    raise ValueError(
                        f"layer {name!r} ran {len(got)} times since the last take(): either the module is "
                        "reused within one forward pass (record a module that runs once, e.g. the "
                        "enclosing block) or take() was not called after each forward pass"
                    )
                out[name] = got[0]
        finally:
            self.clear()
        return out


# ---------------------------------------------------------------------------------------------
# Layer resolution
# ---------------------------------------------------------------------------------------------

def _call_model(model: nn.Module, example_input):
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


class _Trace:
    """One forward pass with every module hooked: call order, call counts and output ranks."""

    def __init__(self, model: nn.Module, example_input):
        modules = [(n, m) for n, m in model.named_modules() if n]
        self.pre: dict[str, int] = {}       # name -> event index of the first pre-hook call
        self.post: dict[str, int] = {}      # name -> event index of the first completion
        self.calls: dict[str, int] = {}
        self.out_ndim: dict[str, int] = {}
        self.in_flat: dict[str, torch.Tensor] = {}
        self.out_flat: dict[str, torch.Tensor] = {}
        self._keep = set()
        counter = [0]
        handles = []

        def make(name):
            def pre(module, args):
                counter[0] += 1
                self.pre.setdefault(name, counter[0])
                if name in self._keep and name not in self.in_flat:
                    try:
                        self.in_flat[name] = _first_tensor(args, what=name).detach().flatten(1).clone()
                    except ValueError:
                        pass

            def post(module, args, output):
                counter[0] += 1
                self.post.setdefault(name, counter[0])
                self.calls[name] = self.calls.get(name, 0) + 1
                t = output if isinstance(output, torch.Tensor) else None
                if t is None and isinstance(output, (tuple, list)):
                    t = next((o for o in output if isinstance(o, torch.Tensor)), None)
                if t is not None:
                    self.out_ndim.setdefault(name, t.ndim)
                    if name in self._keep and name not in self.out_flat:
                        self.out_flat[name] = t.detach().flatten(1).clone()
            return pre, post

        self._keep = {n for n, m in modules if isinstance(m, _ACTIVATIONS + (nn.Linear,))}
        modes = [(m, m.training) for m in model.modules()]
        try:
            for name, m in modules:
                pre, post = make(name)
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
            model.eval()
            with torch.inference_mode():
                _call_model(model, example_input)
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.training = mode

    def key(self, name: str) -> int | None:
        base, is_input = _split(name)
        return (self.pre if is_input else self.post).get(base)


def _default_layers(model: nn.Module, example_input) -> list[str]:
    """Every section output and the classifier input, from the model adapter (``si_compress.structure``)."""
    from ..structure import describe

    if example_input is None:
        raise ValueError("the default layers are read from a traced forward pass: pass example_input "
                         "(e.g. torch.zeros(1, 3, 32, 32)) or explicit layer names")
    layers = list(describe(model, example_input).layers)
    if not layers:
        raise ValueError(f"found no layer to record in {type(model).__name__}: no module that runs once holds a "
                         "conv, and no nn.Linear classifier; pass layer names explicitly")
    return layers


def resolve_layers(model: nn.Module, patterns: str | Iterable[str] | None = None, *,
                   example_input=None) -> list[str]:
    """Layer names to record, in execution order when ``example_input`` is given.

    ``patterns``: exact module names, ``"name:input"`` or fnmatch globs (``"layer3.*"``; ``*``
    also crosses dots, so it matches ``layer3.0`` and ``layer3.0.conv1``). A pattern that matches
    nothing raises ValueError. Default (None):

    every section output the model adapter finds (residual blocks, inception/dense blocks, a plain
    chain's activations; see ``si_compress.structure``) and the classifier input (``"fc:input"``);
    this needs ``example_input``.

    ``example_input`` (a batch, e.g. ``torch.zeros(1, 3, 32, 32)``) runs one forward pass in eval
    mode (training flags are restored; BN statistics are untouched) to order the names by
    execution and to drop glob matches that never run; the default choice then also skips modules
    that run more than once per forward (shared activations) and, for plain nets, keeps only
    activations on conv maps (ndim >= 3). Without it, registration order from ``named_modules()`` is
    used and the activations registered before the first ``nn.Linear`` are taken as conv activations.
    """
    _check_model(model)
    trace = _Trace(model, example_input) if example_input is not None else None
    if patterns is None:
        return _default_layers(model, example_input)

    pats = _as_name_list(patterns, "patterns")
    if not pats:
        raise ValueError("patterns is empty; pass None for the default layers or at least one name/glob")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    chosen: list[str] = []
    for pat in pats:
        base, is_input = _split(pat)
        if not (_GLOB_CHARS & set(base)):
            _lookup(model, [pat])  # raises a helpful ValueError for unknown names
            if trace is not None and trace.key(pat) is None:
                raise ValueError(f"layer {pat!r} did not run in a forward pass of example_input; "
                                 "choose a module that forward() uses")
            matched = [pat]
        else:
            matched = [n + (INPUT_SUFFIX if is_input else "") for n in names if fnmatch.fnmatchcase(n, base)]
            if trace is not None:
                matched = [n for n in matched if trace.key(n) is not None]
            if not matched:
                shown = names[:8] + (["..."] if len(names) > 8 else [])
                raise ValueError(
                    f"pattern {pat!r} matches no module{' that runs in forward()' if trace else ''}; "
                    f"module names look like {shown}"
                )
        for n in matched:
            if n not in chosen:
                chosen.append(n)

    if trace is not None:
        chosen.sort(key=trace.key)
    else:
        order = {n: i for i, n in enumerate(names)}
        # A module's input comes just before its output in registration order.
        chosen.sort(key=lambda n: (order[_split(n)[0]], 0 if _split(n)[1] else 1))
    return chosen
