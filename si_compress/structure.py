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
  MACs and params per channel (conv/linear weights of every member), the section it lies in, and
  whether the planner may prune it: groups tied by a residual addition (the residual stream) are
  left whole.
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
    """A removable residual section ``y = post(p(x) + f(x))``; dropping it keeps ``post(p(x))``."""

    name: str
    macs: int          # MACs per sample of the branch f (what a drop removes)
    downsample: bool   # the shortcut is not the identity (a projection or a parameter-free reshape)
    params: int        # parameters of the branch f
    branch: tuple[str, ...] = ()   # leaf modules of f


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


@dataclass(frozen=True)
class SkippedGroup:
    conv: str
    out_channels: int
    reason: str


@dataclass(frozen=True)
class ModelStructure:
    blocks: tuple[BlockUnit, ...]            # removable sections
    convs: tuple[ConvUnit, ...]              # channel groups the planner may resize
    chain: tuple[str, ...]                   # plain chains (no sections): recorded activations in order
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
    names = {m: n for n, m in named.items()}
    try:
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except Exception as exc:
        notes.append(f"torch-pruning could not trace the model ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                     "no channel groups")
        return [], []
    ignored = [named[head]] if head in named else []
    units, skipped = [], []
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
            if isinstance(mod, nn.Module) and mod in names:
                out_side = DG.is_out_channel_pruning_fn(dep.handler)
                members.append((names[mod], mod, len(idxs), out_side))
                if out_side and isinstance(mod, (nn.Conv2d, nn.Linear)):
                    dw = isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels
                    if not dw:
                        outs.append(names[mod])
        roots = [m for m in outs if m in run.post]
        if not roots:
            continue
        root = min(roots, key=lambda n: run.post[n])
        rmod = named[root]
        C = rmod.out_channels if isinstance(rmod, nn.Conv2d) else rmod.out_features
        if tied_add or pad:
            others = sorted(set(outs) - {root})
            skipped.append(SkippedGroup(root, C, "residual stream: tied by additions" +
                                        (f" to {', '.join(others[:3])}" + (" ..." if len(others) > 3 else "") if others else "")
                                        + "; left whole"))
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
        macs = params = 0.0
        for n, m, k, o in members:
            dm, dp = _unit_cost(m, run.macs.get(n, 0), k / C, o)
            macs += dm
            params += dp
        mem_names = tuple(sorted({n for n, *_ in members}))
        sec = None
        for s, (leaves, _) in sections.items():
            if all(n in leaves or (named[n].__class__ in (nn.BatchNorm2d,) and n.startswith(s + ".")) for n in mem_names
                   if not isinstance(named[n], _ACTIVATIONS)):
                sec = s
        scope = next((a for a in atomic if root.startswith(a + ".")), None)
        units.append(ConvUnit(conv=root, consumer=cname, activation=f"{cname}:input", out_channels=int(C),
                              macs_per_filter=int(round(macs)), params_per_filter=int(round(params)), block=sec,
                              observe_index=obs, scope=scope, members=mem_names))
    units.sort(key=lambda u: run.post[u.conv])
    return units, skipped


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
    units, skipped = _groups(model, example_input, run, head, sections, atomic, notes)
    blocks = []
    for s, (leaves, identity) in sections.items():
        macs = sum(run.macs.get(n, 0) for n in leaves)
        params = sum(p.numel() for n in leaves for p in run.named[n].parameters())
        blocks.append(BlockUnit(name=s, macs=int(macs), downsample=not identity, params=int(params),
                                branch=leaves))
    blocks.sort(key=lambda b: run.post[b.name])
    chain = tuple(a for a in atomic if isinstance(run.named[a], _ACTIVATIONS)) if not blocks else ()
    total_params = sum(p.numel() for p in model.parameters())
    return ModelStructure(blocks=tuple(blocks), convs=tuple(units), chain=chain,
                          total_macs=int(sum(run.macs.values())), total_params=int(total_params),
                          layers=tuple(layers), head=head, head_input=head_input, head_modules=head_modules,
                          skipped=tuple(skipped), notes=tuple(notes))


def _is_identity(gm, short) -> bool:
    """True when the shortcut operand is the section's input (through Identity / empty Sequential)."""
    mods = dict(gm.named_modules())
    while short.op == "call_module" and (isinstance(mods.get(short.target), nn.Identity) or (
            isinstance(mods.get(short.target), nn.Sequential) and len(mods[short.target]) == 0)):
        short = short.args[0]
    return short.op == "placeholder"


prunable_structure = describe


def collect_filter_groups(model: nn.Module, loader, activations, *, grid: int = 4, index=None):
    """Per-filter pooled activations in one pass: name -> (n, C, k*k) float32 with k = min(grid, H, W),
    and labels (n,) int64.

    ``activations``: layer names (``"conv2:input"``); ``index``: optional name -> channel indices to
    keep, in root-channel order (a group observed inside a concatenation). Each filter's map is
    average-pooled to k x k so a filter is one group of features for single-filter SI, prefix SI and
    greedy selection. A flat (N, C) input gives k*k = 1.
    """
    import numpy as np
    import torch.nn.functional as F

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
    was = model.training
    model.eval()
    try:
        with FeatureRecorder(model, names, transform=pool) as rec, torch.inference_mode():
            for x, y in loader:
                model(x)
                maps = rec.take()
                b = x.shape[0]
                for name in names:
                    m = maps[name]
                    if not torch.isfinite(m).all():
                        raise ValueError(f"layer {name!r} has NaN/Inf activations; check the model and data")
                    if name not in out:
                        out[name] = np.empty((n,) + tuple(m.shape[1:]), np.float32)
                    out[name][done:done + b] = m.numpy()
                labels[done:done + b] = y.numpy()
                done += b
    finally:
        model.train(was)
    return out, labels
