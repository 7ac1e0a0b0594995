"""Apply a :class:`~si_compress.plan.CompressionPlan` to a model: a new, physically smaller network.

Order of operations in :func:`apply_plan` (each step sees the result of the previous one):

1. ``dropped_blocks``: each residual section ``post(p(x) + f(x))`` becomes ``post(p(x))`` (its
   shortcut only); each concatenation branch (inception branch, dense layer) is removed with its
   channels in every consumer (``si_compress.structure``).
2. ``truncate_after`` (plain chains): the forward is cut after that module (any layer run once,
   ``structure.truncate_at``), followed by global average pooling and a Linear of the right width.
3. ``layers``: output filters not in ``keep`` are removed with Torch-Pruning's DependencyGraph,
   which also removes the matching input channels of every consumer (BN, next conv, head).
4. ``head``: the classifier is replaced by ``linear`` or ``mlp`` as the plan says.

Residual coupling (found by probing torch-pruning 1.6.1 on ``CifarResNet``): TP's graph treats the
option-A shortcut's ``F.pad`` on channels (``ConstantPadNdBackward0``) as an element-wise op, so
the group of a stage's output channels (stem conv, every block's conv2) runs through the pad into
the *next* stage with the same indices and on to the classifier; pruning it gives a wrong network
(the forward pass fails with a shape mismatch). Such channels are tied by residual additions, so
:func:`apply_plan` refuses any conv whose group also prunes the outputs of another conv or passes
through a channel pad, with a ValueError naming the tied convs. A block's ``conv1`` (its inner
width) is never tied and prunes cleanly.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..plan import CompressionPlan

__all__ = ["apply_plan", "plan_cost", "rebuild", "find_classifier"]



_HEAD_PARTS = (nn.Linear, nn.Dropout, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Flatten, nn.Identity)


def find_classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the classifier head: the last ``nn.Linear``, or the ``nn.Sequential`` holding it
    when that Sequential is an MLP (only Linear, activation, dropout and flatten layers).

    ``linear`` for CifarResNet, ``classifier`` for VGG/SmallCNN, ``fc`` for torchvision ResNets, the
    whole ``head`` of an MLP head; decided by structure, not by name.
    """
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier; cannot locate its head")
    parent_name = last.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if parent_name and isinstance(parent, nn.Sequential) and all(isinstance(c, _HEAD_PARTS) for c in parent) and \
            sum(isinstance(c, nn.Linear) for c in parent) >= 2:
        return parent_name, parent
    return last, model.get_submodule(last)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _head_in_out(model: nn.Module, example_input) -> tuple[int, int]:
    """(input features, outputs) of the classifier head, measured with one forward pass."""
    name, head = find_classifier(model)
    seen = {}

    def hook(mod, args):
        seen["x"] = args[0]

    h = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            out = model(example_input)
    finally:
        h.remove()
    x = seen.get("x")
    if x is None or x.ndim != 2:
        raise ValueError(f"classifier {name!r} did not receive a flat (N, features) input; cannot size a new head")
    return int(x.shape[1]), int(out.shape[1])


def _linear(in_features: int, out_features: int, old: nn.Module) -> nn.Module:
    """A Linear(in, out): the old one when its shape already matches (weights kept), else fresh."""
    if isinstance(old, nn.Linear) and old.in_features == in_features and old.out_features == out_features:
        return old
    return nn.Linear(in_features, out_features)


def _drop_blocks(model: nn.Module, names, example_input) -> None:
    """Drop each section: a residual section ``y = post(p(x) + f(x))`` becomes ``post(p(x))``; a
    concatenation branch goes with its channels in every consumer (``structure.drop_concat_sections``)."""
    from ..structure import _residual_add, drop_concat_sections, drop_section

    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or not name:
            raise ValueError(f"plan drops section {name!r}, which is not a module of {type(model).__name__}")
    new, concat = {}, []
    for name in names:
        module = model.get_submodule(name)
        if list(module.children()) and _residual_add(module)[0] is not None:
            new[name] = drop_section(module)
        else:
            concat.append(name)
    for name, module in new.items():
        _set_module(model, name, module)
    try:
        drop_concat_sections(model, concat, example_input)
    except ValueError as exc:
        raise ValueError(f"plan drops {', '.join(map(repr, concat))}: {exc}") from None


