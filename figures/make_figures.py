"""Regenerate the figures in figures/ from the benchmark JSON files.

Usage: python figures/make_figures.py [--only NAME ...] [--results DIR] [--out DIR]

Each figure is a function ``fn(data, ax=None, **kw) -> (fig, ax)`` registered in FIGURES with the
JSON it reads and the PNG it writes; a figure whose JSON is missing is skipped with a message.
To add one: write the function and add an entry to FIGURES.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "figures"

# method key in the JSON -> (label, style)
SI_METHODS = {
    "ours": ("ours (auto backend)", dict(color="C0", marker="o", lw=2)),
    "ours_faiss": ("ours (faiss backend)", dict(color="C2", marker="s", lw=1.5)),
    "reference": ("reference: cdist n×n + row min", dict(color="C3", marker="^", lw=1.5)),
    "sklearn_brute": ("scikit-learn brute", dict(color="C1", marker="v", lw=1.5)),
    "gemm_torch": ("X·Xᵀ torch (info)", dict(color="0.55", marker="x", lw=0.8, ls=":")),
}


def _ok_time(rec):
    return rec["median_s"] if rec and rec.get("status") == "ok" else None


def fig_si_speed(data: dict, ax=None, *, d=None):
    """First-order SI wall time vs n per method, log-log, one panel per d; the GEMM floor as markers.

    ``ax``: None (one new panel per d, or only ``d`` if given), a single Axes (one panel: ``d`` or
    the largest d) or a sequence of Axes (one per d, in increasing d). Returns (fig, ax).
    """
    S = data.get("sections", {})
    cases = list(S.get("si", {}).get("cases", []))
    big = list(S.get("big", {}).get("cases", []))
    ds = sorted({c["d"] for c in cases} | {c["d"] for c in big})
    if not ds:
        raise ValueError("no first-order SI cases in the JSON")
    if d is not None:
        ds = [x for x in ds if x in np.atleast_1d(d)]
    single = ax is not None and not isinstance(ax, (list, tuple, np.ndarray))
    if ax is None:
        fig, axes = plt.subplots(1, len(ds), figsize=(4.6 * len(ds), 4.2), squeeze=False)
        axes = list(axes[0])
    elif single:
        ds = [ds[-1]] if d is None else ds[:1]
        axes, fig = [ax], ax.figure
    else:
        axes = list(np.ravel(ax))
        ds = ds[:len(axes)]
        fig = axes[0].figure
    for a, dd in zip(axes, ds):
        rows = sorted([c for c in cases if c["d"] == dd], key=lambda c: c["n"])
        brows = sorted([c for c in big if c["d"] == dd], key=lambda c: c["n"])
        for key, (label, style) in SI_METHODS.items():
            pts = [(c["n"], _ok_time(c["methods"].get(key))) for c in rows]
            if key == "ours":
                pts += [(c["n"], _ok_time(c["methods"].get("ours"))) for c in brows]
            pts = [(n, t) for n, t in pts if t is not None]
            if pts:
                n_, t_ = zip(*pts)
                a.plot(n_, t_, label=label, ms=5, **style)
        floor = [(c["n"], c.get("floor_s")) for c in rows if c.get("floor_s")]
        if floor:
            n_, t_ = zip(*floor)
            a.plot(n_, t_, ls="none", marker="_", ms=18, mew=2.5, color="k", label="floor: one float32 X·Xᵀ (numpy)")
        # where the reference could not run for memory: say why, at the largest such n
        skipped = [c for c in rows if c["methods"].get("reference", {}).get("status") == "skipped"]
        skipped += [c for c in brows if c["methods"].get("reference", {}).get("fits_machine") is False]
        if skipped:
            c = max(skipped, key=lambda c: c["n"])
            reason = c["methods"]["reference"]["reason"].split(";")[0]
            a.annotate(f"reference at n={c['n']:,}:\n{reason}", xy=(0.03, 0.97), xycoords="axes fraction",
                       va="top", fontsize=7, color="C3")
        a.set_xscale("log")
        a.set_yscale("log")
        ns = sorted({c["n"] for c in rows + brows})
        a.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ns))
        a.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"))
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if len(ns) == 1:
            a.set_xlim(ns[0] / 1.5, ns[0] * 1.5)
        a.set_xlabel("n (samples)")
        a.set_title(f"d = {dd}")
        a.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median wall time (s)")
    handles = {}
    for a in axes:
        for h, lab in zip(*a.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if single:
        axes[0].legend(handles.values(), handles.keys(), fontsize=7, loc="best")
    quick = any(s.get("meta", {}).get("quick") for s in (S.get("si", {}), S.get("big", {})))
    m = data.get("machine", {})
    fig.suptitle("First-order Separation Index: exact search time" + (" (QUICK run)" if quick else "")
                 + f"\n{m.get('cpu_model', '')}, {m.get('cpus_usable', '?')} cores", fontsize=10)
    if not single:
        fig.legend(handles.values(), handles.keys(), fontsize=8, loc="lower center", ncol=min(len(handles), 3),
                   frameon=False)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig, (axes[0] if single else axes)


def _report(data: dict):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from si_compress.analysis import AnalysisReport

    return AnalysisReport.from_dict(data["report"])


def fig_analysis_layers(data: dict, ax=None):
    """SI / CSI / high-order / soft SI by layer from a bench_analyze JSON (si_compress.plots)."""
    from si_compress import plots

    return plots.si_layers_figure(_report(data), ax=ax)


def fig_analysis_per_class(data: dict, ax=None):
    from si_compress import plots

    return plots.si_per_class_figure(_report(data), ax=ax)


def fig_compress_kept(data: dict, ax=None):
    """Filters kept per layer by the SI plan of a bench_compress JSON."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from si_compress import plots
    from si_compress.plan import CompressionPlan

    return plots.kept_filters_figure(CompressionPlan.from_dict(data["plan"]), ax=ax)


