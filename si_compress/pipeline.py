"""The si-compress pipeline as functions: SI plan -> apply -> compensate -> (fine-tune) -> measure.

``si_plan`` turns a model and a labelled (train) sample into a CompressionPlan; ``execute`` applies
any plan (ours or a baseline) through the same executor and compensation and returns the
compressed model with its measured metrics, so every method is compared on equal terms.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .latency import latency  # noqa: F401  (re-exported: callers time models through the pipeline)
from .plan import CompressionPlan

COMPENSATIONS = ("refit+bn", "refit", "bn", "none", "refit+reconstruct", "reconstruct")


@dataclass(frozen=True)
class CompressConfig:
    target_macs: float | None = 0.5     # fraction of base MACs to keep; None: threshold mode
    target_params: float | None = None  # also keep at most this fraction of the parameters (model size)
    delta: float = 0.02
    ranking: str = "l1"                # which filters inside a layer (widths and drops always come from SI)
    allow_drop: bool = True
    streams: bool = False              # also narrow residual streams (off: measured worse without training)
    weighting: str = "gain"
    objective: str = "both"            # moves ranked per MACs, measured latency, or both (see planner)
    round_to: int = 8                  # channel counts in multiples of 8: the fast CPU kernels need them
    latency_batches: tuple = (128,)    # objective latency/both: sections timed at these batch sizes (averaged
                                       # as fractions of each batch's time: (1, 128) weighs both alike)
    grid: int = 4                      # per-filter pooled grid for filter SI
    order: int = 3
    compensation: str = "refit"         # + "reconstruct": train against the base on unlabelled images after
    reconstruct_steps: int = 1200       # ... at most this many Adam steps
    reconstruct_seconds: float = 300.0  # ... or this many seconds
    reconstruct_images: int | None = None  # ... on this many images (labels never read); None:
                                           # reconstruct.image_budget, all up to 50,000 within a 2 GiB cache
    reconstruct_targets: str = "logits"  # "logits", "features" (section outputs) or "both"
    reconstruct_bn: str = "train"       # BatchNorm during reconstruction: "train" (batch statistics) or "frozen"
    reconstruct_lr: float = 1e-3        # Adam's peak learning rate (cosine to zero over the budget)
    teacher: str = "base"               # fine-tuning distils from the base model ("none": labels only)
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    finetune_epochs: int = 0
    finetune_steps: int | None = None   # stop fine-tuning after this many SGD steps (None: full epochs)
    head_only: bool = False
    head_epochs: int = 5
    lr: float = 0.01
    batch_size: int = 128
    bf16: bool = False
    seed: int = 0
    truncate: bool = True               # plain chains: cut after the SI peak (planning/truncate.py)
    truncate_tol: float = 0.01          # absolute SI tolerance of that peak
    truncate_below_budget: bool = False  # apply a cut even when it alone goes well below target_macs
    device: str = "auto"                # features, compensation, training, evaluation: auto (CUDA if present), cpu, cuda

    def __post_init__(self):
        from ._device import check_device_spec

        object.__setattr__(self, "device", check_device_spec(self.device))
        lb = self.latency_batches
        lb = (lb,) if isinstance(lb, int) and not isinstance(lb, bool) else lb
        if not (isinstance(lb, (tuple, list)) and lb and all(isinstance(b, int) and not isinstance(b, bool)
                                                             and b >= 1 for b in lb)):
            raise ValueError(f"latency_batches must be positive batch sizes, e.g. (1, 128); got {self.latency_batches!r}")
        object.__setattr__(self, "latency_batches", tuple(sorted(set(lb))))
        if not (0.0 <= self.truncate_tol < 1.0):
            raise ValueError(f"truncate_tol is an absolute SI tolerance in [0, 1); got {self.truncate_tol}")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {', '.join(COMPENSATIONS)}; got {self.compensation!r}")
        if self.target_params is not None:
            if self.target_macs is None:
                raise ValueError("target_params is a budget and needs target_macs (1.0 for a size budget alone), "
                                 "not threshold mode")
            if not (0.0 < self.target_params <= 1.0):
                raise ValueError(f"target_params is the fraction of parameters to keep, in (0, 1]; got "
                                 f"{self.target_params!r}")
        if self.finetune_epochs < 0 or self.head_epochs < 0:
            raise ValueError("epochs must be >= 0")
        if self.teacher not in ("base", "none"):
            raise ValueError(f"teacher must be 'base' or 'none'; got {self.teacher!r}")
        if not (0.0 <= self.kd_weight <= 1.0):
            raise ValueError(f"kd_weight must be in [0, 1]; got {self.kd_weight}")
        if self.reconstruct_steps < 1 or not self.reconstruct_seconds > 0 or \
                (self.reconstruct_images is not None and self.reconstruct_images < 1):
            raise ValueError("reconstruct_steps, reconstruct_seconds and reconstruct_images must be positive")
        from .compress.reconstruct import TARGETS

        if self.reconstruct_targets not in TARGETS:
            raise ValueError(f"reconstruct_targets must be one of {', '.join(TARGETS)}; got {self.reconstruct_targets!r}")
        if not (self.reconstruct_lr > 0 and self.reconstruct_lr < 1):
            raise ValueError(f"reconstruct_lr must be in (0, 1); got {self.reconstruct_lr!r}")
        if self.reconstruct_bn not in ("frozen", "train"):
            raise ValueError(f"reconstruct_bn must be 'frozen' or 'train'; got {self.reconstruct_bn!r}")


@dataclass(frozen=True)
class PlanEvidence:
    report: object                 # AnalysisReport of the block outputs on the SI sample
    structure: object              # ModelStructure the plan's filter decisions refer to (the truncated model's)
    rankings: dict                 # conv -> Ranking
    groups_labels: np.ndarray | None = None
    truncation: object = None      # TruncationDecision for a plain chain, None for residual nets
    base_structure: object = None  # ModelStructure of the whole (untruncated) model


def si_plan(model, sample_loader, *, arch: str, num_classes: int, example_input, config: CompressConfig,
            progress=None) -> tuple[CompressionPlan, PlanEvidence]:
    """Measure block SI and per-filter SI on ``sample_loader`` and plan with ``config``.

    Plain chains (a ``features`` Sequential, no residual blocks): with ``config.truncate`` the
    chain is first cut after its SI peak (:func:`~si_compress.planning.choose_truncation`, tolerance
    ``config.truncate_tol``); only the convs before the cut are ranked and pruned, the head is sized
    from the SI/CSI of the truncated model's head input, and the MACs budget (a fraction of the
    WHOLE model's MACs) applies to what remains: when the cut alone meets it, no filter is pruned.

    ``config.device``: where the model runs over the sample (features, filter maps); structure
    tracing, planning and MAC counts stay on the CPU (the model comes back there).
    """
    from ._device import resolve_device
    from .analysis import analyze
    from .compress import apply_plan, find_classifier
    from .planning import PlannerConfig, block_si, choose_truncation, plan_compression, rank_filters, size_head
    from .structure import collect_filter_groups, describe

    device = resolve_device(config.device)   # a CUDA request without CUDA fails here, before any work
    structure = describe(model, example_input)
    if not structure.convs and not structure.blocks:
        why = "; ".join(f"{g.conv}: {g.reason}" for g in structure.skipped[:3]) or "no conv runs in forward()"
        raise ValueError(f"found nothing to prune in {type(model).__name__}: no channel group can be resized alone and no "
                         f"residual section can be dropped ({why}); see si_compress.structure.describe(model, x)")
    report = analyze(model, sample_loader, layers=list(structure.layers), order=config.order, max_dim=1024,
                     example_input=example_input, progress=progress, device=device)
    final = report.layers[-1]
    # The plan resizes the head only when it is one Linear; a trained MLP head is kept as it is.
    single = structure.head_input == f"{structure.head}:input"
    head = size_head(final.si, final.csi, in_features=final.dim, num_classes=num_classes) if single else None

    # Plain chains: cut after the SI peak; what follows is planned on the truncated model.
    truncation = None
    plan_model, plan_structure = model, structure
    trunc_settings: dict = {}
    recorded = {r.name for r in report.layers}
    chain = [c for c in structure.chain if c in recorded]
    if config.truncate and chain and not structure.blocks:
        truncation = choose_truncation(report.layers, chain=chain,
                                       total_macs=report.total_macs, tol=config.truncate_tol)
        if truncation.truncate_after is not None and config.target_macs is not None and \
                not config.truncate_below_budget and \
                truncation.macs_at_cut < 0.97 * config.target_macs * truncation.total_macs:
            # A budget is a promise about MACs: a cut that alone goes well below it is not applied.
            trunc_settings = dict(truncation=dict(truncation.to_dict(), applied=False,
                                                  why_not=f"the cut keeps {truncation.macs_at_cut / truncation.total_macs:.1%} "
                                                          f"of MACs, below the budget {config.target_macs:.0%}"))
            truncation = None
        else:
            trunc_settings = dict(truncation=dict(truncation.to_dict(), applied=truncation.truncate_after is not None))
        if truncation is not None and truncation.truncate_after is not None:
            plan_model = apply_plan(model, CompressionPlan(arch=arch, num_classes=num_classes,
                                                           truncate_after=truncation.truncate_after),
                                    example_input=example_input)
            plan_structure = describe(plan_model, example_input)
            head_name, _ = find_classifier(plan_model)
            head_rep = analyze(plan_model, sample_loader, layers=[f"{head_name}:input"], order=config.order,
                               max_dim=1024, example_input=example_input, device=device)
            hin = head_rep.layers[-1]
            head = size_head(hin.si, hin.csi, in_features=hin.dim, num_classes=num_classes)
            trunc_settings["truncation"].update(head_input_si=hin.si, head_input_csi=hin.csi,
                                                head_input_dim=hin.dim)

    t0 = time.perf_counter()
    labels = None
    rankings = {}
    units = [u for u in plan_structure.convs if config.streams or not u.coupled]
    if units:
        # Each observed tensor is read once; a group inside a concatenation keeps only its channels.
        need: dict[str, list[int] | None] = {}
        for u in units:
            if not u.observe_index:
                need[u.activation] = None
            elif need.get(u.activation, []) is not None:
                need[u.activation] = sorted(set(need.get(u.activation, [])) | set(u.observe_index))
        groups, labels = collect_filter_groups(plan_model, sample_loader, list(need), grid=config.grid,
                                               index={k: v for k, v in need.items() if v}, device=device)
        for i, u in enumerate(units):
            G = groups[u.activation]
            if u.observe_index:
                at = need[u.activation]
                G = G[:, [at.index(c) for c in u.observe_index]] if at is not None else G[:, list(u.observe_index)]
            rankings[u.conv] = rank_filters(config.ranking, G=G, y=labels, weight=group_weight(plan_model, u),
                                            seed=config.seed + i)
            for other in u.coupled:   # a stream is ranked once; any of its writers finds it
                rankings.setdefault(other, rankings[u.conv])
            if progress is not None:
                progress("filter SI", i + 1, len(units))
    from types import SimpleNamespace

    # SI gain of every recorded module (sections and scopes); only sections can be dropped.
    gains = block_si(report.layers, [SimpleNamespace(name=r.name) for r in report.layers if ":" not in r.name])
    # A section that changes the map's shape is compared like for like: with the SI of what the next
    # section would read without it (its shortcut's output, same shape, same pooling), not of its input.
    down = [b.name for b in plan_structure.blocks if b.kind == "residual" and b.downsample and b.name in gains]
    for i, name in enumerate(down):
        gains[name] = (shortcut_si(plan_model, sample_loader, name, order=config.order, device=device),
                       gains[name][1])
        if progress is not None:
            progress("shortcut SI", i + 1, len(down))
    branches = [b for b in plan_structure.blocks if b.kind == "concat" and b.channels]
    if branches:
        gains.update(concat_gains(plan_model, sample_loader, branches, grid=config.grid, progress=progress,
                                  device=device))
    lat_table = None
    if config.objective != "macs" and plan_structure.convs and config.target_macs is not None:
        from .latency import block_latency_table

        from .latency import combine_latency_tables

        lat_raw = {}
        for i, b in enumerate(config.latency_batches):
            lat_raw[b] = block_latency_table(plan_model, plan_structure, example_input, batch=b,
                                             step=max(config.round_to, 8))
            if progress is not None:
                progress(f"section timing (batch {b})", i + 1, len(config.latency_batches))
        # one batch: its seconds as measured; several: each batch's fractions, averaged
        lat_table = next(iter(lat_raw.values())) if len(lat_raw) == 1 else combine_latency_tables(lat_raw)
    # The planner budgets a fraction of the structure it is given: rescale the whole model's budget.
    scale = structure.total_macs / max(plan_structure.total_macs, 1)

    def make(target, params_target=config.target_params):
        ptarget = None if target is None else min(1.0, target * scale)
        # the size budget as a fraction of the structure the planner sees: a truncated chain has lost
        # everything after the cut, so what it may keep is params_target x the whole model (the count-based
        # tightening below then takes the new head into account)
        pparams = None if params_target is None else \
            min(1.0, max(1e-6, params_target * structure.total_params / max(plan_structure.total_params, 1)))
        p = plan_compression(
            arch=arch, num_classes=num_classes, structure=plan_structure, rankings=rankings, gains=gains,
            config=PlannerConfig(target_macs=ptarget, target_params=pparams, delta=config.delta,
                                 allow_drop=config.allow_drop,
                                 round_to=config.round_to, weighting=config.weighting,
                                 objective=config.objective, gain_samples=report.n_samples),
            head=head, truncate_after=None if truncation is None else truncation.truncate_after,
            source=dict(si_samples=report.n_samples, filter_seconds=time.perf_counter() - t0,
                        **({} if lat_table is None else dict(
                            latency_batch=config.latency_batches[0] if len(lat_raw) == 1
                            else list(config.latency_batches),
                            latency_seconds={str(b): {k: [round(v, 7) for v in t] for k, t in tab.items()}
                                             for b, tab in lat_raw.items()}))),
            latency=lat_table,
        )
        if plan_structure is structure:
            return p
        return _replace_plan(p, predicted=dict(p.predicted, base_macs=int(structure.total_macs),
                                               base_params=int(structure.total_params)),
                             settings=dict(p.settings, target_macs=target, **trunc_settings))

    plan = make(config.target_macs)
    if config.target_macs is not None:
        # The planner budgets conv/linear MACs; metrics count as torch-pruning does (BN, ReLU, pooling
        # too). Tighten the planner's target until the torch-pruning count meets the budget.
        base_tp, base_params = count_tp(model, example_input)
        budget = config.target_macs * base_tp
        # The planner's parameter count is per group and misses the weights two narrowed groups share
        # (a conv losing inputs and outputs): tighten its size target by the measured ratio too.
        p_budget = None if config.target_params is None else config.target_params * base_params
        p_target = config.target_params
        target, best = config.target_macs, None   # best: (MACs, planner target, plan) meeting the budget
        lo, hi = 0.0, None                        # planner targets known to land under / over the budget
        for _ in range(10):
            got, got_p = count_tp(apply_plan(model, plan, example_input=example_input), example_input)
            if p_budget is not None and got_p > p_budget:
                p_target = max(1e-3, p_target * p_budget / max(got_p, 1) * 0.995)
                plan = make(target, p_target)
                continue
            if got <= budget:
                lo = max(lo, target)
                if best is None or got > best[0]:
                    best = (got, target, plan)
            else:
                hi = target if hi is None else min(hi, target)
            if best is not None and best[0] >= 0.985 * budget or target < 0.02:
                break
            # The planner's conv/linear estimate and the full count differ by BN/activation/pool work:
            # rescale its target by the measured ratio, bisecting once the budget is bracketed.
            new = min(1.0, target * budget / max(got, 1) * (0.995 if got > budget else 1.0))
            if hi is not None and lo > 0 and not (lo < new < hi):
                new = (lo + hi) / 2
            if abs(new - target) < 1e-6:
                break
            target = new
            plan = make(target, p_target)
        if best is not None:
            _, target, plan = best
        got, got_params = count_tp(apply_plan(model, plan, example_input=example_input), example_input)
        unmet = []
        if got > budget:
            unmet.append(f"keeps {got / base_tp:.1%} of the MACs (target {config.target_macs:.1%})")
        if config.target_params is not None and got_params > config.target_params * base_params:
            unmet.append(f"keeps {got_params / base_params:.1%} of the parameters (target {config.target_params:.1%})")
        if unmet:
            plan = _replace_plan(plan, settings=dict(plan.settings, budget_unmet=(
                "the plan " + " and ".join(unmet) + f": every group is at its narrowest width (round_to "
                f"{config.round_to}){'' if config.allow_drop else ' and drops are off'}; lower round_to"
                f"{'' if config.allow_drop else ' or allow drops'} to go further")))
        # One count everywhere (torch-pruning's): what the plan predicts is what metrics will measure.
        plan = _replace_plan(plan, predicted=dict(
            base_macs=int(base_tp), macs=int(got), base_params=int(base_params), params=int(got_params),
            planner_macs=plan.predicted.get("macs"), planner_base_macs=plan.predicted.get("base_macs"),
            counter="torch_pruning.utils.count_ops_and_params"),
            settings=dict(plan.settings, target_macs=config.target_macs, planner_target=target,
                          target_params=config.target_params,
                          **({} if config.target_params is None else {"planner_target_params": p_target})))
    if trunc_settings and "truncation" not in plan.settings:
        plan = _replace_plan(plan, settings=dict(plan.settings, **trunc_settings))
    return plan, PlanEvidence(report=report, structure=plan_structure, rankings=rankings, groups_labels=labels,
                              truncation=truncation, base_structure=structure)


def shortcut_si(model, sample_loader, section: str, *, order: int = 3, max_dim: int = 1024, device=None) -> float:
    """SI of ``post(shortcut(x))`` for the residual section ``section`` (what the network carries there
    once the section is dropped), pooled exactly like the section's own output in ``si_plan``."""
    import copy

    from .analysis import analyze
    from .structure import drop_section

    work = copy.deepcopy(model)
    parent, _, child = section.rpartition(".")
    setattr(work.get_submodule(parent) if parent else work, child, drop_section(work.get_submodule(section)))
    return analyze(work, sample_loader, layers=[section], order=order, max_dim=max_dim, device=device).layers[-1].si


