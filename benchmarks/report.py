"""Reproduction report: every published claim next to what we measured, from the result JSON.

One row per claim (A-G of the reproduction issue). Published numbers are the constants in PUBLISHED
below, each with its source; every measured number is read from benchmarks/results/*.json when the
table is rendered, and every verdict is computed from those numbers (tolerances in TOL), naming
the setting differences that make the comparison inexact. A missing JSON or section prints
"not measured yet: run <command>" instead of a number.

  python benchmarks/report.py [--table] [--results DIR]     # the one-page summary (markdown)
  python benchmarks/report.py --command compress            # the command that produced a result JSON

The results folder defaults to benchmarks/results (or $SI_COMPRESS_RESULTS).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results"
CIFAR10_TRAIN = 50_000  # images in the JPEG train split (one fine-tuning epoch)

# ------------------------------------------------------------------------------------------ published
# Each published number is cited by its own reference (short key in brackets in the table, the full
# citation under it); a test checks that no row cites a generic "paper".
SAFFAR, SONG, ALHIMDIAT, WANG = "Saffar et al. 2024", "Song 2024", "Alhimdiat et al. 2023", "Wang et al. 2024"
REFERENCES = {
    SAFFAR: 'M. Saffar, A. Kalhor, A. Habibnia, "A geometric approach for accelerating neural networks designed '
            'for classification problems", Scientific Reports 14 (2024), doi:10.1038/s41598-024-68172-6',
    SONG: 'Y. Song, "Improving the Performance and Efficiency of CNNs on Image Classification Tasks via Fixed-Point '
          'Quantization and Structured Pruning", Frontiers in Computing and Intelligent Systems 10(2), 39-42 (2024), '
          'doi:10.54097/cmc21d96',
    ALHIMDIAT: 'R. Alhimdiat, W. Ashour, R. Battrawy, D. Stricker, "Accelerating the Run-Time of Convolutional Neural '
               'Networks through Weight Pruning and Quantization", ieCRES 2023, IEEE',
    WANG: 'P. Wang, J. Zhang, Y. Fan, "A neural network pruning and quantization algorithm for hardware deployment", '
          'Computer Engineering & Science 46(9), 1547-1553 (2024), doi:10.3969/j.issn.1007-130X.2024.09.004',
    "HRank": 'M. Lin et al., "HRank: Filter Pruning using High-Rank Feature Map", CVPR 2020',
    "DepGraph": 'G. Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023',
}
PUBLISHED = {
    # A. SI compression of ResNet-56 on CIFAR-10
    "si_r56": dict(source=SAFFAR, params_reduction=0.578, flops_reduction=0.583, acc_base=93.52, acc_after=93.49,
                   finetune=None),  # fine-tuning budget: not given in our quote of the paper
    "hrank_r56": dict(source="HRank, ResNet-56 / CIFAR-10", acc_change=-0.09, flops_reduction=0.50),
    "depgraph_r56": dict(source="DepGraph, ResNet-56 / CIFAR-10", acc_change=+0.38, speedup=2.13, finetune_epochs=100),
    # H. the SI paper's other CIFAR-10 networks (acc_* None: not given in our quote)
    "si_vgg16": dict(source=SAFFAR, params_reduction=0.875, flops_reduction=0.76, acc_base=None, acc_after=None),
    "si_googlenet": dict(source=SAFFAR, params_reduction=0.776, flops_reduction=0.744, acc_base=95.05, acc_after=95.00),
    "si_densenet40": dict(source=SAFFAR, params_reduction=0.788, flops_reduction=0.761, acc_change=-0.04),
    # C. pruning + fixed-point quantization, ResNet-50 / ImageNet
    "prune_quant_r50": dict(source=SONG + ", ResNet-50 / ImageNet", size_reduction=0.75, speedup=1.50,
                            acc_base=76.4, acc_after=74.5),
    # D. percentile pruning x uniform quantization (PTQ and QAT, re-fine-tuning at 10x lower lr)
    "percentile_grid": dict(source=ALHIMDIAT),
    # E. 4-bit quantization with power-of-two (shift-add) weights for hardware, ImageNet
    "pot4": dict(source=WANG + ", ImageNet", acc_change={"ResNet-18": 0.38, "ResNet-50": 0.35, "GoogLeNet": 1.14}),
    "pot4_fpga": dict(source=WANG + ", Zynq-7035", layer="VGG-16's 8th conv layer", time_reduction=0.511,
                      power_reduction=0.467, dsp_reduction=0.43),
}


def cites(source: str) -> str:
    """``[source]``; the source must start with a key of REFERENCES."""
    if not any(source.startswith(k) for k in REFERENCES):
        raise KeyError(f"published source {source!r} is not in REFERENCES")
    return f"[{source}]"


TOL = dict(
    acc_points=0.5,        # an accuracy drop matches the published one within this many points
    reduction_points=1.0,  # a size / MACs / params reduction matches within this many points
    unchanged_points=0.5,  # our reading of "accuracy essentially unchanged"
    within_fp32_points=1.0,  # D: a grid cell "keeps accuracy" within this of fp32
)

# -------------------------------------------------------------------------------------------- helpers
FILES = {
    "compress": "compress_resnet56.json",
    "compress_paper": "compress_resnet56_paper.json",
    "compress_paper_recon": "compress_resnet56_paper_recon.json",
    "compress_vgg16_paper": "compress_vgg16_paper.json",
    "compress_googlenet_paper": "compress_googlenet_paper.json",
    "compress_densenet40_paper": "compress_densenet40_paper.json",
    "quant": "quant.json",
    "shiftadd": "shiftadd.json",
    "separability": "separability.json",
    "analyze_resnet56": "analyze_resnet56-cifar10-jpeg.json",
    "analyze_resnet20": "analyze_resnet20-cifar10-jpeg.json",
    "vgg": "vgg.json",
}
# the registered arch behind each of the SI paper's other networks (full width; narrower ones say so in the row)
PAPER_NETS = {"si_vgg16": "vgg16_bn", "si_googlenet": "googlenet_cifar", "si_densenet40": "densenet40"}
DEFAULT_COMMANDS = {
    "compress": "python benchmarks/bench_compress.py --epochs 1 --bf16",
    "compress_paper": ("python benchmarks/bench_compress.py --target-macs 0.417 --target-params 0.422 --epochs 0 "
                       "--methods si tp-magnitude tp-group-norm --out benchmarks/results/compress_resnet56_paper.json"),
    "quant": "python benchmarks/bench_quant.py",
    "shiftadd": "python benchmarks/bench_shiftadd.py",
    "separability": "python benchmarks/bench_separability.py",
    "analyze_resnet56": "python benchmarks/bench_analyze.py --model resnet56-cifar10-jpeg.th",
    "analyze_resnet20": "python benchmarks/bench_analyze.py --model resnet20-cifar10-jpeg.th",
    "vgg": "python benchmarks/bench_vgg.py",
}
QUANT_D = "python benchmarks/bench_quant.py --sections d --update --pruned runs/compress/si_resnet56.pt"
LABELS = {
    "si": "SI plan (widths + drops from SI curves, L1 filters)",
    "si-ranked-same-widths": "SI widths, single-filter-SI filter choice",
    "l1-same-widths": "SI widths, L1 filter choice",
    "random-same-widths": "SI widths, random filters",
    "uniform-l1": "L1, uniform ratio per layer",
    "tp-magnitude": "torch-pruning global magnitude pruner",
}


def results_dir(arg: str | Path | None = None) -> Path:
    return Path(arg or os.environ.get("SI_COMPRESS_RESULTS") or DEFAULT_RESULTS)


def load(results: Path, key: str) -> dict | None:
    try:
        return json.loads((results / FILES[key]).read_text())
    except (OSError, ValueError):
        return None


def pct(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{100 * v:.{nd}f}%"


def red(v: float) -> str:
    """A reduction (fraction removed) as a signed percentage: 0.502 -> -50.2%."""
    return f"-{100 * v:.1f}%" if v >= 0 else f"+{-100 * v:.1f}%"


def pts(v: float) -> str:
    return f"{v:+.2f} pts"


def missing(key: str, what: str = "") -> str:
    return f"not measured yet: run `{command(key, None)}`" + (f" ({what})" if what else "")


def finetune_budget(settings: dict) -> tuple[float | None, str]:
    """(epochs, text) of bench_compress's fine-tuning from its recorded settings."""
    steps, ep = settings.get("max_steps"), settings.get("epochs")
    if steps:
        e = steps * 128 / CIFAR10_TRAIN
        return (min(e, ep) if ep else e), f"{steps} SGD steps of batch 128 ({min(e, ep or e):.2f} epoch)"
    if ep:
        return float(ep), f"{ep} epoch(s)"
    return 0.0, "none"