def fig_compress_accuracy(data: dict, ax=None):
    """Top-1 of each method: pruned, after compensation, after fine-tuning (grouped bars)."""
    res = data["results"]
    names = list(res)
    steps = data["settings"].get("max_steps")
    ft = f"fine-tuned ({steps} steps)" if steps else f"fine-tuned ({data['settings']['epochs']} ep)"
    stages = [("acc_pruned", "pruned"), ("acc_compensated", "compensated (no training)"), ("acc_finetuned", ft)]
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 4.6), constrained_layout=True)
    else:
        fig = ax.figure
    x = np.arange(len(names))
    w = 0.26
    for i, (key, label) in enumerate(stages):
        vals = [100 * res[n][key] if res[n].get(key) is not None else np.nan for n in names]
        ax.bar(x + (i - 1) * w, vals, width=w, label=label)
    ax.axhline(100 * data["base"]["acc"], color="k", lw=1, ls="--", label="base")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{n}\n-{100 * res[n]['macs_reduction']:.0f}% MACs" for n in names], fontsize=8)
    ax.set_ylabel("top-1 on the JPEG test split (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{data['settings']['model']}: SI plan vs baselines at the same MACs")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    return fig, ax


def fig_vgg_si_layers(data: dict, ax=None):
    """SI and CSI per layer of the plain VGG (bench_vgg JSON), the cut after the SI peak marked."""
    layers = data["layers"]
    t = data.get("truncation") or {}
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(layers) + 3), 4.6), constrained_layout=True)
    else:
        fig = ax.figure
    x = np.arange(len(layers))
    names = [r["name"] for r in layers]
    macs = np.array([r["macs"] for r in layers], dtype=float)
    ax2 = ax.twinx()
    ax2.bar(x, np.diff(np.concatenate(([0.0], macs))) / 1e6, color="0.88", width=0.8, zorder=0,
            label="MACs added (M)")
    ax2.set_ylabel("MACs added by the layer (millions)", color="0.4")
    ax2.tick_params(axis="y", colors="0.4")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot(x, [r["si"] for r in layers], "o-", color="C0", label="SI")
    ax.plot(x, [r["csi"] for r in layers], "s-", color="C1", label="CSI (centre)")
    cut = t.get("truncate_after")
    if t:
        ax.axhline(t["max_si"] - t["tol"], color="C0", lw=0.8, ls=":", label=f"max SI - tol ({t['tol']})")
    if cut in names:
        i = names.index(cut)
        ax.axvline(i + 0.5, color="C3", lw=1.5, ls="--")
        ax.axvspan(i + 0.5, len(layers) - 0.5, color="C3", alpha=0.08, lw=0)
        ax.annotate(f"cut after {cut}\n-{100 * t['macs_saved'] / max(t['total_macs'], 1):.0f}% MACs",
                    xy=(i + 0.6, 0.97), va="top", fontsize=8, color="C3")
        if "head_input_si" in t:
            ax.plot([i], [t["head_input_si"]], "*", ms=12, color="C3",
                    label="SI of the truncated net's pooled head input")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("separation index (fraction of samples)")
    ax.set_xticks(x)
    ax.set_xticklabels([n.replace(":input", " (in)") for n in names], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("layer (execution order)")
    ax.grid(alpha=0.3)
    tr = data.get("train", {})
    ax.set_title(f"{data.get('arch', 'vgg')}: SI by layer ({data['data']['si_samples']} train images; "
                 f"base {100 * data['base']['acc']:.1f}% top-1 after {tr.get('epochs_done', '?')} epochs)"
                 + (" QUICK run" if data.get("quick") else ""), fontsize=10)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, frameon=False)
    return fig, ax


@dataclass(frozen=True)
class Figure:
    json: str                 # file name under the results folder
    func: Callable            # fn(data, ax=None) -> (fig, ax)
    out: str                  # PNG file name under the output folder


# bench_analyze JSONs (one per analysed model): figure name prefix -> JSON file
ANALYZED = {"resnet56": "analyze_resnet56-cifar10-jpeg.json", "resnet20": "analyze_resnet20-cifar10-jpeg.json"}

FIGURES: dict[str, Figure] = {
    "si_speed": Figure("separability.json", fig_si_speed, "si_speed.png"),
    **{f"{m}_{kind}": Figure(js, fn, f"{m}_{kind}.png") for m, js in ANALYZED.items()
       for kind, fn in (("si_layers", fig_analysis_layers), ("si_per_class", fig_analysis_per_class))},
    "resnet56_kept_filters": Figure("compress_resnet56.json", fig_compress_kept, "resnet56_kept_filters.png"),
    "resnet56_compress_accuracy": Figure("compress_resnet56.json", fig_compress_accuracy,
                                         "resnet56_compress_accuracy.png"),
    "vgg_si_layers": Figure("vgg.json", fig_vgg_si_layers, "vgg_si_layers.png"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=sorted(FIGURES), help="figure name (repeatable)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmark JSON files")
    p.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs")
    p.add_argument("--dpi", type=int, default=150)
    args = p.parse_args(argv)
    made = 0
    for name in args.only or FIGURES:
        spec = FIGURES[name]
        src = args.results / spec.json
        if not src.exists():
            print(f"skip {name}: {src} not found (run its benchmark first)")
            continue
        try:
            data = json.loads(src.read_text())
            fig, _ = spec.func(data)
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            print(f"skip {name}: cannot draw from {src}: {type(exc).__name__}: {exc}")
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        dst = args.out / spec.out
        fig.savefig(dst, dpi=args.dpi)
        plt.close(fig)
        print(f"wrote {dst}")
        made += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