def concat_gains(model, sample_loader, branches, *, grid: int = 4, max_dim: int = 4096,
                 progress=None, device=None) -> dict[str, tuple[float, float]]:
    """SI gain of each concatenation branch: name -> (SI of its parent's output without the branch's
    channels, SI with them). The parent's output (N, C, H, W) is average-pooled per channel to a
    k x k grid, k = min(grid, H, W) halved until C*k*k <= max_dim; one pass over ``sample_loader``."""
    from .separability import separation_index
    from .structure import collect_filter_groups

    parents = list(dict.fromkeys(b.parent for b in branches))
    maps, labels = collect_filter_groups(model, sample_loader, parents, grid=grid, device=device)
    out = {}
    for i, parent in enumerate(parents):
        G = maps[parent]                           # (n, C, k*k)
        n, C, kk = G.shape
        k = int(round(kk ** 0.5))
        while C * k * k > max_dim and k > 1:       # 2 x 2 average pooling of the k x k grid
            h = k // 2
            G = G.reshape(n, C, h, 2, h, 2).mean(axis=(3, 5)).reshape(n, C, h * h) if k % 2 == 0 else \
                G.mean(axis=2, keepdims=True)
            k = h if k % 2 == 0 else 1
        full = separation_index(G.reshape(n, -1), labels)
        for b in branches:
            if b.parent != parent:
                continue
            rest = np.setdiff1d(np.arange(C), np.asarray(b.channels))
            out[b.name] = (separation_index(G[:, rest].reshape(n, -1), labels), full)
        if progress is not None:
            progress("branch SI", i + 1, len(parents))
    return out