# ------------------------------------------------------------------------------------------- commands
def command(key: str, d: dict | None) -> str:
    """The command line that produced (or produces) a result JSON, from its recorded settings."""
    if d is None:
        return DEFAULT_COMMANDS[key]
    if key.startswith("compress_") and key.endswith(("_paper", "_paper_recon")):
        s = d.get("settings", {})
        model = "" if s.get("model", "resnet56-cifar10-jpeg.th") == "resnet56-cifar10-jpeg.th" else \
            f" --model {s['model']}" + (f" --arch {s['arch']}" if s.get("arch") else "")
        return (f"python benchmarks/bench_compress.py{model} --target-macs {s.get('target_macs')} --target-params "
                f"{s.get('target_params')} --epochs {s.get('epochs')} --compensation {s.get('compensation')} "
                + "".join(f"--{k.replace('_', '-')} {s[k]} " for k, default in (
                          ("objective", "both"), ("round_to", 8), ("reconstruct_steps", 1200),
                          ("reconstruct_seconds", 1800.0), ("reconstruct_images", 50000))
                          if s.get(k, default) != default
                          and (k in ("objective", "round_to") or "reconstruct" in str(s.get("compensation")))) +
                f"--methods {' '.join(s.get('methods', []))} --out benchmarks/results/{FILES[key]}")
    if key == "compress":
        s = d.get("settings", {})
        cmd = "python benchmarks/bench_compress.py"
        if s.get("model", "resnet56-cifar10-jpeg.th") != "resnet56-cifar10-jpeg.th":
            cmd += f" --model {s['model']}"
        cmd += f" --target-macs {s.get('target_macs')} --epochs {s.get('epochs')}"
        for flag, k, default in (("--max-steps", "max_steps", None), ("--lr", "lr", 0.01), ("--seed", "seed", 0),
                                 ("--si-samples", "si_samples", 2000), ("--ranking", "ranking", "l1"),
                                 ("--objective", "objective", "both"), ("--round-to", "round_to", 8),
                                 ("--compensation", "compensation", "refit")):
            if s.get(k, default) != default:
                cmd += f" {flag} {s[k]}"
        return cmd + (" --bf16" if s.get("bf16") else "")
    if key == "quant":
        a = d.get("args", {})
        cmd = "python benchmarks/bench_quant.py"
        for flag, k, default in (("--qat-minutes", "qat_minutes", 15.0), ("--grid-samples", "grid_samples", 2000),
                                 ("--test-samples", "test_samples", 0), ("--train-samples", "train_samples", 0),
                                 ("--shiftadd-samples", "shiftadd_samples", 500), ("--seed", "seed", 0)):
            if a.get(k, default) != default:
                cmd += f" {flag} {a[k]}"
        dd = d.get("d")
        if dd and "skipped" not in dd:
            pruned = Path(str(dd.get("pruned_path")))
            try:  # print the path relative to the repository, where the benchmark saved it
                pruned = pruned.relative_to(Path(__file__).resolve().parent.parent)
            except ValueError:
                pass
            cmd += f" --pruned {pruned}"
        return cmd
    if key == "shiftadd":
        cmd = "python benchmarks/bench_shiftadd.py"
        if d.get("repeats", 20) != 20:
            cmd += f" --repeats {d['repeats']}"
        if d.get("threads", 1) != 1:
            cmd += f" --threads {d['threads']}"
        return cmd + (" --quick" if d.get("quick") else "")
    if key == "separability":
        groups: dict[tuple, list[str]] = {}
        for name, sec in d.get("sections", {}).items():
            m = sec.get("meta", {})
            quick = bool(m.get("quick"))
            flags = " --quick" if quick else ""
            if m.get("repeats", 3 if quick else 5) != (3 if quick else 5):
                flags += f" --repeats {m['repeats']}"
            if m.get("budget_s", 2.0 if quick else 60.0) != (2.0 if quick else 60.0):
                flags += f" --budget-s {m['budget_s']:g}"
            if m.get("memory", "largest" if quick else "all") != ("largest" if quick else "all"):
                flags += f" --memory {m['memory']}"
            groups.setdefault((flags,), []).append(name)
        base = "python benchmarks/bench_separability.py"
        if len(groups) <= 1:
            return base + (next(iter(groups))[0] if groups else "")
        return "; ".join(base + f[0] + "".join(f" --only {n}" for n in names) for f, names in groups.items())
    if key.startswith("analyze_"):
        cmd = f"python benchmarks/bench_analyze.py --model {d['model']}"
        return cmd + (f" --samples {d['samples']}" if d.get("samples", 5000) != 5000 else "")
    if key == "vgg":
        return "python benchmarks/bench_vgg.py" + (" --quick" if d.get("quick") else "")
    raise KeyError(key)