def _truncate(model: nn.Module, after: str, example_input) -> nn.Module:
    """``model`` cut after module ``after`` (any layer the model runs once), then global average pooling
    and a Linear head on its channels (the old head's weights when its shape already fits)."""
    from ..structure import UnsupportedModel, truncate_at

    try:
        module = model.get_submodule(after)
    except AttributeError:
        raise ValueError(f"truncate_after={after!r} is not a module of {type(model).__name__}; use a layer of "
                         "si_compress.structure.describe(model, x).chain") from None
    seen = []
    h = module.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        h.remove()
    if len(seen) != 1 or not isinstance(seen[0], torch.Tensor) or seen[0].ndim < 3:
        raise ValueError(f"truncate_after={after!r} must run once and give a (N, C, ...) map; it ran {len(seen)} times")
    head_name, old_head = find_classifier(model)
    out_features = _head_in_out(model, example_input)[1]
    head = _linear(int(seen[0].shape[1]), out_features, old_head)
    try:
        return truncate_at(model, after, head, head_name)
    except UnsupportedModel as exc:
        raise ValueError(str(exc)) from None


def _check_prunable(model: nn.Module, decision, head_name: str) -> nn.Conv2d:
    try:
        module = model.get_submodule(decision.name)
    except AttributeError:
        raise ValueError(f"plan prunes layer {decision.name!r}, which is not a module of {type(model).__name__}") from None
    if module is _final_linear(model):
        raise ValueError(f"plan prunes {decision.name!r}, the classifier; its outputs are the classes "
                         "and cannot be removed (change the head with the plan's 'head' instead)")
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise ValueError(f"plan prunes {decision.name!r}, a {type(module).__name__}; only nn.Conv2d filters and "
                         "hidden nn.Linear units can be pruned")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(f"plan prunes {decision.name!r}, a grouped/depthwise conv (groups={module.groups}); "
                         "prune the conv that feeds it instead")
    if isinstance(module, nn.Linear) and module.out_features != decision.out_channels:
        raise ValueError(f"plan says {decision.name!r} has {decision.out_channels} outputs but the model's Linear has "
                         f"{module.out_features}; the plan was made for a different model")
    if isinstance(module, nn.Conv2d) and module.out_channels != decision.out_channels:
        raise ValueError(f"plan says {decision.name!r} has {decision.out_channels} filters but the model's conv has "
                         f"{module.out_channels}; the plan was made for a different model")
    return module


def _tied_with(DG, group, conv: nn.Module, names: dict) -> tuple[list[str], list[str]]:
    """(what ties this group's channels: residual additions, channel pads; the other convs/linears whose
    outputs it prunes); ([], ...) when the group may be pruned alone."""
    from torch_pruning import ops

    from ..structure import is_embedding_conv

    why, others = [], []
    for dep, _ in group:
        target = dep.target
        mod = target.module
        if mod is not conv and isinstance(mod, (nn.Conv2d, nn.Linear)) and DG.is_out_channel_pruning_fn(dep.handler) \
                and not (isinstance(mod, nn.Conv2d) and mod.groups > 1) and not is_embedding_conv(mod):
            others.append(names.get(mod, repr(mod)))
        elif target.type == ops.OPTYPE.ELEMENTWISE:
            kind = type(getattr(target, "grad_fn", None)).__name__
            if "Pad" in kind:
                why.append("a channel-padding (option-A) shortcut")
            elif kind.startswith(("Add", "Sub")):
                why.append("a residual addition")
    return sorted(set(why)), sorted(set(others))


