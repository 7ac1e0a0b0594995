"""The si-compress pipeline as functions: SI plan -> apply -> compensate -> (fine-tune) -> measure.

``si_plan`` turns a model and a labelled (train) sample into a CompressionPlan; ``execute`` applies
any plan (ours or a baseline) through the same executor and compensation and returns the
compressed model with its measured metrics, so every method is compared on equal terms.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .plan import CompressionPlan

COMPENSATIONS = ("refit+bn", "refit", "bn", "none")


@dataclass(frozen=True)
class CompressConfig:
    target_macs: float | None = 0.5     # fraction of base MACs to keep; None: threshold mode
    delta: float = 0.02
    ranking: str = "si"
    allow_drop: bool = True
    weighting: str = "gain"
    round_to: int = 1
    grid: int = 4                      # per-filter pooled grid for filter SI
    order: int = 3
    compensation: str = "refit"
    finetune_epochs: int = 0
    finetune_steps: int | None = None   # stop fine-tuning after this many SGD steps (None: full epochs)
    head_only: bool = False
    head_epochs: int = 5
    lr: float = 0.01
    batch_size: int = 128
    bf16: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {', '.join(COMPENSATIONS)}; got {self.compensation!r}")
        if self.finetune_epochs < 0 or self.head_epochs < 0:
            raise ValueError("epochs must be >= 0")


@dataclass(frozen=True)
class PlanEvidence:
    report: object                 # AnalysisReport of the block outputs on the SI sample
    structure: object              # ModelStructure
    rankings: dict                 # conv -> Ranking
    groups_labels: np.ndarray | None = None


def si_plan(model, sample_loader, *, arch: str, num_classes: int, example_input, config: CompressConfig,
            progress=None) -> tuple[CompressionPlan, PlanEvidence]:
    """Measure block SI and per-filter SI on ``sample_loader`` and plan with ``config``."""
    from .analysis import analyze
    from .planning import PlannerConfig, block_si, plan_compression, rank_filters, size_head
    from .structure import collect_filter_groups, prunable_structure

    structure = prunable_structure(model, example_input)
    if not structure.convs and not structure.blocks:
        raise ValueError("found nothing to prune: no residual blocks with conv1/conv2 and no plain conv chain "
                         "in 'features'; si-compress supports CIFAR ResNets, VGG-style chains and SmallCNN")
    report = analyze(model, sample_loader, order=config.order, max_dim=1024,
                     example_input=example_input, progress=progress)
    t0 = time.perf_counter()
    groups, labels = collect_filter_groups(model, sample_loader, [u.activation for u in structure.convs],
                                           grid=config.grid)
    weights = dict(model.named_modules())
    rankings = {}
    for i, u in enumerate(structure.convs):
        rankings[u.conv] = rank_filters(config.ranking, G=groups[u.activation], y=labels,
                                        weight=weights[u.conv].weight.detach().numpy(), seed=config.seed + i)
        if progress is not None:
            progress("filter SI", i + 1, len(structure.convs))
    gains = block_si(report.layers, structure.blocks)
    final = report.layers[-1]
    head = size_head(final.si, final.csi, in_features=final.dim, num_classes=num_classes)

    def make(target):
        return plan_compression(
            arch=arch, num_classes=num_classes, structure=structure, rankings=rankings, gains=gains,
            config=PlannerConfig(target_macs=target, delta=config.delta, allow_drop=config.allow_drop,
                                 round_to=config.round_to, weighting=config.weighting),
            head=head, source=dict(si_samples=report.n_samples, filter_seconds=time.perf_counter() - t0),
        )

    plan = make(config.target_macs)
    if config.target_macs is not None:
        # The planner budgets conv/linear MACs; metrics count as torch-pruning does (BN, ReLU, pooling
        # too). Tighten the planner's target until the torch-pruning count meets the budget.
        from .compress import apply_plan

        base_tp, _ = count_tp(model, example_input)
        target = config.target_macs
        for _ in range(6):
            got, _ = count_tp(apply_plan(model, plan, example_input=example_input), example_input)
            if got <= config.target_macs * base_tp or target < 0.05:
                break
            target *= config.target_macs * base_tp / got
            plan = make(target)
        plan = CompressionPlan(**{**{f: getattr(plan, f) for f in plan.__dataclass_fields__},
                                  "predicted": dict(plan.predicted, tp_base_macs=int(base_tp), tp_macs=int(got)),
                                  "settings": dict(plan.settings, target_macs=config.target_macs,
                                                   planner_target=target)})
    return plan, PlanEvidence(report=report, structure=structure, rankings=rankings, groups_labels=labels)


def count_tp(model, example_input) -> tuple[int, int]:
    """(MACs, params) as torch-pruning's ``count_ops_and_params`` counts them."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)


def latency(model, batch: int, example_shape, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds of one forward pass at ``batch`` (inference mode, current threads)."""
    x = torch.randn(batch, *example_shape)
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return float(np.median(times))


def execute(base, plan: CompressionPlan, *, example_input, calib_loader, test_loader, train_loader=None,
            config: CompressConfig, progress=None, augment=None) -> tuple[torch.nn.Module, dict]:
    """Apply ``plan`` to a copy of ``base``, compensate, optionally fine-tune; accuracy at each stage."""
    from .compress import apply_plan, evaluate, finetune, recalibrate_bn, refit_consumers, train_head

    m = {}
    t0 = time.perf_counter()
    pruned = apply_plan(base, plan, example_input=example_input)
    m["seconds_apply"] = time.perf_counter() - t0
    m["macs"], m["params"] = count_tp(pruned, example_input)
    m["acc_pruned"] = evaluate(pruned, test_loader)
    t0 = time.perf_counter()
    if config.compensation in ("refit", "refit+bn"):
        rep = refit_consumers(pruned, base, plan, calib_loader)
        m["refit"] = {k: {kk: vv for kk, vv in v.items() if kk in ("before", "after")} for k, v in rep.items()}
    if config.compensation in ("bn", "refit+bn"):
        recalibrate_bn(pruned, calib_loader)
    m["seconds_compensate"] = time.perf_counter() - t0
    m["acc_compensated"] = evaluate(pruned, test_loader)
    if plan.head is not None and plan.head.kind == "mlp" or config.head_only:
        if train_loader is None:
            raise ValueError("training the head needs the training split")
        t0 = time.perf_counter()
        train_head(pruned, train_loader, epochs=config.head_epochs, lr=config.lr, seed=config.seed)
        m["seconds_head"] = time.perf_counter() - t0
        m["acc_head"] = evaluate(pruned, test_loader)
    if config.finetune_epochs and not config.head_only:
        if train_loader is None:
            raise ValueError("fine-tuning needs the training split")
        t0 = time.perf_counter()
        hist = finetune(pruned, train_loader, epochs=config.finetune_epochs, lr=config.lr, augment=augment,
                        bf16=config.bf16, max_steps=config.finetune_steps, progress=progress)
        m["seconds_finetune"] = time.perf_counter() - t0
        m["finetune_history"] = hist
        m["acc_finetuned"] = evaluate(pruned, test_loader)
    pruned.eval()
    return pruned, m


def config_dict(config: CompressConfig) -> dict:
    return asdict(config)