# ----------------------------------------------------------------------------------------------- rows
class Row:
    def __init__(self, claim, published, ours, verdict, key, fields="", cmd=None):
        self.claim, self.published, self.ours, self.verdict = claim, published, ours, verdict
        self.key, self.fields, self.cmd = key, fields, cmd


def training_text(m: dict, settings: dict) -> str:
    """What a compressed model's last accuracy cost in training: re-fit, label-free reconstruction, fine-tuning."""
    r = m.get("reconstruct")
    done = (f"re-fit + {r['steps']} label-free reconstruction steps on {r['images']:,} train images" if r else
            "re-fit")
    if m.get("acc_finetuned") is not None:
        return f"{done}, then fine-tuned {finetune_budget(settings)[1]}"
    return done + (", no fine-tuning" if r else " only, no training")


def last_stage(m: dict) -> tuple[str, float]:
    """The last measured accuracy of a compressed model: (stage, top-1)."""
    if m.get("acc_finetuned") is not None:
        return "fine-tuned", m["acc_finetuned"]
    return "compensated", m["acc_compensated"]


def rows_a(results: Path) -> list[Row]:
    P = PUBLISHED["si_r56"]
    c = load(results, "compress")
    rows: list[Row] = []
    pub_drop = P["acc_base"] - P["acc_after"]
    pub_acc = f"{P['acc_base']:.2f}% -> {P['acc_after']:.2f}% ({pts(-pub_drop)}) {cites(P['source'])}"
    pub_macs = f"{red(P['flops_reduction'])} FLOPs {cites(P['source'])}"
    pub_params = f"{red(P['params_reduction'])} params {cites(P['source'])}"
    si = (c or {}).get("results", {}).get("si")
    if si is None:
        why = "" if c is None else "the JSON has no `si` result yet (run in progress?)"
        for claim, pub in (("A. SI compression of ResNet-56: FLOPs", pub_macs),
                           ("A. SI compression of ResNet-56: parameters", pub_params),
                           ("A. SI compression of ResNet-56: top-1", pub_acc)):
            rows.append(Row(claim, pub, missing("compress", why), "-", "compress"))
    else:
        s = c["settings"]
        base = c["base"]["acc"]
        _, ft_text = finetune_budget(s)
        lat = si.get("latency")
        lat_s = (f"; CPU speed-up {lat['batch1']['speedup']:.2f}x (batch 1) / {lat['batch128']['speedup']:.2f}x "
                 f"(batch 128)") if lat else ""
        gap = 100 * (si["macs_reduction"] - P["flops_reduction"])
        v = ("matched" if abs(gap) <= TOL["reduction_points"] else
             f"{'more' if gap > 0 else 'less'} reduction than published by {abs(gap):.1f} pts")
        if abs(gap) > TOL["reduction_points"]:
            v += (f": this run set `--target-macs {s.get('target_macs')}`, {SAFFAR}'s point is "
                  f"{red(P['flops_reduction'])}")
        partial = "" if "seconds" in c else " (partial JSON: the run has not finished)"
        rows.append(Row("A. SI compression of ResNet-56: FLOPs", pub_macs,
                        f"{red(si['macs_reduction'])} MACs of {c['base']['macs'] / 1e6:.1f} M (torch-pruning "
                        f"count; the ResNet-56 'FLOPs' of the pruning literature, 125 M, count MACs){lat_s}{partial}", v, "compress",
                        "results.si.macs_reduction, .latency"))
        gap = 100 * (si["params_reduction"] - P["params_reduction"])
        nd = len(si.get("dropped_blocks", []))
        v = ("matched" if abs(gap) <= TOL["reduction_points"] else
             f"{'more' if gap > 0 else 'less'} reduction than published by {abs(gap):.1f} pts")
        if abs(gap) > TOL["reduction_points"]:
            v += (f" at {red(si['macs_reduction'])} MACs; {nd} block(s) dropped"
                  + (", only inner conv widths pruned (the residual stream keeps its width)" if nd == 0 else ""))
        rows.append(Row("A. SI compression of ResNet-56: parameters", pub_params,
                        f"{red(si['params_reduction'])} params", v, "compress",
                        "results.si.params_reduction, .dropped_blocks"))
        stage, acc = last_stage(si)
        drop = 100 * (base - acc)
        ours = (f"{pct(base)} -> {pct(si['acc_pruned'])} pruned -> {pct(si['acc_compensated'])} compensated "
                "(no training)"
                + (f" -> {pct(si['acc_finetuned'])} fine-tuned ({ft_text})" if si.get("acc_finetuned") is not None
                   else "; not fine-tuned"))
        gap = drop - pub_drop
        ft_used = ft_text if si.get("acc_finetuned") is not None else "none"
        v = ("matched" if gap <= TOL["acc_points"] else f"not matched: drops {gap:.2f} pts more than published") + \
            f" ({pts(-drop)} {stage} vs {pts(-pub_drop)}). Setting differences: JPEG-fine-tuned baseline " \
            f"{pct(base)} vs published {P['acc_base']:.2f}%; {red(si['macs_reduction'])} MACs vs " \
            f"{red(P['flops_reduction'])} FLOPs; fine-tuning {ft_used}" \
            f" vs {SAFFAR}'s (budget not given in our source)"
        rows.append(Row("A. SI compression of ResNet-56: top-1", pub_acc, ours + partial, v, "compress",
                        "base.acc, results.si.acc_*"))
        # baselines through the same executor and fine-tuning
        for name, m in c["results"].items():
            if name == "si":
                continue
            ours = (f"{red(m['macs_reduction'])} MACs, {red(m['params_reduction'])} params: {pct(m['acc_pruned'])} "
                    f"pruned -> {pct(m['acc_compensated'])} compensated"
                    + (f" -> {pct(m['acc_finetuned'])} fine-tuned" if m.get("acc_finetuned") is not None else ""))
            both_ft = si.get("acc_finetuned") is not None and m.get("acc_finetuned") is not None
            ref_stage = "fine-tuned" if both_ft else "compensated"  # compare at the last stage both reached
            ref, a = (si["acc_finetuned"], m["acc_finetuned"]) if both_ft else (si["acc_compensated"],
                                                                                m["acc_compensated"])
            d = 100 * (ref - a)
            after = (f"the same fine-tuning ({ft_text})" if ref_stage == "fine-tuned"
                     else "compensation (not fine-tuned)")
            v = f"SI plan {'better' if d > 0 else 'worse' if d < 0 else 'equal'} by {abs(d):.2f} pts after {after}"
            dm = 100 * (m["macs_reduction"] - si["macs_reduction"])
            if abs(dm) > 0.5:
                v += f"; this baseline removes {dm:+.1f} pts of MACs relative to the SI plan"
            rows.append(Row(f"A. baseline: {LABELS.get(name, name)} (`{name}`)", "- (run here, same executor)", ours, v,
                            "compress", f"results.{name}"))
        for name in s.get("methods", []):
            if name not in c["results"]:
                rows.append(Row(f"A. baseline: {LABELS.get(name, name)} (`{name}`)", "- (run here, same executor)",
                                missing("compress", "method not in the JSON yet"), "-", "compress"))
    # published anchors of other methods: never measured here
    H, D = PUBLISHED["hrank_r56"], PUBLISHED["depgraph_r56"]
    ctx_si = ""
    if si is not None:
        st, a = last_stage(si)
        ctx_si = (f"context only: our SI plan at {red(si['macs_reduction'])} MACs: "
                  f"{pts(-100 * (c['base']['acc'] - a))} "
                  f"{st} ({finetune_budget(c['settings'])[1]}), from a {pct(c['base']['acc'])} baseline")
    rows.append(Row("A. anchor: HRank on ResNet-56", f"{pts(H['acc_change'])} at {red(H['flops_reduction'])} FLOPs "
                    f"{cites(H['source'])}", "published, not measured", ctx_si or "published, not measured", None))
    tp = (c or {}).get("results", {}).get("tp-magnitude")
    ctx_tp = ""
    if tp is not None:
        st, a = last_stage(tp)
        _, ft_text = finetune_budget(c["settings"])
        ctx_tp = (f"context only: torch-pruning's magnitude pruner (DepGraph's library) here at "
                  f"{red(tp['macs_reduction'])} MACs: {pts(-100 * (c['base']['acc'] - a))} {st} after "
                  f"{ft_text if st == 'fine-tuned' else 'no training'} vs their {D['finetune_epochs']} epochs")
    rows.append(Row("A. anchor: DepGraph on ResNet-56",
                    f"{pts(D['acc_change'])} at {D['speedup']:.2f}x (i.e. {red(1 - 1 / D['speedup'])} FLOPs) after "
                    f"{D['finetune_epochs']} epochs {cites(D['source'])}", "published, not measured",
                    ctx_tp or "published, not measured", None))
    return rows


