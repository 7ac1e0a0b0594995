"""The model adapter: the one place that knows about architectures, derived from the graph.

``describe(model, example_input)`` (alias ``prunable_structure``) reads a trained ``nn.Module``
(torchvision, timm-style or a user's class) and returns plain data for analysis, planner, executor,
compensation and latency tables. Nothing here looks at module or class names; everything comes from
one traced forward pass:

- **Cut modules** (autograd graph): a module is a *cut* when every path from the input to the
  output passes through its output (a stage, a residual block, a plain chain's activation), i.e.
  removing its output's ``grad_fn`` disconnects the output from the input. A residual branch's
  inner conv is not a cut (the shortcut bypasses it).
- **Recorded layers** (what SI is measured on): walking the module tree from the root, a child run
  exactly once that holds a conv is *atomic* (recorded whole) unless it only runs its children in
  order (``nn.Sequential.forward``), in which case its children are visited; activation modules run
  once are recorded too. A cut conv whose activation is functional (``F.relu``) is observed at the
  input of the next recorded or cut module (``"layer1.0:input"``). The classifier input
  (``"fc:input"``) ends the list. Modules reused within one forward (a shared ``nn.ReLU``) cannot be
  recorded by name; the cut module after them is used instead.
- **Removable sections** (``torch.fx`` on each atomic module): a module computing
  ``y = post(p(x) + f(x))`` with one residual addition, a branch ``f`` holding a conv and a
  shortcut ``p`` (identity, or a projection disjoint from ``f``), and no parameters after the
  addition. Dropping it keeps ``post(p(x))`` (``drop_section``).
- **Channel groups** (torch-pruning's ``DependencyGraph``): coupled channels (BN, depthwise convs,
  concatenations, every consumer), rooted at the conv/linear that runs first. Each has where its
  channels are observed for SI (the input of its first consumer, with the channel indices there),
  MACs and params per channel (conv/linear weights of every member) and the section it lies in.
  A group tied by residual additions is a *residual stream* (a stage's shared channels): every conv
  writing it is listed in ``coupled`` and it is observed at the output of the last section it
  feeds. A parameter-free shortcut that subsamples and zero-pads channels (the CIFAR "option A")
  is found by probing (``channel_embeddings``) and seen by torch-pruning as a fixed 1x1 0/1 conv,
  so stream channels keep their indices across stages; after pruning it becomes a
  ``ChannelGather`` again (no parameters, no MACs).
- **Head**: the last ``nn.Linear`` in execution order is the classifier; ``head_input`` is the input
  of the first Linear after the last conv (the pooled features the head reads).
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish,
                nn.Hardtanh, nn.Sigmoid, nn.Tanh)
_ADDS = {operator.add, operator.iadd, torch.add}


class UnsupportedModel(ValueError):
    """A construct the adapter cannot handle; the message names the module and what to do."""


@dataclass(frozen=True)
class BlockUnit:
    """A removable section.

    ``kind="residual"``: ``y = post(p(x) + f(x))``; dropping it keeps ``post(p(x))``.
    ``kind="concat"``: a branch whose output is an operand of a channel concatenation (an inception
    branch, a dense layer); dropping it removes the branch and its channels from every consumer.
    """

    name: str
    macs: int          # MACs per sample a drop removes (the branch, plus its channels' consumers for concat)
    downsample: bool   # the shortcut is not the identity (a projection or a parameter-free reshape)
    params: int        # parameters a drop removes
    branch: tuple[str, ...] = ()   # leaf modules of the branch
    kind: str = "residual"
    parent: str = ""               # concat: the recorded module whose concatenation holds the branch
    channels: tuple[int, ...] = ()  # concat: the branch's channels in the parent's output (() = unknown)
    needs_one: bool = False        # concat: every operand is a branch; one must stay


@dataclass(frozen=True)
class ConvUnit:
    """A channel group rooted at ``conv`` (its output channels index the group)."""

    conv: str                  # root module (conv or linear) whose output channels form the group
    consumer: str              # first consumer (its input holds the channels)
    activation: str            # layer name where the channels are observed ("<consumer>:input")
    out_channels: int
    macs_per_filter: int       # MACs per sample removed with one channel (every member's share)
    params_per_filter: int     # parameters removed with one channel (every member's share, BN included)
    block: str | None          # removable section the whole group lies in (dropping it removes the group)
    observe_index: tuple[int, ...] = ()   # channel of the observed tensor per root channel (() = identity)
    scope: str | None = None   # recorded layer (atomic module) holding the root, for its SI gain
    members: tuple[str, ...] = ()
    coupled: tuple[str, ...] = ()  # a residual stream: the other convs whose outputs are these channels
    shares: tuple[tuple[str, int], ...] = ()  # stream: (member, MACs per channel) so drops can be netted out


@dataclass(frozen=True)
class SkippedGroup:
    conv: str
    out_channels: int
    reason: str


@dataclass(frozen=True)
class ModelStructure:
    blocks: tuple[BlockUnit, ...]            # removable sections
    convs: tuple[ConvUnit, ...]              # channel groups the planner may resize
    chain: tuple[str, ...]                   # plain chains (no sections): recorded modules in order (cut points)
    total_macs: int
    total_params: int
    layers: tuple[str, ...] = ()             # layers to record for SI, in execution order
    head: str = ""                           # the classifier (last nn.Linear)
    head_input: str = ""                     # layer name of the classifier input ("fc:input")
    head_modules: tuple[str, ...] = ()       # modules from the head input to the output (Linear/act/dropout)
    skipped: tuple[SkippedGroup, ...] = ()   # groups left whole, with the reason
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- tracing

def _call(model, x):
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        return next((o for o in obj if isinstance(o, torch.Tensor)), None)
    return None


class _Run:
    """One eval-mode forward with autograd on: per-module call counts, event order, output grad_fns."""

    def __init__(self, model: nn.Module, example_input):
        self.named = {n: m for n, m in model.named_modules() if n}
        self.calls: dict[str, int] = {}
        self.pre: dict[str, int] = {}
        self.post: dict[str, int] = {}
        self.out_shape: dict[str, tuple] = {}
        self.in_shape: dict[str, tuple] = {}
        self.node: dict[str, object] = {}
        self.macs: dict[str, int] = {}
        counter = [0]
        handles = []

        def make(name):
            def pre(mod, args):
                counter[0] += 1
                self.pre.setdefault(name, counter[0])
                t = _first_tensor(args)
                if t is not None:
                    self.in_shape.setdefault(name, tuple(t.shape))

            def post(mod, args, out):
                counter[0] += 1
                self.post.setdefault(name, counter[0])
                self.calls[name] = self.calls.get(name, 0) + 1
                t = _first_tensor(out)
                if t is not None:
                    self.out_shape.setdefault(name, tuple(t.shape))
                    if self.calls[name] == 1:
                        self.node[name] = t.grad_fn
                    if isinstance(mod, _CONVS):
                        pos = math.prod(int(s) for s in t.shape[2:])
                        self.macs[name] = self.macs.get(name, 0) + pos * mod.out_channels * \
                            (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
                    elif isinstance(mod, nn.Linear):
                        rows = t.numel() // (t.shape[0] * mod.out_features) if t.ndim > 1 else 1
                        self.macs[name] = self.macs.get(name, 0) + rows * mod.in_features * mod.out_features
            return pre, post

        modes = [(m, m.training) for m in model.modules()]
        x = example_input
        try:
            for name, m in self.named.items():
                pre, post = make(name)
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
            model.eval()
            with torch.enable_grad():
                x = x.detach().clone().requires_grad_(True) if isinstance(x, torch.Tensor) else x
                out = _call(model, x)
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.training = mode
        out = _first_tensor(out)
        if out is None:
            raise UnsupportedModel(f"{type(model).__name__}'s forward returned no tensor; the adapter needs a "
                                   "model whose output is the logits tensor (N, classes)")
        self.output_shape = tuple(out.shape)
        self._cuts = self._cut_set(out.grad_fn, x)

    def _cut_set(self, root, x) -> set[str]:
        """Names of modules whose output node separates the model output from its input."""
        if root is None or not isinstance(x, torch.Tensor):
            return set()
        succ: dict = {}
        stack, seen = [root], {root}
        target = None
        while stack:
            n = stack.pop()
            nxt = [f for f, _ in n.next_functions if f is not None]
            succ[n] = nxt
            if getattr(n, "variable", None) is x:
                target = n
            for f in nxt:
                if f not in seen:
                    seen.add(f)
                    stack.append(f)
        if target is None:
            return set()

        def reaches_without(block) -> bool:
            if block is root:
                return False
            st, vis = [root], {root}
            while st:
                n = st.pop()
                if n is target:
                    return True
                for f in succ.get(n, ()):
                    if f is not block and f not in vis:
                        vis.add(f)
                        st.append(f)
            return False

        cuts = set()
        verdict: dict = {}
        for name, node in self.node.items():
            if node is None or node not in succ:
                continue
            if node not in verdict:
                verdict[node] = not reaches_without(node)
            if verdict[node]:
                cuts.add(name)
        return cuts

    def is_cut(self, name: str) -> bool:
        return name in self._cuts


def _splittable(m: nn.Module) -> bool:
    """True for containers that only run their children in order (nn.Sequential's own forward)."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(s, _CONVS) for s in m.modules())


def _recorded_layers(model: nn.Module, run: _Run) -> list[str]:
    atomic: list[str] = []

    def visit(prefix: str, module: nn.Module):
        for cname, child in module.named_children():
            name = f"{prefix}.{cname}" if prefix else cname
            calls = run.calls.get(name, 0)
            if calls == 0:
                continue
            if _splittable(child) and calls == 1:
                visit(name, child)
                continue
            if calls != 1:
                continue  # shared module: not recordable by name
            if isinstance(child, _ACTIVATIONS):
                if run.is_cut(name) and len(run.out_shape.get(name, ())) >= 3:
                    atomic.append(name)
                continue
            if not _has_conv(child) or len(run.out_shape.get(name, ())) < 3:
                continue
            if not list(child.children()):
                continue  # a leaf conv: observed after its activation (below)
            if run.is_cut(name):
                atomic.append(name)
            else:
                visit(name, child)

    visit("", model)
    return atomic


# --------------------------------------------------------------------------- sections (torch.fx)

def _ancestors(node) -> set:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _residual_add(module: nn.Module):
    """(graph module, add node, branch operand, shortcut operand) of a module with exactly one residual
    addition, or (None, reason)."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:  # data-dependent control flow, unsupported ops, ...
        return None, f"torch.fx cannot trace it ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None, "its forward takes more than one input"
    x = placeholders[0]
    mods = dict(gm.named_modules())

    def is_add(n):
        return (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in ("add", "add_"))

    def weighty(nodes):
        return [n for n in nodes if n.op == "call_module" and isinstance(mods.get(n.target), _CONVS)]

    found = []
    for n in gm.graph.nodes:
        if not is_add(n) or len(n.args) < 2 or not all(isinstance(a, fx.Node) for a in n.args[:2]):
            continue
        a, b = n.args[:2]
        anc_a, anc_b = _ancestors(a) | {a}, _ancestors(b) | {b}
        if x not in anc_a or x not in anc_b:
            continue
        ca, cb = weighty(anc_a - anc_b), weighty(anc_b - anc_a)
        if not ca and not cb:
            continue
        branch, short = (a, b) if len(ca) >= len(cb) else (b, a)
        anc_br = _ancestors(branch) | {branch}
        anc_sh = _ancestors(short) | {short}
        if (anc_br & anc_sh) - {x}:
            continue  # the two operands share work: not a branch that can go alone
        found.append((n, branch, short))
    if len(found) != 1:
        return None, ("no residual addition" if not found else f"{len(found)} residual additions")
    add, branch, short = found[0]
    after = [n for n in gm.graph.nodes if add in _ancestors(n)]
    if any(n.op == "call_module" and any(True for _ in mods[n.target].parameters()) for n in after):
        return None, "layers with parameters run after its residual addition"
    return (gm, add, branch, short), ""


def drop_section(module: nn.Module) -> nn.Module:
    """``module`` with its residual branch removed: ``post(p(x))`` as a ``torch.fx.GraphModule`` that
    keeps the shortcut's submodules under their names (a state dict of the result loads into it)."""
    import torch.fx as fx

    found, why = _residual_add(module)
    if found is None:
        raise UnsupportedModel(f"{type(module).__name__} is not a removable residual section: {why}")
    gm, add, _, short = found
    add.replace_all_uses_with(short)
    gm.graph.erase_node(add)
    if short.op == "placeholder":
        # post-ops now read the section's input itself: an in-place activation there (torchvision's
        # ReLU(inplace=True)) would overwrite the caller's tensor, which autograd still needs
        import copy

        for n in list(short.users):
            mod = gm.get_submodule(n.target) if n.op == "call_module" else None
            if getattr(mod, "inplace", False):
                safe = copy.copy(mod)
                safe.inplace = False
                name = n.target.replace(".", "_") + "_out_of_place"
                gm.add_submodule(name, safe)
                n.target = name
            elif n.op == "call_function" and n.kwargs.get("inplace"):
                n.kwargs = {**n.kwargs, "inplace": False}
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return fx.GraphModule(gm, gm.graph, class_name=f"{type(module).__name__}Dropped")


# --------------------------------------------------------------------------- concat sections

_CATS = {torch.cat, torch.concat, torch.concatenate} if hasattr(torch, "concatenate") else {torch.cat, torch.concat}
_KEEP_CHANNELS_FN = {torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu, torch.nn.functional.relu6,
                     torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.hardswish,
                     torch.nn.functional.leaky_relu, torch.nn.functional.elu, torch.nn.functional.dropout,
                     torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d}
_KEEP_CHANNELS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
_KEEP_CHANNELS_MODULES = _ACTIVATIONS + (nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d)


def _trace_children(module: nn.Module):
    """``module`` traced by torch.fx with its direct children as leaves: (GraphModule, None) or
    (None, reason)."""
    import torch.fx as fx

    kids = {id(m) for m in module.children()}

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return id(m) in kids or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(module)
    except Exception as exc:
        return None, f"torch.fx cannot trace it ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return fx.GraphModule(module, graph, class_name=type(module).__name__), None


def _is_cat(n) -> bool:
    if n.op != "call_function" or n.target not in _CATS or not n.args or not isinstance(n.args[0], (list, tuple)):
        return False
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    return dim in (1, -3)


def _keeps_channels(n, mods) -> bool:
    """A parameter-free op on one tensor that leaves channel indices where they are."""
    inputs = n.all_input_nodes
    if len(inputs) != 1:
        return False
    if n.op == "call_module":
        return isinstance(mods.get(n.target), _KEEP_CHANNELS_MODULES)
    if n.op == "call_function":
        return n.target in _KEEP_CHANNELS_FN
    return n.op == "call_method" and n.target in _KEEP_CHANNELS_METHODS


def _in_list_arg(user, node) -> bool:
    return any(isinstance(a, (list, tuple)) and node in a for a in list(user.args) + list(user.kwargs.values()))


def concat_branches(module: nn.Module) -> tuple[object, dict]:
    """The branches of ``module`` that feed channel concatenations only, and can be dropped.

    Returns (GraphModule traced with the direct children as leaves, or None;
    ``{child: (call node, end node)}``) where ``end`` is the child's output after channel-preserving,
    parameter-free ops (ReLU, pooling, dropout), used only inside lists: as an operand of a
    ``torch.cat(..., dim=1)`` or in a list another child reads (a DenseNet layer reads the list of all
    earlier outputs and concatenates it itself). A child called more than once never qualifies.
    """
    gm, _ = _trace_children(module)
    if gm is None:
        return None, {}
    mods = dict(gm.named_modules())
    calls: dict[str, list] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and "." not in n.target:
            calls.setdefault(n.target, []).append(n)
    out = {}
    for child, nodes in calls.items():
        if len(nodes) != 1 or not _has_conv(mods[child]):
            continue
        end = nodes[0]
        while len(end.users) == 1 and _keeps_channels(next(iter(end.users)), mods):
            end = next(iter(end.users))
        users = list(end.users)
        cats = [u for u in users if _is_cat(u) and end in u.args[0]]
        if not cats or not all(u in cats or (u.op == "call_module" and "." not in u.target and _in_list_arg(u, end))
                               for u in users):
            continue
        out[child] = (nodes[0], end)
    return gm, out


def _output_cat(gm):
    """The concatenation that is the graph's output (through channel-preserving ops), or None."""
    mods = dict(gm.named_modules())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    n = out.args[0]
    while hasattr(n, "op") and not _is_cat(n) and _keeps_channels(n, mods):
        n = n.all_input_nodes[0]
    return n if hasattr(n, "op") and _is_cat(n) else None


def _concat_sections(run: "_Run", atomic: list[str], sections: dict) -> dict[str, dict]:
    """section name -> {parent, leaves, channels, needs_one} for droppable concatenation branches."""
    found = {}
    for parent in atomic:
        if parent in sections or not list(run.named[parent].children()):
            continue
        gm, branches = concat_branches(run.named[parent])
        if not branches:
            continue
        cat = _output_cat(gm)
        offsets = {}
        if cat is not None:
            at = 0
            for operand in cat.args[0]:
                src = operand
                while src.op != "call_module" or "." in src.target:
                    if not src.all_input_nodes:
                        break
                    src = src.all_input_nodes[0]
                shape = run.out_shape.get(f"{parent}.{src.target}") if src.op == "call_module" else None
                if shape is None and src.op == "placeholder":
                    shape = run.in_shape.get(parent)
                if shape is None or len(shape) < 2:
                    offsets = {}
                    break
                offsets[operand] = (at, at + int(shape[1]))
                at += int(shape[1])
        for child, (node, end) in branches.items():
            name = f"{parent}.{child}"
            if run.calls.get(name) != 1:
                continue
            leaves = tuple(sorted(f"{name}.{n}" if n else name for n, m in run.named[name].named_modules()
                                  if not list(m.children())))
            span = offsets.get(end)
            cats = [u for u in end.users if _is_cat(u)]
            needs_one = any(all(a in {e for _, e in branches.values()} for a in c.args[0]) for c in cats)
            found[name] = dict(parent=parent, leaves=leaves, channels=tuple(range(*span)) if span else (),
                               needs_one=needs_one, out_channels=int(run.out_shape[name][1]))
    return found


def drop_concat_sections(model: nn.Module, names, example_input) -> None:
    """Remove, in place, each branch in ``names`` (see :func:`concat_branches`) and its channels from
    every consumer: torch-pruning removes the channels (its index mapping follows them through the
    concatenations), then the parent is re-traced without the branch (a ``torch.fx.GraphModule`` that
    keeps the other children under their names). Raises UnsupportedModel for a name that is not a
    droppable branch or whose channels are tied by a residual addition."""
    import torch_pruning as tp
    from torch_pruning import ops

    names = list(dict.fromkeys(names))
    if not names:
        return
    by_parent: dict[str, list[str]] = {}
    roots = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        try:
            pmod = model.get_submodule(parent) if parent else model
            branch = model.get_submodule(name)
        except AttributeError:
            raise UnsupportedModel(f"section {name!r} is not a module of {type(model).__name__}") from None
        _, branches = concat_branches(pmod)
        if child not in branches:
            raise UnsupportedModel(f"{name!r} is not a removable section: neither a residual section nor a branch "
                                   f"feeding only channel concatenations of {parent or 'the model'}; only sections "
                                   "listed by si_compress.structure.describe(model, x).blocks can be dropped")
        by_parent.setdefault(parent, []).append(child)
        # the branch's output channels are those of the last conv/linear run inside it
        order = []
        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: order.append(n))
                 for n, m in branch.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            with torch.no_grad():
                model.eval()(example_input)
        finally:
            for h in hooks:
                h.remove()
        if not order:
            raise UnsupportedModel(f"branch {name!r} runs no conv; nothing to drop")
        roots[name] = branch.get_submodule(order[-1])
    for parent, children in by_parent.items():
        _, branches = concat_branches(model.get_submodule(parent) if parent else model)
        gone = {branches[c][1] for c in children}
        if any(_is_cat(u) and all(a in gone for a in u.args[0]) for e in gone for u in e.users):
            raise UnsupportedModel(f"dropping {', '.join(parent + '.' + c for c in children)} would leave a "
                                   f"concatenation in {parent} empty; keep one of its branches")
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    for name, root in roots.items():
        fn = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
        width = root.out_features if isinstance(root, nn.Linear) else root.out_channels
        group = DG.get_pruning_group(root, fn, idxs=list(range(width)))
        for dep, _ in group:
            kind = type(getattr(dep.target, "grad_fn", None)).__name__
            if dep.target.type == ops.OPTYPE.ELEMENTWISE and kind.startswith(("Add", "Sub", "ConstantPad")):
                raise UnsupportedModel(f"the channels of branch {name!r} are tied by a residual addition; "
                                       "it cannot be dropped alone")
    # Prune one branch at a time, re-deriving its group: concatenation offsets move as branches go.
    for name, root in roots.items():
        fn = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
        width = root.out_features if isinstance(root, nn.Linear) else root.out_channels
        DG.get_pruning_group(root, fn, idxs=list(range(width))).prune()
    import torch.fx as fx

    for parent, children in by_parent.items():
        pmod = model.get_submodule(parent) if parent else model
        gm, branches = concat_branches(pmod)
        for child in children:
            _, end = branches[child]
            for u in list(end.users):
                u.args = tuple([a for a in arg if a is not end] if isinstance(arg, (list, tuple)) else arg
                               for arg in u.args)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        new = fx.GraphModule(gm, gm.graph, class_name=f"{type(pmod).__name__}Pruned")
        if parent:
            owner, _, attr = parent.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, new)
        else:
            raise UnsupportedModel("a branch of the model's own forward cannot be dropped; wrap the branches in a module")


