"""Figures of an AnalysisReport. Each function takes an optional ``ax`` and returns (fig, ax)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    return name.replace(":input", " (in)")


def _model_title(report) -> str:
    return report.model.get("name") or report.model.get("arch") or "model"


def si_layers_figure(report, ax=None):
    """SI, CSI, high-order and soft SI against depth; bars (right axis): the SI each layer adds over
    the layer before it, the gain the planner scores a section by (green: adds, red: loses)."""
    plt = _mpl()
    if ax is None:
        width = max(7.0, 0.32 * len(report.layers) + 3)
        fig, ax = plt.subplots(figsize=(width, 4.6), constrained_layout=True)
    else:
        fig = ax.figure
    layers = report.layers
    x = np.arange(len(layers))
    si = np.array([r.si for r in layers], dtype=float)
    gain = np.concatenate(([np.nan], np.diff(si)))   # the first layer has no input SI recorded
    ax2 = ax.twinx()
    colors = ["C2" if g >= 0 else "C3" for g in np.nan_to_num(gain)]
    ax2.bar(x, np.nan_to_num(gain), color=colors, alpha=0.35, width=0.8, zorder=0,
            label="SI gain over the previous layer")
    lim = max(0.05, float(np.nanmax(np.abs(gain))) if len(layers) > 1 else 0.05) * 1.1
    ax2.set_ylim(-lim, lim)
    ax2.axhline(0.0, color="0.5", lw=0.6)
    ax2.set_ylabel("SI gain of the layer (section score)", color="0.3")
    ax2.tick_params(axis="y", colors="0.3")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    order = report.settings.get("order", 3)
    ax.plot(x, [r.si for r in layers], "o-", color="C0", label="SI")
    ax.plot(x, [r.csi for r in layers], "s-", color="C1", label="CSI (centre)")
    ax.plot(x, [r.high_order_si for r in layers], "^-", color="C2", label=f"high-order SI (r={order})")
    ax.plot(x, [r.soft_si for r in layers], "v--", color="C4", label=f"soft SI (r={order})", alpha=0.8)
    if any(r.cross_si is not None for r in layers):
        ax.plot(x, [np.nan if r.cross_si is None else r.cross_si for r in layers], "d:", color="C3",
                label="cross-SI (vs reference)")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("separation index (fraction of samples)")
    ax.set_xticks(x)
    ax.set_xticklabels([_short(r.name) for r in layers], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("layer (execution order)")
    ax.grid(alpha=0.3)
    title = _model_title(report)
    data_name = Path(str(report.data.get("name", ""))).name  # a folder's name, not its absolute path
    ax.set_title(f"{title}: separation by layer\n({report.n_samples} samples, {data_name} {report.data.get('split') or ''})"
                 .replace(" )", ")"))
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    return fig, ax


def si_per_class_figure(report, ax=None):
    """Heatmap of per-class first-order SI: classes (rows) x layers (columns)."""
    plt = _mpl()
    if ax is None:
        width = max(7.0, 0.32 * len(report.layers) + 3)
        fig, ax = plt.subplots(figsize=(width, 0.35 * len(report.class_names) + 2.6), constrained_layout=True)
    else:
        fig = ax.figure
    M = np.array([r.per_class_si for r in report.layers]).T
    im = ax.imshow(M, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(np.arange(len(report.class_names)))
    ax.set_yticklabels(report.class_names, fontsize=8)
    ax.set_xticks(np.arange(len(report.layers)))
    ax.set_xticklabels([_short(r.name) for r in report.layers], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("layer (execution order)")
    ax.set_title(f"{_model_title(report)}: per-class SI by layer ({report.n_samples} samples)")
    fig.colorbar(im, ax=ax, label="SI of the class")
    return fig, ax


def kept_filters_figure(plan, ax=None, *, model_name: str | None = None):
    """Filters kept per planned channel group (bars over the original width); dropped sections
    shaded red, named in the legend. ``model_name``: the title's model (default the plan's arch)."""
    from matplotlib.patches import Patch

    plt = _mpl()
    names = [d.name for d in plan.layers] + [f"{b} (dropped)" for b in plan.dropped_blocks]
    rows = [(d.name, d.out_channels, len(d.keep)) for d in plan.layers]
    rows += [(f"{b} (dropped)", next((x.macs for x in plan.blocks if x.name == b), 0), 0) for b in plan.dropped_blocks]
    order = {n: i for i, n in enumerate(sorted(names, key=lambda s: [int(t) if t.isdigit() else t
                                                                  for t in s.replace(".", " ").split()]))}
    rows.sort(key=lambda r: order[r[0]])
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(7.0, 0.3 * len(rows) + 3), 4.2), constrained_layout=True)
    else:
        fig = ax.figure
    x = np.arange(len(rows))
    full = [r[1] if "dropped" not in r[0] else 0 for r in rows]
    kept = [r[2] for r in rows]
    ax.bar(x, full, color="0.85", label="original filters")
    ax.bar(x, kept, color="C0", label="kept filters")
    for i, r in enumerate(rows):
        if "dropped" in r[0]:
            ax.axvspan(i - 0.45, i + 0.45, color="C3", alpha=0.25, lw=0)
    ax.set_xticks(x)
    ax.set_xticklabels([r[0].replace(".conv1", "").replace(" (dropped)", " x") for r in rows], rotation=60,
                       ha="right", fontsize=8)
    ax.set_xlabel("pruned channel group (its first conv; x = dropped section)")
    ax.set_ylabel("output filters (channels)")
    p = plan.predicted
    frac = f" ({100 * (1 - p['macs'] / p['base_macs']):.1f}% fewer MACs)" if p.get("base_macs") else ""
    what = plan.arch if model_name is None else f"{model_name} ({plan.arch})"
    ax.set_title(f"{what}: filters kept per layer{frac}")
    handles, labels = ax.get_legend_handles_labels()
    if plan.dropped_blocks:
        shown = ", ".join(plan.dropped_blocks[:6]) + (f" +{len(plan.dropped_blocks) - 6}" if len(plan.dropped_blocks) > 6 else "")
        handles.append(Patch(color="C3", alpha=0.25))
        labels.append(f"dropped sections: {shown}")
    if plan.truncate_after:
        handles.append(Patch(color="none"))
        labels.append(f"cut after {plan.truncate_after}")
    ax.legend(handles, labels, fontsize=8)
    return fig, ax