def group_weight(model, unit) -> np.ndarray:
    """(C, ...) weights of a channel group for magnitude ranking: the root's filters, or for a residual
    stream every writer's filters side by side (the group's L1 norm is the sum of its members')."""
    mods = dict(model.named_modules())
    ws = [mods[n].weight.detach().reshape(unit.out_channels, -1) for n in (unit.conv, *unit.coupled)]
    return torch.cat(ws, dim=1).numpy()


def _replace_plan(plan: CompressionPlan, **changes) -> CompressionPlan:
    return CompressionPlan(**{**{f: getattr(plan, f) for f in plan.__dataclass_fields__}, **changes})


def check_plan_base(plan: CompressionPlan, model, example_input) -> None:
    """ValueError when ``plan.predicted`` was made for another base model than ``model``.

    A plan records its base's parameter and MAC counts; a plan whose ``arch`` was edited to fit
    another model would otherwise apply (its layer names may exist there too) and report a
    prediction that belongs to the other model. Plans without counts (hand-written) pass.
    """
    p = plan.predicted or {}
    if p.get("counter"):
        macs, params = count_tp(model, example_input)
    else:  # the planner's own conv/linear count
        from .structure import describe

        st = describe(model, example_input)
        macs, params = st.total_macs, st.total_params
    for key, have in (("base_params", params), ("base_macs", macs)):
        want = p.get(key)
        if want is not None and int(want) != int(have):
            raise ValueError(f"the plan was made for a model with {key} {int(want):,} but this model has {int(have):,} "
                             f"(was its arch edited, or is it another checkpoint's plan?); make a plan for this "
                             "model with si-compress, without --plan")