def rows_b(results: Path) -> list[Row]:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from bench_analyze import HEAD_TAU, layer_facts

    rows = []
    for key, label in (("analyze_resnet56", "ResNet-56"), ("analyze_resnet20", "ResNet-20")):
        d = load(results, key)
        claim = f"B. layer importance (SI, CSI, high-order SI per layer): {label}"
        pub = f"per-layer curves (plots, no numbers) {cites(SAFFAR)}"
        if d is None:
            rows.append(Row(claim, pub, missing(key), "-", key))
            continue
        rep = d["report"]
        f = layer_facts(rep)
        L = rep["layers"]
        order = rep.get("settings", {}).get("order", 3)
        nonpos = [b for b, _, _, g in f["block_gains"] if g <= 0]
        ho0, ho1 = L[0].get("high_order_si"), L[-1].get("high_order_si")
        ours = (f"{len(L)} layers, {rep.get('n_samples', d['samples']):,} test images: SI {L[0]['si']:.3f} -> "
                f"{L[-1]['si']:.3f}, CSI {L[0]['csi']:.3f} -> {L[-1]['csi']:.3f}"
                + (f", SI{order} {ho0:.3f} -> {ho1:.3f}" if ho0 is not None and ho1 is not None else "")
                + f"; peak SI {f['peak'][2]:.3f} at `{f['peak'][1]}`")
        fin = f["final"]
        v = (f"measured (no published numbers to compare): SI rises in {f['rises']} of {len(L) - 1} steps; "
             f"{len(nonpos)} of {len(f['block_gains'])} blocks do not raise SI; head "
             f"{'linear' if f['head_linear'] else 'MLP'} (final CSI {fin['csi']:.3f} "
             f"{'>=' if f['head_linear'] else '<'} SI {fin['si']:.3f} - {HEAD_TAU})")
        rows.append(Row(claim, pub, ours, v, key, "report.layers[*].si/csi/high_order_si"))
    return rows