def _prune(model: nn.Module, decisions, example_input) -> None:
    import torch_pruning as tp

    from ..structure import channel_embeddings, insert_embedding_convs, restore_channel_gathers

    todo = [(d, model.get_submodule(d.name)) for d in decisions if d.removed]
    if not todo:
        return
    streams = any(d.coupled for d, _ in todo)
    if streams:
        # Channel-padding shortcuts become fixed 1x1 0/1 convs so torch-pruning indexes the stream
        # through them (structure.channel_embeddings); they go back to parameter-free gathers below.
        insert_embedding_convs(model, channel_embeddings(model, example_input))
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    names = {m: n for n, m in model.named_modules()}
    # Build and vet every group before pruning any, so a refused plan leaves nothing half-done
    # (the model is a private copy, but a clear error beats a confusing partial state).
    groups, owner = [], {}
    for d, conv in todo:
        fn = tp.prune_linear_out_channels if isinstance(conv, nn.Linear) else tp.prune_conv_out_channels
        group = DG.get_pruning_group(conv, fn, idxs=list(d.removed))
        why, others = _tied_with(DG, group, conv, names)
        if "a channel-padding (option-A) shortcut" in why and not streams:
            raise ValueError(
                f"cannot prune filters of {d.name!r}: its output channels are tied by residual additions and a "
                f"channel-padding shortcut to {', '.join(others) or 'the next stage'} (a residual stream); a plan "
                "prunes a stream only with all its writers in 'coupled' (make the plan with si-compress), or prune "
                "a block's inner conv (e.g. 'layer1.0.conv1') or drop whole blocks instead")
        if "a channel-padding (option-A) shortcut" in why:
            raise ValueError(
                f"cannot prune filters of {d.name!r}: its channels pass through a channel-padding shortcut that "
                "was not recognised as a channel embedding; prune a block's inner conv or drop whole blocks instead")
        if why and set(others) != set(d.coupled):
            missing, extra = sorted(set(others) - set(d.coupled)), sorted(set(d.coupled) - set(others))
            raise ValueError(
                f"cannot prune filters of {d.name!r}: its output channels are tied by residual additions to "
                f"{', '.join(others) or 'nothing else'}, which must lose the same channels; the plan's 'coupled' "
                f"for it {'lacks ' + ', '.join(missing) if missing else 'lists ' + ', '.join(extra) + ' too'} "
                "(make the plan with si-compress, or prune a block's inner conv instead)")
        if d.coupled and not why:
            raise ValueError(f"plan couples {d.name!r} with {', '.join(d.coupled)}, but its channels are not tied to "
                             "them in this model; the plan was made for a different model")
        for n in [d.name, *others]:
            if n in owner:
                raise ValueError(f"plan prunes the channels of {n!r} twice (through {owner[n]!r} and {d.name!r}); "
                                 "list each residual stream once")
            owner[n] = d.name
        if not DG.check_pruning_group(group):
            raise ValueError(f"pruning {d.name!r} would leave a layer without channels; keep more filters")
        groups.append((conv, fn, list(d.removed)))
    # Re-derive each group right before pruning it: a concatenation's channel offsets change as
    # the groups before it are pruned (torch-pruning updates its index mapping per call).
    for conv, fn, removed in groups:
        DG.get_pruning_group(conv, fn, idxs=removed).prune()
    if streams:
        restore_channel_gathers(model)


def _final_linear(model: nn.Module):
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def _sync_config(model: nn.Module, truncated: bool) -> None:
    """Keep ``model.config()`` truthful for the shapes TP changed in place (best effort)."""
    from ..models import VGG, BasicBlock, CifarResNet, SmallCNN

    if isinstance(model, CifarResNet):
        widths = [list(bw) for bw in model.block_widths]
        for s in range(3):
            for b in range(len(widths[s])):
                m = getattr(model, f"layer{s + 1}")[b]
                if isinstance(m, BasicBlock):
                    widths[s][b] = m.conv1.out_channels
        model.block_widths = tuple(tuple(w) for w in widths)
    elif isinstance(model, VGG) and not truncated:
        model.cfg = tuple("M" if isinstance(m, nn.MaxPool2d) else m.out_channels
                          for m in model.features if isinstance(m, (nn.Conv2d, nn.MaxPool2d)))
    elif isinstance(model, SmallCNN) and not truncated:
        model.widths = tuple(m.out_channels for m in model.features if isinstance(m, nn.Conv2d))
    _, head = find_classifier(model)
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    if hasattr(model, "num_classes"):
        model.num_classes = last.out_features