def count_tp(model, example_input) -> tuple[int, int]:
    """(MACs, params) per sample: the one count of the pipeline (``features.cost.count_ops``)."""
    from .features.cost import count_ops

    return count_ops(model, example_input)


def reconstruction_loader(train, n_images: int, *, train_loader=None, batch_size: int = 128, seed: int = 0):
    """DataLoader over ``n_images`` class-balanced images of ``train`` (a ``data.load_dataset`` result) for
    reconstruction, in order (``reconstruct`` re-shuffles). When that is every train image and ``train_loader``
    already holds them preloaded, its tensor is shared rather than decoded and cached a second time."""
    from .compress import preload
    from .data import balanced_indices

    if n_images == len(train.labels) and train_loader is not None:
        return torch.utils.data.DataLoader(train_loader.dataset, batch_size=batch_size, shuffle=False)
    idx = balanced_indices(train.labels, n_images, seed=seed)
    return torch.utils.data.DataLoader(preload(train.dataset, idx), batch_size=batch_size, shuffle=False)


def execute(base, plan: CompressionPlan, *, example_input, calib_loader, test_loader, train_loader=None,
            config: CompressConfig, progress=None, augment=None, recon_loader=None,
            stage=None) -> tuple[torch.nn.Module, dict]:
    """Apply ``plan`` to a copy of ``base``, compensate, optionally fine-tune; accuracy at each stage.

    A truncated chain (``plan.truncate_after``) has a new head: ``refit`` compensation fits it to
    ``base``'s logits by least squares (``refit_head``), and it is then always trained on frozen
    features (``train_head``, ``config.head_epochs``) on ``train_loader``, or on ``calib_loader``
    when no training split is given (``m["head_data"]`` says which). ``*+reconstruct`` compensation
    then trains the model against ``base`` on the images of ``recon_loader`` (default ``calib_loader``;
    labels never read; ``m["reconstruct"]`` says what was used). Fine-tuning distils from ``base``
    unless ``config.teacher == "none"``. ``progress(record)``: after each fine-tuning
    epoch; ``stage(name)``: as each step starts (so a long step is visibly running).

    ``config.device``: where evaluation, compensation, head training and fine-tuning run (``m["device"]``
    records the resolved one); applying the plan and counting MACs stay on the CPU, and the returned
    model is on the CPU.
    """
    say = stage if stage is not None else (lambda name: None)
    from ._device import resolve_device
    from .compress import apply_plan, evaluate, finetune, recalibrate_bn, refit_consumers, refit_head, train_head

    device = resolve_device(config.device)   # a CUDA request without CUDA fails here, before any work
    m = {"device": str(device)}
    t0 = time.perf_counter()
    say("apply plan")
    pruned = apply_plan(base, plan, example_input=example_input)
    m["seconds_apply"] = time.perf_counter() - t0
    m["macs"], m["params"] = count_tp(pruned, example_input)
    say("evaluate pruned")
    m["acc_pruned"] = evaluate(pruned, test_loader, device=device)
    t0 = time.perf_counter()
    if config.compensation != "none":
        say(f"compensate ({config.compensation})")
    if config.compensation in ("refit", "refit+bn", "refit+reconstruct"):
        rep = refit_consumers(pruned, base, plan, calib_loader, device=device)
        m["refit"] = {k: {kk: vv for kk, vv in v.items() if kk in ("before", "after")} for k, v in rep.items()}
    if config.compensation in ("bn", "refit+bn"):
        recalibrate_bn(pruned, calib_loader, device=device)
    if config.compensation in ("refit+reconstruct", "reconstruct"):
        from .compress import reconstruct

        if config.compensation == "refit+reconstruct":
            m["acc_refit"] = evaluate(pruned, test_loader, device=device)   # the least-squares step alone, for comparison

        m["reconstruct"] = reconstruct(
            pruned, base, recon_loader if recon_loader is not None else calib_loader, steps=config.reconstruct_steps,
            seconds=config.reconstruct_seconds, images=config.reconstruct_images, targets=config.reconstruct_targets,
            bn=config.reconstruct_bn, lr=config.reconstruct_lr,
            augment=augment, bf16=config.bf16, device=device, seed=config.seed,
            progress=None if progress is None else (lambda r: progress({"stage": "reconstruct", **r})))
    if plan.truncate_after is not None and config.compensation in ("refit", "refit+bn"):
        # The cut chain's new head reads features the old head never saw: fit it (least squares)
        # to the original network's logits on the calibration sample.
        m.setdefault("refit", {})["head"] = refit_head(pruned, base, calib_loader, device=device)
    m["seconds_compensate"] = time.perf_counter() - t0
    say("evaluate compensated")
    m["acc_compensated"] = evaluate(pruned, test_loader, device=device)
    truncated = plan.truncate_after is not None
    if (plan.head is not None and plan.head.kind == "mlp") or config.head_only or truncated:
        # A truncated chain has a new (untrained) head: always train it. Without the training
        # split it is trained on the calibration sample (recorded in m["head_data"]).
        head_loader = train_loader if train_loader is not None or not truncated else calib_loader
        if head_loader is None:
            raise ValueError("training the head needs the training split")
        m["head_data"] = "train" if head_loader is train_loader else "calibration sample"
        t0 = time.perf_counter()
        say("train head")
        train_head(pruned, head_loader, epochs=config.head_epochs, lr=config.lr, seed=config.seed, device=device)
        m["seconds_head"] = time.perf_counter() - t0
        say("evaluate head")
        m["acc_head"] = evaluate(pruned, test_loader, device=device)
    if config.finetune_epochs and not config.head_only:
        if train_loader is None:
            raise ValueError("fine-tuning needs the training split")
        t0 = time.perf_counter()
        say("fine-tune")
        hist = finetune(pruned, train_loader, epochs=config.finetune_epochs, lr=config.lr, augment=augment,
                        bf16=config.bf16, max_steps=config.finetune_steps, progress=progress,
                        teacher=base if config.teacher == "base" else None, kd_weight=config.kd_weight,
                        temperature=config.kd_temperature, device=device)
        m["finetune_teacher"] = config.teacher
        m["seconds_finetune"] = time.perf_counter() - t0
        m["finetune_history"] = hist
        say("evaluate fine-tuned")
        m["acc_finetuned"] = evaluate(pruned, test_loader, device=device)
    pruned.eval()
    return pruned, m


def compress(model, sample_loader, test_loader, *, example_input, arch: str = "model", num_classes: int | None = None,
             config: CompressConfig | None = None, plan: CompressionPlan | None = None, train_loader=None,
             progress=None) -> tuple[torch.nn.Module, CompressionPlan, dict]:
    """Plan by SI on ``sample_loader`` (or apply ``plan``), prune a copy of ``model``, compensate,
    optionally fine-tune; returns (compressed model, plan, metrics of :func:`execute`).

    ``example_input``: one batch-of-one input. ``num_classes``: default the model's output width.
    Save the result with ``si_compress.compress.save_compressed`` and reload it with
    ``si_compress.load_compressed``.
    """
    config = config or CompressConfig()
    if num_classes is None:
        with torch.inference_mode():
            num_classes = int(model.eval()(example_input).shape[1])
    if plan is None:
        plan, _ = si_plan(model, sample_loader, arch=arch, num_classes=num_classes, example_input=example_input,
                          config=config, progress=progress)
    small, metrics = execute(model, plan, example_input=example_input, calib_loader=sample_loader,
                             test_loader=test_loader, train_loader=train_loader, config=config)
    return small, plan, metrics


def config_dict(config: CompressConfig) -> dict:
    return asdict(config)