def rows_c(results: Path) -> list[Row]:
    P = PUBLISHED["prune_quant_r50"]
    q = load(results, "quant")
    src = cites(P["source"])
    pub_drop = P["acc_base"] - P["acc_after"]
    diff = "ResNet-56 / CIFAR-10 (JPEG) instead of ResNet-50 / ImageNet; x86 int8 kernels on this CPU"
    rows = []
    d = (q or {}).get("d")
    claims = [("C. SI pruning + int8: size", f"{red(P['size_reduction'])} {src}"),
              ("C. SI pruning + int8: speed", f"{P['speedup']:.2f}x (+{100 * (P['speedup'] - 1):.0f}%) {src}"),
              ("C. SI pruning + int8: top-1",
               f"{P['acc_base']:.1f}% -> {P['acc_after']:.1f}% ({pts(-pub_drop)}) {src}")]
    if not d or "skipped" in d:
        why = (d or {}).get("skipped", "section d not in quant.json") if q else ""
        for claim, pub in claims:
            rows.append(Row(claim, pub, f"not measured yet: run `{QUANT_D}`" + (f" ({why})" if why else ""), "-",
                            "quant", cmd=QUANT_D))
    else:
        sz = d["size_reduction_vs_base"]
        g = 100 * (sz - P["size_reduction"])
        rows.append(Row(claims[0][0], claims[0][1],
                        f"{red(sz)} ({d['size_bytes']['base_fp32_state_dict'] / 1024:.0f} -> "
                        f"{d['size_bytes']['pruned_int8_packed'] / 1024:.0f} KiB packed)",
                        ("matched" if g >= -TOL["reduction_points"] else f"smaller reduction by {-g:.1f} pts")
                        + f" ({diff})", "quant", "d.size_reduction_vs_base, d.size_bytes"))
        sp = d["speedup_vs_base"]
        ok = sp["batch128"] >= P["speedup"]
        rows.append(Row(claims[1][0], claims[1][1],
                        f"{sp['batch1']:.2f}x (batch 1) / {sp['batch128']:.2f}x (batch 128) vs fp32 base",
                        ("matched or better" if ok else "slower than published") +
                        f" at batch 128 ({sp['batch128']:.2f}x vs {P['speedup']:.2f}x); batch 1 "
                        f"{sp['batch1']:.2f}x ({diff})", "quant", "d.speedup_vs_base"))
        drop = 100 * (d["acc_base_fp32"] - d["acc_pruned_int8"])
        gap = drop - pub_drop
        rows.append(Row(claims[2][0], claims[2][1],
                        f"{pct(d['acc_base_fp32'])} -> {pct(d['acc_pruned_fp32'])} SI-pruned -> "
                        f"{pct(d['acc_pruned_int8'])} + int8 ({pts(-drop)})",
                        ("matched" if gap <= TOL["acc_points"] else f"not matched: drops {gap:.2f} pts more") +
                        f" ({pts(-drop)} vs {pts(-pub_drop)}; {diff}; baseline {pct(d['acc_base_fp32'])})",
                        "quant", "d.acc_*"))
    a = (q or {}).get("a")
    claim = "C. reference point: int8 PTQ alone (no pruning), ResNet-56"
    pub = f"- ({SONG}'s number is for pruning + quantization)"
    if not a:
        rows.append(Row(claim, pub, missing("quant"), "-", "quant"))
    else:
        sz, sp = a["size_reduction_packed"], a["speedup"]
        drop = 100 * (a["acc_fp32"] - a["acc_int8"])
        rows.append(Row(claim, pub,
                        f"size {red(sz)}, speed {sp['batch1']:.2f}x (batch 1) / {sp['batch128']:.2f}x (batch 128), "
                        f"top-1 {pct(a['acc_fp32'])} -> {pct(a['acc_int8'])} ({pts(-drop)})",
                        f"against the combined claim: size {red(sz)} vs {red(P['size_reduction'])}, speed "
                        f"{sp['batch128']:.2f}x vs {P['speedup']:.2f}x at batch 128 but {sp['batch1']:.2f}x at batch 1 "
                        f"({'slower' if sp['batch1'] < 1 else 'faster'} than fp32), top-1 drop {drop:.2f} vs "
                        f"{pub_drop:.2f} pts; int8 only, no pruning ({diff})", "quant",
                        "a.size_reduction_packed, a.speedup, a.acc_*"))
    return rows


def rows_d(results: Path) -> list[Row]:
    q = load(results, "quant")
    c = (q or {}).get("c")
    pub = f"sparsity x bits grid, PTQ and QAT (values not transcribed here) {cites(PUBLISHED['percentile_grid']['source'])}"
    claim = "D. percentile pruning x uniform quantization: post-training"
    if not c:
        return [Row(claim, pub, missing("quant"), "-", "quant"),
                Row("D. percentile pruning x uniform quantization: after fine-tuning", pub, missing("quant"), "-",
                    "quant")]
    fp = c["acc_fp32"]
    rows_ = c["rows"]
    tol = TOL["within_fp32_points"]
    ok = [r for r in rows_ if 100 * (fp - r["acc_quant"]) <= tol]
    best = min(ok, key=lambda r: r["size_bytes"]) if ok else None
    worst = max(rows_, key=lambda r: r["sparsity_pct"])
    cells = "; ".join(f"{r['sparsity_pct']}%/{r['bits']}b {pct(r['acc_quant'], 1)} {r['size_bytes'] / 1024:.0f} KiB"
                      for r in rows_)
    ours = (f"{c['model']}, {c['test_images']:,} test images, fp32 {pct(fp)} "
            f"{c['fp32_state_dict_bytes'] / 1024:.0f} KiB: {cells}")
    v = ("measured (no published numbers transcribed to compare): " +
         (f"smallest within {tol:g} pt of fp32: {best['sparsity_pct']}% / {best['bits']} bit, "
          f"{best['size_bytes'] / 1024:.0f} KiB ({red(1 - best['size_vs_fp32'])})" if best else
          f"no cell within {tol:g} pt of fp32")
         + f"; at {worst['sparsity_pct']}% sparsity {pts(-100 * (fp - worst['acc_quant']))} ({c.get('pruning', '')}); "
           f"ResNet-20, a {c['test_images']:,}-image subset")
    out = [Row(claim, pub, ours, v, "quant", "c.rows[*]")]
    e = (q or {}).get("e")
    claim = "D. percentile pruning x uniform quantization: after fine-tuning"
    if not e or "rows" not in e:
        out.append(Row(claim, pub, missing("quant") + " (section e)", "-", "quant"))
    else:
        fp_e = e["acc_fp32"]
        cells = "; ".join(f"{r['sparsity_pct']}%/{r['bits']}b {pct(r['acc_quant'], 1)} {r['size_bytes'] / 1024:.0f} KiB"
                          for r in e["rows"])
        ok = [r for r in e["rows"] if 100 * (fp_e - r["acc_quant"]) <= tol]
        best = min(ok, key=lambda r: r["size_bytes"]) if ok else None
        dyn = e["dynamic"]
        steps = e["finetune"]["steps"]
        out.append(Row(claim, pub,
                       f"{e['model']}, {steps} SGD steps ({steps * 128 / 50000:.2f} epoch) per sparsity, masks held: "
                       f"{cells}; dynamic threshold accepted {dyn['percentile']:g}% at {pct(dyn['acc_fp32'])}, "
                       f"int8 {pct(dyn['int8']['acc_quant'])} {dyn['int8']['size_bytes'] / 1024:.0f} KiB",
                       "measured (no published numbers transcribed to compare): " +
                       (f"smallest within {tol:g} pt of fp32 after fine-tuning: {best['sparsity_pct']}% / "
                        f"{best['bits']} bit, {best['size_bytes'] / 1024:.0f} KiB ({red(1 - best['size_vs_fp32'])})"
                        if best else f"no cell within {tol:g} pt of fp32 after fine-tuning"),
                       "quant", "e.rows[*], e.dynamic"))
    return out