def _sections(model: nn.Module, run: _Run, atomic: list[str], notes: list[str]) -> dict[str, tuple[tuple[str, ...], bool]]:
    """section name -> (its branch's leaf module names (full names), whether its shortcut is the identity)."""
    out = {}
    for name in atomic:
        module = run.named[name]
        if not list(module.children()):
            continue
        found, why = _residual_add(module)
        if found is None:
            if why.startswith("torch.fx"):
                notes.append(f"{name} ({type(module).__name__}): {why}; it is analysed and its channels pruned, "
                             "but it cannot be dropped (make its forward traceable by torch.fx to allow that)")
            continue
        gm, add, branch, short = found
        anc_sh = _ancestors(short) | {short}
        in_branch = (_ancestors(branch) | {branch}) - anc_sh
        # a module also called outside the branch (a shared ReLU used after the addition) stays
        elsewhere = {n.target for n in gm.graph.nodes if n.op == "call_module" and n not in in_branch}
        leaves = sorted({f"{name}.{n.target}" for n in in_branch if n.op == "call_module" and n.target not in elsewhere})
        if leaves:
            out[name] = (tuple(leaves), _is_identity(gm, short))
    return out


# --------------------------------------------------------------------------- channel embeddings

class ChannelGather(nn.Module):
    """Parameter-free channel embedding: ``out[:, j] = x[:, src[j], ::sh, ::sw]``, zeros where
    ``src[j] < 0``. (N, C_in, H, W) -> (N, len(src), ceil(H/sh), ceil(W/sw)).

    What an option-A shortcut (subsample + zero channel padding) becomes after its input and output
    channels were pruned independently: no parameters, no MACs, traceable and ONNX-exportable.
    """

    def __init__(self, src, in_channels: int, stride=(1, 1)) -> None:
        super().__init__()
        src = torch.as_tensor([int(i) for i in src], dtype=torch.long)
        self.in_channels = int(in_channels)
        self.stride = tuple(int(v) for v in stride)
        self.pads = bool((src < 0).any())
        # a missing source reads one appended zero channel
        self.register_buffer("index", torch.where(src < 0, torch.full_like(src, self.in_channels), src),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        if self.pads:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 1))
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.index.numel()}, stride={self.stride}"