def _active(name: str, dropped, present: set[str], before: set[str]) -> bool:
    """False for a layer inside a dropped section or cut away by the truncation (the plan ignores it)."""
    if any(name == b or name.startswith(b + ".") for b in dropped):
        return False
    return name in present or name not in before


def apply_plan(model: nn.Module, plan: CompressionPlan, *, example_input: torch.Tensor) -> nn.Module:
    """A new, smaller copy of ``model`` (eval mode) with ``plan`` applied; ``model`` is untouched.

    ``example_input``: one representative batch, e.g. ``torch.zeros(1, 3, 32, 32)``, used to trace
    the dependency graph and to size heads. Raises ValueError for a plan that does not fit.
    """
    if not isinstance(plan, CompressionPlan):
        raise TypeError(f"plan must be a CompressionPlan; got {type(plan).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError("example_input must be a tensor batch such as torch.zeros(1, 3, 32, 32)")
    new = copy.deepcopy(model).eval()
    head_name, _ = find_classifier(new)
    in0, out0 = _head_in_out(new, example_input)
    if plan.head is None and plan.num_classes != out0:
        raise ValueError(f"the plan is for {plan.num_classes} classes but the model has {out0} outputs; "
                         "use the plan made for this model or give the plan a head")

    _drop_blocks(new, plan.dropped_blocks, example_input)
    before = {n for n, _ in new.named_modules()}
    if plan.truncate_after is not None:
        new = _truncate(new, plan.truncate_after, example_input)
        head_name, _ = find_classifier(new)
    present = {n for n, _ in new.named_modules()}

    decisions = [d for d in plan.layers if _active(d.name, plan.dropped_blocks, present, before)]
    for d in decisions:
        _check_prunable(new, d, head_name)
    in_before_prune = _head_in_out(new, example_input)[0]
    _prune(new, decisions, example_input)

    if plan.head is not None:
        h = plan.head
        head_name, old = find_classifier(new)
        in_features = _head_in_out(new, example_input)[0]
        # A planner may size the head before or after pruning the last conv; both describe this head.
        if h.in_features not in (in_features, in_before_prune, in0):
            raise ValueError(f"plan head expects {h.in_features} input features but the compressed model gives "
                             f"{in_features}; re-plan for this model")
        if h.kind == "linear":
            head = _linear(in_features, h.num_classes, old)
        else:
            head = nn.Sequential(nn.Linear(in_features, h.hidden), nn.ReLU(), nn.Linear(h.hidden, h.num_classes))
        _set_module(new, head_name, head)
    _sync_config(new, truncated=plan.truncate_after is not None)
    return new.eval()


def plan_cost(model: nn.Module, plan: CompressionPlan, *, example_input: torch.Tensor) -> tuple[int, int]:
    """Exact (parameters, MACs per sample) of the model ``plan`` would produce (see ``model_cost``)."""
    from ..features.cost import model_cost

    return model_cost(apply_plan(model, plan, example_input=example_input), example_input)


def rebuild(arch: str, num_classes: int, plan: CompressionPlan, *, example_input: torch.Tensor,
            base: dict | None = None, arch_kwargs: dict | None = None) -> nn.Module:
    """The compressed architecture of ``plan`` on a fresh ``build_model(arch, num_classes)`` (random
    weights, eval mode): the skeleton a saved compressed state dict loads into. ``base``
    (``{"class": "CifarResNet" | "VGG", "config": {...}}``) rebuilds the base from its constructor
    config instead, for bases whose widths are not the named arch's."""
    from ..models import build_model
    from ..models.cifar_resnet import CifarResNet
    from ..models.vgg import VGG

    if base:
        classes = {"CifarResNet": CifarResNet, "VGG": VGG}
        if base.get("class") not in classes or not isinstance(base.get("config"), dict):
            raise ValueError(f"unknown base model spec {base!r}; expected a CifarResNet or VGG config")
        model = classes[base["class"]](**base["config"])
    else:
        model = build_model(arch, num_classes, arch_kwargs)
    return apply_plan(model.eval(), plan, example_input=example_input)