def rows_e(results: Path) -> list[Row]:
    P = PUBLISHED["pot4"]
    q = load(results, "quant")
    b = (q or {}).get("b")
    pub = ("4-bit: top-1 " + " / ".join(f"{v:+.2f}" for v in P["acc_change"].values()) + " pts ("
           + " / ".join(P["acc_change"]) + f") {cites(P['source'])}")
    rows = []
    if not b:
        rows.append(Row("E. 4-bit power-of-two weights: top-1", pub, missing("quant"), "-", "quant"))
    else:
        qt = b["qat"]
        ep = qt["epochs"] * qt["steps_per_epoch"] / qt["full_epoch_steps"]
        drop = 100 * (b["acc_fp32"] - b["acc_qat"])
        v = ("matched" if drop <= TOL["unchanged_points"] else f"not matched: {pts(-drop)} after QAT") + \
            f" (the published accuracy rose; read here as a loss <= {TOL['unchanged_points']} pts); PTQ alone " \
            f"{pts(-100 * (b['acc_fp32'] - b['acc_ptq']))}; QAT budget {ep:.2f} epoch ({qt['epochs']} x " \
            f"{qt['steps_per_epoch']}/{qt['full_epoch_steps']} steps); {b['model']}, 8-bit activations, first/last " \
            f"layers {b.get('first_last_bits', '?')} bit"
        rows.append(Row("E. 4-bit power-of-two weights: top-1", pub,
                        f"{pct(b['acc_fp32'])} fp32 -> {pct(b['acc_ptq'])} PTQ -> {pct(b['acc_qat'])} QAT", v, "quant",
                        "b.acc_fp32, b.acc_ptq, b.acc_qat, b.qat"))
        sa = b["shiftadd"]
        dd = 100 * (sa["acc_shiftadd"] - sa["acc_fakequant_same_images"])
        rows.append(Row("E. 4-bit power-of-two weights: run with shift-add kernels", pub,
                        f"{pct(sa['acc_shiftadd'])} on {sa['samples']} test images (fake-quant "
                        f"{pct(sa['acc_fakequant_same_images'])}, "
                        f"fp32 {pct(sa['acc_fp32_same_images'])} on the same images)",
                        f"{pts(dd)} vs fake-quant, "
                        f"{pts(100 * (sa['acc_shiftadd'] - sa['acc_fp32_same_images']))} vs fp32 "
                        f"on the same {sa['samples']} images; kernel bit-exact vs integer multiply: "
                        f"{'yes' if sa['kernel_check']['bit_exact'] else 'NO'}", "quant", "b.shiftadd"))
    F = PUBLISHED["pot4_fpga"]
    rows.append(Row("E. 4-bit shift-add on an FPGA", f"{F['layer']}: {red(F['time_reduction'])} inference time, "
                    f"{red(F['power_reduction'])} power, {red(F['dsp_reduction'])} DSPs {cites(F['source'])}",
                    "not measurable here (no FPGA); the CPU kernel's speed is the next row",
                    "not compared: different hardware", None))
    s = load(results, "shiftadd")
    claim = "E. shift-add kernel speed vs int8 and fp32"
    if not s:
        rows.append(Row(claim, "- (CPU: no published number)", missing("shiftadd"), "-", "shiftadd"))
        return rows
    parts, ratios_fp, ratios_mul, ratios_i8 = [], [], [], []
    for r in s["results"]:
        ms = r["median_ms"]
        sh = next((k for k in ms if k.startswith("shift_pot4")), None)
        fp = next((k for k in ms if "fp32" in k), None)
        i8 = next((k for k in ms if "int8" in k), None)
        mul = next((k for k in ms if k.startswith("multiply")), None)
        if not (sh and fp):
            continue
        ratios_fp.append(ms[sh] / ms[fp])
        if i8:
            ratios_i8.append(ms[sh] / ms[i8])
        if mul:
            ratios_mul.append(ms[sh] / ms[mul])
        parts.append(f"{r['name']}: shift {ms[sh]:.1f} ms, fp32 {ms[fp]:.2f} ms"
                     + (f", int8 {ms[i8]:.2f} ms" if i8 else ""))
    rng = lambda xs: f"{min(xs):.1f}-{max(xs):.1f}x" if len(xs) > 1 else f"{xs[0]:.1f}x"  # noqa: E731
    v = (f"shift-add {'slower' if min(ratios_fp) > 1 else 'faster'} than torch fp32 ({rng(ratios_fp)} its time)"
         + (f" and than int8 ({rng(ratios_i8)})" if ratios_i8 else "")
         + (f"; {rng(ratios_mul)} the time of the integer-multiply reference kernel" if ratios_mul else "")
         + f"; Numba kernels vs torch's convolutions, {s.get('threads', '?')} thread(s)"
         + ("; QUICK run" if s.get("quick") else "")) if ratios_fp else "no shift kernel timing in the JSON"
    rows.append(Row(claim, "- (CPU: no published number)", "; ".join(parts), v, "shiftadd",
                    "results[*].median_ms"))
    return rows