@dataclass(frozen=True)
class ChannelEmbedding:
    """A parameter-free module found to compute ``out[:, j] = x[:, src[j], ::s0, ::s1]`` (or zeros)."""

    name: str
    src: tuple[int, ...]       # input channel per output channel, -1 for a zero channel
    in_channels: int
    stride: tuple[int, int]


_EMBED_FLAG = "_si_channel_embedding"


def channel_embeddings(model: nn.Module, example_input) -> dict[str, ChannelEmbedding]:
    """Parameter-free modules that change the channel count by copying input channels (subsampled)
    and adding zero channels, found by probing each one on random inputs (no names, no classes).

    Candidates: modules without parameters, run once on a (N, C, H, W) tensor, whose output
    (N, C', H', W') has C' != C. A candidate qualifies when, for two random inputs, every output
    channel equals one input channel subsampled by the stride (H / H' rounded up) or is all zeros.
    The outermost qualifying module is returned.
    """
    named = {n: m for n, m in model.named_modules() if n}
    shapes: dict[str, list] = {}
    handles = []
    for n, m in named.items():
        if any(True for _ in m.parameters()):
            continue

        def hook(mod, args, out, name=n):
            t_in, t_out = _first_tensor(args), _first_tensor(out)
            if t_in is not None and t_out is not None:
                shapes.setdefault(name, []).append((tuple(t_in.shape), tuple(t_out.shape), t_in.dtype))
        handles.append(m.register_forward_hook(hook))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    found: dict[str, ChannelEmbedding] = {}
    for name in sorted(shapes, key=lambda n: n.count(".")):
        if any(name.startswith(f + ".") for f in found) or len(shapes[name]) != 1:
            continue
        (si, so, dtype) = shapes[name][0]
        if len(si) != 4 or len(so) != 4 or si[1] == so[1] or si[0] != so[0] or not dtype.is_floating_point:
            continue
        e = _probe_embedding(named[name], name, si, so, dtype)
        if e is not None:
            found[name] = e
    return found