def rows_f(results: Path) -> list[Row]:
    d = load(results, "separability")
    pub = "published reference algorithm (n x n distance matrix) and scikit-learn: the baselines"
    if not d:
        return [Row("F. SI computation speed", pub, missing("separability"), "-", "separability")]
    rows = []
    cases = d.get("sections", {}).get("si", {}).get("cases", [])
    for other, label in (("reference", "published reference algorithm"), ("sklearn_brute", "scikit-learn brute force")):
        per_d, all_r = [], []
        for dd in sorted({c["d"] for c in cases}):
            ok = [c for c in cases if c["d"] == dd and c.get("ratios", {}).get(f"{other}/ours") is not None]
            all_r += [c["ratios"][f"{other}/ours"] for c in ok]
            if ok:
                c = max(ok, key=lambda c: c["n"])
                per_d.append(f"n={c['n']:,} d={dd}: {c['ratios'][f'{other}/ours']:.1f}x")
        if not per_d:
            rows.append(Row(f"F. first-order SI vs {label}", pub, missing("separability", f"no {other} timings"), "-",
                            "separability"))
            continue
        slow = [r for r in all_r if r < 1]
        v = (f"ours faster at every size" if not slow else
             f"ours slower at {len(slow)} of {len(all_r)} sizes (min {min(all_r):.1f}x)") + \
            f"; median of exact timings on this {d.get('machine', {}).get('cpus_usable', '?')}-core machine"
        rows.append(Row(f"F. first-order SI vs {label}", pub,
                        f"time {'reference' if other == 'reference' else 'sklearn'} / ours at the largest n per d: "
                        + ", ".join(per_d), v,
                        "separability", f"sections.si.cases[*].ratios.{other}/ours"))
    for a in d.get("acceptance", []):
        big = a["threshold"] >= 1e6  # a memory check, in bytes
        meas = f"{a['measured'] / 1e9:.2f} GB (threshold {a['threshold'] / 1e9:.2f} GB)" if big else \
            f"{a['measured']:.2f}x (threshold {a['threshold']:g}x)"
        rows.append(Row(f"F. {a['text']}", "- (target of our issue, not a published number)",
                        f"{meas}: {a.get('detail', '')}",
                        a["status"] + (" (QUICK run)" if a.get("quick_run") else ""), "separability",
                        f"acceptance[{a['check']}]"))
    return rows


def rows_g(results: Path) -> list[Row]:
    d = load(results, "vgg")
    pub = f"truncating a plain net after its SI peak {cites(SAFFAR)}"
    if not d or not d.get("truncation"):
        why = "" if d is None else "vgg.json has no truncation yet (run in progress?)"
        return [Row("G. plain VGG: cut after the SI peak", pub, missing("vgg", why), "-", "vgg")]
    t = d["truncation"]
    quick = " QUICK smoke run: not a result." if d.get("quick") else ""
    rows = [Row("G. plain VGG: cut after the SI peak", pub,
                f"{d.get('arch')}: max SI {t['max_si']:.3f} at `{t['peak_layer']}`, cut after `{t['truncate_after']}` "
                f"(SI {t['si_at_cut']:.3f}), {100 * t['macs_saved'] / max(t['total_macs'], 1):.1f}% of the MACs "
                "after it",
                ("the cut applies" if t.get("truncate_after") else "no cut: SI peaks at the end") + quick,
                "vgg", "truncation")]
    r = d.get("results", {})
    tr, po = r.get("si-truncate"), r.get("si-prune-only")
    if tr is None:
        rows.append(Row("G. plain VGG: truncate + prune vs prune only", pub, missing("vgg", "no results yet"), "-",
                        "vgg"))
        return rows
    st, a = last_stage(tr)
    ours = (f"truncate+prune {red(tr['macs_reduction'])} MACs: {pct(a)} {st}"
            + (f"; prune only {red(po['macs_reduction'])} MACs: {pct(last_stage(po)[1])} {last_stage(po)[0]}" if po else "")
            + f"; base {pct(d['base']['acc'])}")
    if po:
        st2, a2 = last_stage(po)
        dd = 100 * (a - a2)
        tol = TOL["acc_points"]
        verdict = ("helps" if dd > tol else "hurts" if dd < -tol
                   else f"makes no measurable difference (|difference| <= {tol:g} pts)")
        v = f"truncation {verdict}: {pts(dd)} vs pruning alone ({st} vs {st2})"
    else:
        v = "no prune-only comparison in the JSON"
    lat = tr.get("latency")
    if lat:
        v += f"; CPU speed-up {lat['batch1']['speedup']:.2f}x / {lat['batch128']['speedup']:.2f}x (batch 1 / 128)"
    rows.append(Row("G. plain VGG: truncate + prune vs prune only", pub, ours, v + quick, "vgg",
                    "results.si-truncate, results.si-prune-only"))
    return rows


def rows_h(results: Path) -> list[Row]:
    """The SI paper's other CIFAR-10 networks and ResNet-56 at its operating point (-58.3% FLOPs)."""
    rows = []
    c = load(results, "compress")
    P = PUBLISHED["si_r56"]
    target = (c or {}).get("settings", {}).get("target_macs")
    at_point = c is not None and target is not None and abs((1 - target) - P["flops_reduction"]) < 0.01
    pub = (f"{red(P['flops_reduction'])} FLOPs, {red(P['params_reduction'])} params, {P['acc_base']:.2f}% -> "
           f"{P['acc_after']:.2f}% {cites(P['source'])}")
    cmd = f"python benchmarks/bench_compress.py --target-macs {1 - P['flops_reduction']:.3f} --epochs 3"
    # the most-trained run at this point: with label-free reconstruction when it has an SI result, else re-fit only
    pkey = "compress_paper_recon"
    pp = load(results, pkey)
    if (pp or {}).get("results", {}).get("si") is None:
        pkey = "compress_paper"
        pp = load(results, pkey)
    si = (pp or {}).get("results", {}).get("si")
    if at_point:
        rows.append(Row("H. ResNet-56 at the published operating point", pub, "rows A above", "-", "compress", cmd=cmd))
    elif si is not None:
        rows.append(_row_paper_point(pp, pub, P, "H. ResNet-56 at the published operating point", pkey))
    else:
        rows.append(Row("H. ResNet-56 at the published operating point", pub,
                        missing("compress_paper", f"rows A are at {'-' if target is None else red(1 - target)} MACs"),
                        "-", None))
    for key, name in (("si_vgg16", "VGG-16"), ("si_googlenet", "GoogLeNet"), ("si_densenet40", "DenseNet-40 (k = 12)")):
        Q = PUBLISHED[key]
        acc = (f", {Q['acc_base']:.2f}% -> {Q['acc_after']:.2f}%" if Q.get("acc_base") is not None else
               f", {pts(Q['acc_change'])}" if Q.get("acc_change") is not None else "")
        claim = f"H. SI compression of {name}, CIFAR-10"
        pub_q = f"{red(Q['params_reduction'])} params, {red(Q['flops_reduction'])} FLOPs{acc} {cites(Q['source'])}"
        d = load(results, f"compress_{key[3:]}_paper")
        if d is not None and "si" in d.get("results", {}):
            rows.append(_row_paper_point(d, pub_q, Q, claim, f"compress_{key[3:]}_paper"))
        else:
            rows.append(Row(claim, pub_q, "not measured yet: needs a model trained by `benchmarks/train_cifar.py "
                            f"--arch {PAPER_NETS[key]}` (full width on a GPU; a narrower variant on a CPU, named in "
                            "the row), then `benchmarks/bench_compress.py --model ... --arch ...` at the published cut",
                            "-", None))
    return rows


def _row_paper_point(d: dict, pub: str, P: dict, claim: str, key: str) -> Row:
    """A network at Saffar et al.'s operating point (their params and FLOPs cut): SI against torch-pruning at
    the SI plan's MACs, from a bench_compress JSON."""
    base, res = d["base"]["acc"], d["results"]
    si = res["si"]
    stage, acc = last_stage(si)
    lat = si.get("latency", {})
    speed = " / ".join(f"{lat[b]['speedup']:.2f}x" + (" (noisy)" if lat[b].get("noisy") else "")
                       for b in ("batch1", "batch128") if b in lat)
    arch = d.get("settings", {}).get("arch")
    tr = d.get("train_record") or {}
    note = (f"`{arch}` trained here: {tr.get('epochs_done')} epochs on {tr.get('recipe', {}).get('train_images')} "
            f"JPEG train images, {(tr.get('seconds') or 0) / 60:.0f} min on {tr.get('device')}; ") if tr else \
        (f"`{arch}`; " if arch else "")
    ours = (note
            + f"{red(si['macs_reduction'])} MACs, {red(si['params_reduction'])} params; {pct(base)} -> {pct(acc)} "
            f"{stage} ({training_text(si, d.get('settings', {}))}; "
            f"{d['eval_samples']} test images)" + (f"; CPU speed-up {speed} (batch 1 / 128)" if speed else ""))
    others = [(k, v) for k, v in res.items() if k.startswith("tp-")]
    if others:
        ours += "; torch-pruning at the same MACs: " + ", ".join(
            f"{k[3:]} {pct(last_stage(v)[1])} ({red(v['params_reduction'])} params)" for k, v in others)
    off = [f"{what} {red(ours_r)} vs {red(P[k])}" for what, ours_r, k in
           (("params", si["params_reduction"], "params_reduction"), ("MACs", si["macs_reduction"], "flops_reduction"))
           if abs(ours_r - P[k]) * 100 > TOL["reduction_points"]]
    verdict = (f"reductions matched within {TOL['reduction_points']:.0f} pt" if not off else
               "reductions differ: " + ", ".join(off))
    drop = 100 * (base - acc)
    pub_drop = (P["acc_base"] - P["acc_after"] if P.get("acc_base") is not None else
                -P["acc_change"] if P.get("acc_change") is not None else None)
    if pub_drop is None:
        verdict += f"; accuracy {pts(-drop)} ({stage}; no published accuracy in our source)"
    elif drop - pub_drop > TOL["acc_points"]:
        verdict += (f"; accuracy not matched: {pts(-drop)} vs {pts(-pub_drop)} published ({stage}; our training "
                    f"budget: {training_text(si, d.get('settings', {}))})")
    else:
        verdict += "; accuracy matched"
    if others:
        best = max(last_stage(v)[1] for _, v in others)
        verdict += f"; SI {pts(100 * (acc - best))} vs the best torch-pruning importance"
    return Row(claim, pub, ours, verdict, key,
               "results.si.macs_reduction, .params_reduction, .acc_compensated, .latency; results.tp-*")


SECTIONS = (rows_a, rows_b, rows_c, rows_d, rows_e, rows_f, rows_g, rows_h)


def all_rows(results: Path) -> list[Row]:
    return [r for fn in SECTIONS for r in fn(results)]


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table(results: Path) -> str:
    cache = {}
    lines = ["Published numbers are constants in `benchmarks/report.py` with their source in brackets; every "
             "measured number is read from the JSON named in the row; verdicts are computed from both "
             f"(tolerances: accuracy {TOL['acc_points']} pts, reductions {TOL['reduction_points']} pt, "
             f"'essentially unchanged' <= {TOL['unchanged_points']} pts). Our baseline is the JPEG-fine-tuned "
             "model (`../shared/models/*-jpeg.th`, evaluated on the JPEG test split), not the published checkpoints.",
             "",
             "| claim | published | ours (measured) | gap / verdict | command | JSON |",
             "|---|---|---|---|---|---|"]
    for r in all_rows(results):
        if r.key is None:
            cmd, js = "-", "-"
        else:
            if r.key not in cache:
                cache[r.key] = load(results, r.key)
            cmd = r.cmd or command(r.key, cache[r.key])
            js = f"`{FILES[r.key]}`" + (f": `{r.fields}`" if r.fields and cache[r.key] is not None else "") \
                if cache[r.key] is not None else f"`{FILES[r.key]}` (missing)"
        lines.append("| " + " | ".join(_cell(x) for x in (r.claim, r.published, r.ours, r.verdict,
                                                          f"`{cmd}`" if cmd != "-" else "-", js)) + " |")
    lines += ["", "Sources:"] + [f"- [{k}] {v}" for k, v in REFERENCES.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", action="store_true", help="print the summary table (the default)")
    p.add_argument("--results", default=None, help="folder of the result JSON files "
                                                   "(default $SI_COMPRESS_RESULTS or benchmarks/results)")
    p.add_argument("--command", choices=sorted(FILES), help="print the command that produced this result")
    args = p.parse_args(argv)
    results = results_dir(args.results)
    if args.command:
        d = load(results, args.command)
        print(f"Command: `{command(args.command, d)}`" + ("" if d is not None else " (not run yet)"))
        return 0
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