def _probe_embedding(module, name, si, so, dtype) -> ChannelEmbedding | None:
    stride = []
    for a, b in zip(si[2:], so[2:]):
        s = next((s for s in range(1, a + 1) if -(-a // s) == b), None)
        if s is None:
            return None
        stride.append(s)
    gen = torch.Generator().manual_seed(0)
    src = None
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn((2,) + tuple(si[1:]), generator=gen).to(dtype)
            try:
                y = module(x)
            except Exception:
                return None
            if not isinstance(y, torch.Tensor) or tuple(y.shape[1:]) != tuple(so[1:]):
                return None
            xs = x[:, :, ::stride[0], ::stride[1]].reshape(2, si[1], -1).transpose(0, 1).reshape(si[1], -1)
            ys = y.reshape(2, so[1], -1).transpose(0, 1).reshape(so[1], -1)
            cur = []
            for j in range(so[1]):
                if not ys[j].any():
                    cur.append(-1)
                    continue
                hit = torch.nonzero((xs == ys[j]).all(dim=1)).flatten()
                if hit.numel() != 1:
                    return None
                cur.append(int(hit[0]))
            if src is not None and cur != src:
                return None
            src = cur
    return ChannelEmbedding(name=name, src=tuple(src), in_channels=int(si[1]), stride=(stride[0], stride[1]))


def insert_embedding_convs(model: nn.Module, embeddings: dict[str, ChannelEmbedding]) -> None:
    """Replace each embedding module in place by a frozen 1x1 conv with 0/1 weights (same function),
    so torch-pruning indexes the channels through it; :func:`restore_channel_gathers` undoes it."""
    for e in embeddings.values():
        conv = nn.Conv2d(e.in_channels, len(e.src), 1, stride=e.stride, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            for j, i in enumerate(e.src):
                if i >= 0:
                    conv.weight[j, i] = 1.0
        conv.weight.requires_grad_(False)
        setattr(conv, _EMBED_FLAG, True)
        _replace_module(model, e.name, conv)


def is_embedding_conv(module: nn.Module) -> bool:
    return bool(getattr(module, _EMBED_FLAG, False))


def restore_channel_gathers(model: nn.Module) -> list[str]:
    """Every embedding conv (from :func:`insert_embedding_convs`, possibly pruned) back to a
    parameter-free :class:`ChannelGather`; returns their names."""
    done = []
    for name, m in list(model.named_modules()):
        if not is_embedding_conv(m):
            continue
        w = m.weight.detach().reshape(m.out_channels, m.in_channels)
        src = [int(torch.argmax(r)) if bool((r != 0).any()) else -1 for r in w]
        _replace_module(model, name, ChannelGather(src, m.in_channels, m.stride))
        done.append(name)
    return done


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# --------------------------------------------------------------------------- channel groups

def _unit_cost(module: nn.Module, macs: int, per_root: float, out_side: bool) -> tuple[float, float]:
    """(MACs, params) removed per root channel for one group member."""
    if isinstance(module, _CONVS):
        k = math.prod(module.kernel_size)
        if module.groups > 1:
            per_m = macs / module.out_channels
            per_p = module.weight[0].numel() + (1 if module.bias is not None else 0)
        elif out_side:
            per_m = macs / module.out_channels
            per_p = module.in_channels * k + (1 if module.bias is not None else 0)
        else:
            per_m = macs / module.in_channels
            per_p = module.out_channels * k
        return per_m * per_root, per_p * per_root
    if isinstance(module, nn.Linear):
        if out_side:
            return macs / module.out_features * per_root, (module.in_features + (module.bias is not None)) * per_root
        return macs / module.in_features * per_root, module.out_features * per_root
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return 0.0, (2 if module.affine else 0) * per_root
    own = [p for p in module.parameters(recurse=False) if p.ndim >= 1]
    return 0.0, float(len(own)) * per_root  # per-channel vectors (PReLU, LayerNorm-style affine)


def _groups(model, example_input, run: _Run, head: str, sections: dict, atomic: list[str], notes: list[str]):
    import torch_pruning as tp
    from torch_pruning import ops

    named = run.named
    work = model
    embeds = channel_embeddings(model, example_input)
    if embeds:  # torch-pruning sees a channel-padding shortcut as a fixed 1x1 conv (see the module doc)
        import copy

        work = copy.deepcopy(model)
        insert_embedding_convs(work, embeds)
    names = {m: n for n, m in work.named_modules() if n}
    try:
        DG = tp.DependencyGraph().build_dependency(work, example_inputs=example_input, verbose=False)
    except Exception as exc:
        notes.append(f"torch-pruning could not trace the model ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                     "no channel groups")
        return [], [], {}
    ignored = [named[head]] if head in named else []
    units, skipped = [], []
    costs = {}  # root -> [(member, MACs per root channel, params per root channel)]
    for group in DG.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        members = []
        outs, tied_add, pad = [], False, False
        for item in group:
            dep, idxs = item.dep, item.idxs
            mod = dep.target.module
            tname = dep.target.type
            if tname == ops.OPTYPE.ELEMENTWISE:
                gf = type(getattr(dep.target, "grad_fn", None)).__name__
                if gf.startswith("Add") or gf.startswith("Sub"):
                    tied_add = True
                if "Pad" in gf:
                    pad = True
            if isinstance(mod, nn.Module) and mod in names and not is_embedding_conv(mod):
                out_side = DG.is_out_channel_pruning_fn(dep.handler)
                members.append((names[mod], mod, len(idxs), out_side))
                if out_side and isinstance(mod, (nn.Conv2d, nn.Linear)):
                    dw = isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels
                    if not dw:
                        outs.append(names[mod])
        roots = [m for m in outs if m in run.post]
        if not roots:
            continue
        roots = sorted(set(roots), key=lambda n: run.post[n])
        root = roots[0]
        rmod = named[root]
        C = rmod.out_channels if isinstance(rmod, nn.Conv2d) else rmod.out_features
        stream_at = None
        if tied_add or pad:
            stream_at = _stream_observation(run, sections, roots, C) if not pad and len(roots) > 1 else None
            if stream_at is None:
                others = roots[1:]
                why = "a channel pad it cannot index" if pad else \
                    "no section output carries all its channels" if len(roots) > 1 else "one writer only"
                skipped.append(SkippedGroup(root, C, "residual stream: tied by additions" +
                                            (f" to {', '.join(others[:3])}" + (" ..." if len(others) > 3 else "")
                                             if others else "") + f"; left whole ({why})"))
                continue
        if rmod.__class__ is nn.Conv2d and rmod.groups > 1:
            skipped.append(SkippedGroup(root, C, f"a grouped conv (groups={rmod.groups}); prune the conv feeding it"))
            continue
        # Observation: the input of the first consumer (in-channel member) in execution order.
        consumers = [(n, m, k) for n, m, k, o in members if not o and n in run.pre and n != root]
        dw_members = [(n, m, k) for n, m, k, o in members if o and isinstance(m, nn.Conv2d) and m.groups > 1 and n != root]
        cands = consumers + dw_members
        if not cands:
            skipped.append(SkippedGroup(root, C, "no consumer reads its channels"))
            continue
        cname, cmod, _ = min(cands, key=lambda t: run.pre[t[0]])
        idx = next(item.idxs for item in group if item.dep.target.module is cmod)
        root_idx = next(item.root_idxs for item in group if item.dep.target.module is cmod)
        in_dim = run.in_shape.get(cname, ())
        order = sorted(range(len(idx)), key=lambda i: root_idx[i])
        obs = tuple(int(idx[i]) for i in order)
        if len(in_dim) == 2 and len(obs) != C:
            skipped.append(SkippedGroup(root, C, f"its channels reach {cname} flattened; observed SI per channel "
                                              "needs a pooled map"))
            continue
        if len(in_dim) >= 3 and obs == tuple(range(C)) and in_dim[1] == C:
            obs = ()
        activation = f"{cname}:input"
        if stream_at is not None:
            activation, obs = stream_at, ()
        macs = params = 0.0
        costs[root] = []
        for n, m, k, o in members:
            dm, dp = _unit_cost(m, run.macs.get(n, 0), k / C, o)
            macs += dm
            params += dp
            costs[root].append((n, dm, dp))
        mem_names = tuple(sorted({n for n, *_ in members}))
        sec = None
        for s, (leaves, _) in sections.items():
            if all(n in leaves or (named[n].__class__ in (nn.BatchNorm2d,) and n.startswith(s + ".")) for n in mem_names
                   if not isinstance(named[n], _ACTIVATIONS)):
                sec = s
        scope = next((a for a in atomic if root.startswith(a + ".")), None)
        shares = ()
        if stream_at is not None:
            sec, scope = None, None
            shares = tuple((n, int(round(dm))) for n, dm, _ in costs[root])
        units.append(ConvUnit(conv=root, consumer=cname, activation=activation, out_channels=int(C),
                              macs_per_filter=int(round(macs)), params_per_filter=int(round(params)), block=sec,
                              observe_index=obs, scope=scope, members=mem_names,
                              coupled=tuple(roots[1:]) if stream_at is not None else (), shares=shares))
    units.sort(key=lambda u: run.post[u.conv])
    return units, skipped, costs


def _stream_observation(run: _Run, sections: dict, roots: list[str], C: int) -> str | None:
    """Where a residual stream is observed: the output of the section holding its last writer (the
    stream after its last addition), when that output has exactly the stream's C channels."""
    last = roots[-1]
    holders = [s for s, (leaves, _) in sections.items() if last in leaves]
    if not holders:
        return None
    sec = max(holders, key=len)
    shape = run.out_shape.get(sec, ())
    return sec if len(shape) >= 3 and shape[1] == C else None


# --------------------------------------------------------------------------- public

def describe(model: nn.Module, example_input) -> ModelStructure:
    """Everything the pipeline needs to know about ``model`` (see the module doc). ``example_input``:
    one batch, e.g. ``torch.zeros(1, 3, 32, 32)``. Raises UnsupportedModel with a fix."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # torch-pruning traces with a forward: BN statistics must not move
    try:
        return _describe(model, example_input)
    finally:
        for m, mode in modes:
            m.training = mode


def _describe(model: nn.Module, example_input) -> ModelStructure:
    run = _Run(model, example_input)
    notes: list[str] = []
    linears = sorted((n for n, m in run.named.items() if isinstance(m, nn.Linear) and n in run.post),
                     key=lambda n: run.post[n])
    convs = sorted((n for n, m in run.named.items() if isinstance(m, _CONVS) and n in run.post),
                   key=lambda n: run.post[n])
    if not linears:
        raise UnsupportedModel(f"{type(model).__name__} has no nn.Linear classifier that runs in forward(); "
                               "the adapter needs one (wrap a conv head as nn.Flatten + nn.Linear)")
    head = linears[-1]
    after_conv = [n for n in linears if not convs or run.pre[n] > run.post[convs[-1]]]
    first_head = after_conv[0] if after_conv else head
    head_input = f"{first_head}:input"
    head_modules = tuple(n for n in run.named if n in run.pre and run.pre[n] >= run.pre[first_head]
                         and not list(run.named[n].children()))

    atomic = _recorded_layers(model, run)
    atomic = [a for a in atomic if run.pre[a] < run.pre[first_head]]
    # Leaf convs on the cut whose activation has no module: observe at the next recorded/cut module's input.
    extra = []
    events = sorted(atomic + [first_head], key=lambda n: run.pre[n])
    for c in convs:
        if not run.is_cut(c) or any(c.startswith(a + ".") for a in atomic) or run.calls.get(c) != 1:
            continue
        nxt = [e for e in events if run.pre[e] > run.post[c]]
        if not nxt:
            continue
        between = [a for a in atomic if run.post[c] < run.post[a] < run.pre[nxt[0]]]
        if between:
            continue
        if nxt[0] != first_head and not isinstance(run.named[nxt[0]], _ACTIVATIONS):
            extra.append(f"{nxt[0]}:input")
    key = {**{a: run.post[a] for a in atomic}, **{e: run.pre[e.split(":")[0]] - 0.5 for e in extra}}
    layers = sorted(set(atomic) | set(extra), key=lambda n: key[n]) + [head_input]

    sections = _sections(model, run, atomic, notes)
    units, skipped, costs = _groups(model, example_input, run, head, sections, atomic, notes)
    blocks = []
    for s, (leaves, identity) in sections.items():
        macs = sum(run.macs.get(n, 0) for n in leaves)
        params = sum(p.numel() for n in leaves for p in run.named[n].parameters())
        blocks.append(BlockUnit(name=s, macs=int(macs), downsample=not identity, params=int(params),
                                branch=leaves))
    blocks += _concat_blocks(run, atomic, sections, units, costs)
    inside = {}
    for b in blocks:
        if b.kind == "concat":
            for u in units:
                if u.conv.startswith(b.name + ".") or u.conv == b.name:
                    own = u.out_channels == run.out_shape[b.name][1] and u.conv == _last_root(run, b, units)
                    if own or all(m.startswith(b.name + ".") or m == b.name for m in u.members):
                        inside[u.conv] = b.name
    if inside:
        import dataclasses

        units = [dataclasses.replace(u, block=inside[u.conv]) if u.conv in inside else u for u in units]
    blocks.sort(key=lambda b: run.post[b.name])
    chain = tuple(atomic) if not blocks else ()
    total_params = sum(p.numel() for p in model.parameters())
    return ModelStructure(blocks=tuple(blocks), convs=tuple(units), chain=chain,
                          total_macs=int(sum(run.macs.values())), total_params=int(total_params),
                          layers=tuple(layers), head=head, head_input=head_input, head_modules=head_modules,
                          skipped=tuple(skipped), notes=tuple(notes))


def _last_root(run: _Run, block: BlockUnit, units) -> str | None:
    """The group root run last inside a concat branch (its channels are the branch's output)."""
    own = [u.conv for u in units if u.conv.startswith(block.name + ".") or u.conv == block.name]
    return max(own, key=lambda n: run.post[n]) if own else None


def _concat_blocks(run: _Run, atomic, sections, units, costs) -> list[BlockUnit]:
    """BlockUnits for droppable concatenation branches whose output is one channel group; a drop
    removes the branch and that group's share in every consumer."""
    blocks = []
    for name, info in _concat_sections(run, atomic, sections).items():
        probe = BlockUnit(name=name, macs=0, downsample=False, params=0)
        root = _last_root(run, probe, units)
        unit = next((u for u in units if u.conv == root), None)
        if unit is None or unit.out_channels != info["out_channels"]:
            continue  # its channels are not one prunable group (tied, grouped conv, ...)
        outside = [(n, dm, dp) for n, dm, dp in costs.get(root, ()) if not (n == name or n.startswith(name + "."))]
        macs = sum(run.macs.get(n, 0) for n in info["leaves"]) + unit.out_channels * sum(dm for _, dm, _ in outside)
        params = sum(p.numel() for n in info["leaves"] for p in run.named[n].parameters()) + \
            unit.out_channels * sum(dp for *_, dp in outside)
        blocks.append(BlockUnit(name=name, macs=int(round(macs)), downsample=False, params=int(round(params)),
                                branch=info["leaves"], kind="concat", parent=info["parent"],
                                channels=info["channels"], needs_one=info["needs_one"]))
    return blocks


def _is_identity(gm, short) -> bool:
    """True when the shortcut operand is the section's input (through Identity / empty Sequential)."""
    mods = dict(gm.named_modules())
    while short.op == "call_module" and (isinstance(mods.get(short.target), nn.Identity) or (
            isinstance(mods.get(short.target), nn.Sequential) and len(mods[short.target]) == 0)):
        short = short.args[0]
    return short.op == "placeholder"


prunable_structure = describe


def collect_filter_groups(model: nn.Module, loader, activations, *, grid: int = 4, index=None, device=None):
    """Per-filter pooled activations in one pass: name -> (n, C, k*k) float32 with k = min(grid, H, W),
    and labels (n,) int64.

    ``activations``: layer names (``"conv2:input"``); ``index``: optional name -> channel indices to
    keep, in root-channel order (a group observed inside a concatenation). Each filter's map is
    average-pooled to k x k so a filter is one group of features for single-filter SI, prefix SI and
    greedy selection. A flat (N, C) input gives k*k = 1. ``device``: where the forwards run (None: the
    model's own); the model comes back to where it was.
    """
    import numpy as np
    import torch.nn.functional as F

    from . import _device
    from .features import FeatureRecorder

    names = list(dict.fromkeys(activations))
    index = dict(index or {})

    def pool(name, t):
        if t.ndim == 2:
            t = t[:, :, None, None]
        k = min(grid, t.shape[-2], t.shape[-1])
        out = F.adaptive_avg_pool2d(t, k).flatten(2)
        sel = index.get(name)
        return out[:, list(sel)] if sel else out

    n = len(loader.sampler) if hasattr(loader, "sampler") else len(loader.dataset)
    out: dict[str, np.ndarray] = {}
    labels = np.empty(n, np.int64)
    done = 0
    dev = _device.target(device, model)
    was = model.training
    model.eval()
    try:
        with _device.on_device(dev, model), FeatureRecorder(model, names, transform=pool) as rec, \
                torch.inference_mode():
            for x, y in loader:
                model(_device.to_device(x, dev))
                maps = rec.take()
                b = x.shape[0]
                for name in names:
                    m = maps[name]
                    if not torch.isfinite(m).all():
                        raise ValueError(f"layer {name!r} has NaN/Inf activations; check the model and data")
                    if name not in out:
                        out[name] = np.empty((n,) + tuple(m.shape[1:]), np.float32)
                    out[name][done:done + b] = m.cpu().numpy()
                labels[done:done + b] = torch.as_tensor(y).cpu().numpy()
                done += b
    finally:
        model.train(was)
    return out, labels


def truncate_at(model: nn.Module, after: str, head: nn.Module, head_name: str) -> nn.Module:
    """``model`` cut after module ``after``: its forward up to that module's output, then global average
    pooling, flatten and ``head`` (registered as ``head_name``). A ``torch.fx.GraphModule`` that keeps
    every kept module under its name, so a state dict of the result loads into a rebuilt one.
    (N, ...) -> (N, head outputs). ``after`` must run once; only the modules holding it are traced.
    """
    import torch.fx as fx

    modules = dict(model.named_modules())
    if not after or after not in modules:
        raise UnsupportedModel(f"truncate_after={after!r} is not a module of {type(model).__name__}; "
                               "use a layer name from si_compress.structure.describe(model, x).chain")

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return not after.startswith(qualname + ".")   # trace only the containers holding the cut

    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        raise UnsupportedModel(f"cannot truncate {type(model).__name__} after {after!r}: torch.fx cannot trace the "
                               f"modules holding it ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                               "make their forward traceable or use --no-truncate") from None
    hits = [n for n in graph.nodes if n.op == "call_module" and n.target == after]
    if len(hits) != 1:
        raise UnsupportedModel(f"cannot truncate after {after!r}: it runs {len(hits)} times in "
                               f"{type(model).__name__}'s forward (a cut point must run once); use --no-truncate")
    cut = hits[0]
    keep = _ancestors(cut) | {cut}
    new = fx.Graph()
    env = {}
    for n in graph.nodes:
        if n.op == "placeholder" or n in keep:
            env[n] = new.node_copy(n, lambda a: env[a])
    # pooling as modules (not functions): MAC counters see the same work as in the base's own head
    pooled = new.call_module("cut_pool", (env[cut],))
    flat = new.call_module("cut_flatten", (pooled,))
    new.output(new.call_module(head_name, (flat,)))
    owners: dict[str, object] = {}
    for n in new.nodes:
        if n.op == "call_module" and n.target not in (head_name, "cut_pool", "cut_flatten"):
            owners[n.target] = modules[n.target]
        elif n.op == "get_attr":
            owners[n.target] = operator.attrgetter(n.target)(model)
    owners.update({head_name: head, "cut_pool": nn.AdaptiveAvgPool2d(1), "cut_flatten": nn.Flatten(1)})
    return fx.GraphModule(owners, new, class_name=f"{type(model).__name__}Truncated")
