"""si-analyze on a real model: wall time, peak RSS, and per-layer SI checked against the oracle.

Default: the JPEG-fine-tuned ResNet-56 on 5,000 class-balanced JPEG test images (the issue's
acceptance case). Runs the real CLI in a child process under /usr/bin/time-like accounting
(wall clock and peak RSS of the child), then recomputes the SI of three layers (first, middle,
last) from freshly captured features with the plain numpy brute force and checks equality.
Writes benchmarks/results/analyze_<model stem>.json (the CLI's report.json is embedded) and the
figures are regenerated from it by figures/make_figures.py.

  python benchmarks/bench_analyze.py [--model resnet56-cifar10-jpeg.th] [--samples 5000]
  python benchmarks/bench_analyze.py --model resnet20-cifar10-jpeg.th
  python benchmarks/bench_analyze.py --table [--model M]            # summary row(s): every JSON, or M's
  python benchmarks/bench_analyze.py --table --detail --model M     # per-layer SI / CSI / high-order SI and
                                                                    # how the compression plan follows from them
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _harness import SHARED, machine_info, write_json_atomic  # noqa: E402



DEFAULT_MODEL = "resnet56-cifar10-jpeg.th"
# the planner's defaults (si_compress.planning.PlannerConfig / choose_truncation), used to explain a plan
# when no compress JSON for the architecture records its own settings
HEAD_TAU = 0.02        # linear head when the final features' CSI >= SI - HEAD_TAU
DROP_GAIN = 0.0        # a block whose SI gain is <= DROP_GAIN is dropped outright
TRUNCATE_TOL = 0.01    # plain chains are cut after the first layer within this of the maximum SI


def model_stem(model: str) -> str:
    """File stem of a checkpoint name: resnet20-cifar10-jpeg.th -> resnet20-cifar10-jpeg."""
    return Path(model).name.replace(".th", "")


def result_path(model: str, results: Path | None = None) -> Path:
    return (results or HERE / "results") / f"analyze_{model_stem(model)}.json"


def layer_facts(report: dict) -> dict:
    """Facts about the per-layer curves of an analysis report (dict form), computed, not judged.

    block_gains: [(block, si_in, si_out, gain)] for every recorded block output (a record without
    ':' in its name), the input SI being the previous record's (as the planner's ``block_si``);
    peak: (index, name, si) of the maximum SI; first_within_tol: the first layer whose SI is within
    TRUNCATE_TOL of that maximum (where a plain chain would be cut) and the share of the MACs after it;
    head: the head rule on the final record (linear if CSI >= SI - HEAD_TAU).
    """
    layers = report["layers"]
    names = [r["name"] for r in layers]
    si = [float(r["si"]) for r in layers]
    gains = [(names[i], si[i - 1], si[i], si[i] - si[i - 1]) for i in range(1, len(layers)) if ":" not in names[i]]
    # blocks whose input and output records were pooled differently (--max-dim): not a like-for-like gain
    unlike = {names[i] for i in range(1, len(layers)) if ":" not in names[i]
              and layers[i].get("reduction") != layers[i - 1].get("reduction")}
    ipk = max(range(len(si)), key=lambda i: (si[i], -i))
    icut = next(i for i in range(len(si)) if si[i] >= si[ipk] - TRUNCATE_TOL)
    total = float(report.get("total_macs") or layers[-1]["macs"] or 1)
    last = layers[-1]
    rises = sum(1 for i in range(1, len(si)) if si[i] > si[i - 1])
    return {"n_layers": len(layers), "names": names, "block_gains": gains, "unlike_pooling": unlike, "rises": rises,
            "peak": (ipk, names[ipk], si[ipk]), "first_within_tol": (icut, names[icut], si[icut]),
            "macs_after_cut": max(0.0, 1 - float(layers[icut]["macs"]) / total),
            "final": {"name": last["name"], "si": float(last["si"]), "csi": float(last["csi"]),
                      "high_order_si": last.get("high_order_si")},
            "head_linear": float(last["csi"]) >= float(last["si"]) - HEAD_TAU}


def _compress_json(model: str, results: Path) -> tuple[Path, dict | None]:
    path = results / f"compress_{Path(model).name.split('-')[0]}.json"
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError):
        return path, None


def plan_paragraph(d: dict, results: Path | None = None) -> str:
    """How the SI plan follows from the curves: a paragraph computed from the analysis JSON and, when
    present, the bench_compress JSON of the same architecture (its plan measures SI on its own sample)."""
    results = results or HERE / "results"
    rep = d["report"]
    f = layer_facts(rep)
    n = rep.get("n_samples", d.get("samples"))
    split = rep.get("data", {}).get("split", "test")
    g = sorted(f["block_gains"], key=lambda t: t[3])
    non_pos = [b for b, _, _, gain in g if gain <= DROP_GAIN]
    unlike = f["unlike_pooling"]
    fmt = lambda t: f"`{t[0]}` {t[3]:+.3f}" + ("*" if t[0] in unlike else "")  # noqa: E731
    out = [f"**How the plan follows from the curves** (computed from `{result_path(d['model'], results).name}`, "
           f"{n:,} {split} images):"]
    if g:
        out.append(f"- Block SI gains (block output SI minus the SI before it), smallest first: "
                   f"{', '.join(fmt(t) for t in g[:4])}; largest: {', '.join(fmt(t) for t in g[::-1][:3])}. "
                   f"{len(non_pos)} of {len(g)} blocks do not raise SI"
                   + (f" ({', '.join(f'`{b}`' for b in non_pos)}): the planner drops such a block outright "
                      f"(gain <= drop_gain {DROP_GAIN}) when its own sample agrees." if non_pos else ".")
                   + " The MACs budget is then spent where the SI lost per MAC saved is smallest, weighted by "
                     "these gains: low-gain blocks lose filters (or the whole block) first."
                   + (f" *: the block's input and output maps were pooled differently to fit --max-dim "
                      f"({', '.join(f'`{b}`' for b in sorted(unlike))}), so that gain is not like-for-like."
                      if unlike & {t[0] for t in g[:4] + g[::-1][:3]} else ""))
    ipk, pk, si_pk = f["peak"]
    icut, cut, si_cut = f["first_within_tol"]
    tail = "the last layer" if ipk == f["n_layers"] - 1 else f"layer {ipk + 1} of {f['n_layers']}"
    out.append(f"- SI peak: {si_pk:.3f} at `{pk}` ({tail}); the first layer within {TRUNCATE_TOL} of it is `{cut}` "
               f"({100 * f['macs_after_cut']:.1f}% of the MACs after it). "
               + ("Nothing to cut: separation still rises to the end. " if f["macs_after_cut"] < 0.005 else
                  "A plain chain would be cut there; ")
               + ("ResNets are not truncated (only plain chains are; see G)."
                  if str(rep.get("model", {}).get("arch", "")).startswith("resnet") else ""))
    fin = f["final"]
    out.append(f"- Head: final-layer (`{fin['name']}`) CSI {fin['csi']:.3f} "
               f"{'>=' if f['head_linear'] else '<'} SI {fin['si']:.3f} - {HEAD_TAU} -> "
               + ("a linear head (class means already separate as well as neighbours do)." if f["head_linear"]
                  else "an MLP head sized from hidden-layer CSI."))
    cpath, c = _compress_json(d["model"], results)
    plan = (c or {}).get("plan")
    if plan and plan.get("arch") == rep.get("model", {}).get("arch"):
        blocks = plan.get("blocks", [])
        pg = sorted(blocks, key=lambda b: b["si_out"] - b["si_in"])
        widths: dict[str, list[int]] = {}
        for lay in plan.get("layers", []):
            stage = lay["name"].split(".")[0]
            w = widths.setdefault(stage, [0, 0])
            w[0] += len(lay["keep"])
            w[1] += lay["out_channels"]
        head = plan.get("head") or {}
        st = plan.get("settings", {})
        smallest = ", ".join(f"`{b['name']}` {b['si_out'] - b['si_in']:+.3f}" for b in pg[:3])
        ns = c.get("settings", {}).get("si_samples")
        out.append(f"- The executed plan (`{cpath.name}`, SI on {f'{ns:,}' if ns else '?'} "
                   f"class-balanced train images, MACs target {st.get('target_macs')}): smallest gains there "
                   f"{smallest}; "
                   f"{sum(1 for b in blocks if b['si_out'] - b['si_in'] <= st.get('drop_gain', DROP_GAIN))} "
                   f"with gain <= {st.get('drop_gain', DROP_GAIN)}; dropped: "
                   f"{', '.join(f'`{b}`' for b in plan.get('dropped_blocks', [])) or 'none'}; "
                   "inner filters kept per stage: "
                   + ", ".join(f"{s} {k}/{t} ({100 * k / max(t, 1):.0f}%)" for s, (k, t) in widths.items())
                   + (f"; head: {head.get('kind')} ({head.get('reason')})." if head else "."))
    else:
        out.append(f"- No compress run of this architecture yet (`{cpath.name}`): "
                   f"`python benchmarks/bench_compress.py --model {d['model']}` executes the plan.")
    return "\n".join(out)


def detail_table(d: dict, results: Path | None = None) -> str:
    rep = d["report"]
    f = layer_facts(rep)
    order = rep.get("settings", {}).get("order", 3)
    gain = {b: gn for b, _, _, gn in f["block_gains"]}
    lines = [f"{rep['model'].get('arch', d['model'])} (`{d['model']}`), {rep.get('n_samples', d['samples']):,} "
             f"class-balanced {rep.get('data', {}).get('split', 'test')} images, top-1 on them "
             f"{100 * rep['accuracy']:.2f}%. SI{order}: high-order SI of order {order}; gain: block output SI minus "
             "the SI before the block (*: the two maps pooled differently to fit --max-dim).", "",
             f"| # | layer | dim | pooled | SI | CSI | SI{order} | soft SI | gain | MACs up to here |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rep["layers"]):
        gs = f"{gain[r['name']]:+.3f}" if r["name"] in gain else ""
        gs += "*" if gs and r["name"] in f["unlike_pooling"] else ""
        ho = "" if r.get("high_order_si") is None else f"{r['high_order_si']:.3f}"
        so = "" if r.get("soft_si") is None else f"{r['soft_si']:.3f}"
        lines.append(f"| {i} | `{r['name']}` | {r['dim']} | {r.get('reduction') or 'none'} | {r['si']:.3f} | "
                     f"{r['csi']:.3f} | {ho} | {so} | {gs} | {r['macs'] / 1e6:.1f} M |")
    lines += ["", plan_paragraph(d, results)]
    return "\n".join(lines)


def table(path: Path) -> str:
    d = json.loads(path.read_text())
    rep = d["report"]
    last = rep["layers"][-1]
    checks = ", ".join(f"{c['layer']} ({c['dim']} dims): {c['cli_si']:.4f} vs oracle {c['oracle_si']:.4f} "
                       f"{'equal' if c['equal'] else 'DIFFERENT'}" for c in d["oracle_checks"])
    return "\n".join([
        "| model | samples | layers | wall time | peak RSS | final-layer SI / CSI | top-1 on the sample |",
        "|---|---:|---:|---:|---:|---|---:|",
        f"| {d['model']} | {d['samples']} | {len(rep['layers'])} | {d['wall_seconds']:.0f} s | "
        f"{d['peak_rss_bytes'] / 2**30:.2f} GiB | {last['si']:.3f} / {last['csi']:.3f} | {100 * rep['accuracy']:.2f}% |",
        "", f"Oracle check (plain numpy brute force on freshly captured features): {checks}.",
        f"Command: `si-analyze ../shared/models/{d['model']} --data ../shared/data/cifar10-jpeg --samples "
        f"{d['samples']}` (run by `python benchmarks/bench_analyze.py"
        f"{'' if d['model'] == DEFAULT_MODEL else ' --model ' + d['model']}`, which also does the oracle check).",
    ])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=f"checkpoint in ../shared/models (default {DEFAULT_MODEL}; "
                                                 "with --table: every analyze_*.json)")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--oracle-layers", type=int, default=2, help="2: first and last layer; 3: also the middle one")
    p.add_argument("--table", action="store_true", help="print the markdown table(s) from the JSON and exit")
    p.add_argument("--detail", action="store_true",
                   help="with --table: per-layer SI / CSI / high-order SI and how the plan follows from them")
    p.add_argument("--results", type=Path, default=HERE / "results", help="folder of the result JSON files")
    args = p.parse_args(argv)
    if args.table:
        files = [result_path(args.model, args.results)] if args.model else \
            sorted(args.results.glob("analyze_*.json"))
        missing = [f for f in files if not f.exists()]
        if missing or not files:
            sys.exit(f"not measured yet: {', '.join(str(f) for f in missing) or 'no analyze_*.json'}; run "
                     f"`python benchmarks/bench_analyze.py --model {args.model or DEFAULT_MODEL}`")
        out = []
        for f in files:
            d = json.loads(f.read_text())
            out.append(detail_table(d, args.results) if args.detail else table(f))
        print("\n\n".join(out))
        return
    args.model = args.model or DEFAULT_MODEL
    ckpt = SHARED / "models" / args.model
    data = SHARED / "data" / "cifar10-jpeg"
    stem = model_stem(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "si_compress.cli.analyze", str(ckpt), "--data", str(data), "--samples",
               str(args.samples), "--out", tmp, "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if proc.returncode:
            sys.exit(f"si-analyze failed: {proc.stderr.strip()}")
        report = json.loads((Path(tmp) / "report.json").read_text())
    print(proc.stdout)
    print(f"wall {wall:.1f} s, peak RSS {child_rss / 2**20:.0f} MiB")

    # oracle check on freshly captured features of a few layers
    import numpy as np

    from si_compress.data import balanced_indices, load_dataset, make_loader
    from si_compress.features import collect_features
    from si_compress.models import load_model
    from si_compress.separability import separation_index

    names = [r["name"] for r in report["layers"]]
    picks = sorted({0, len(names) // 2, len(names) - 1}) if args.oracle_layers >= 3 else [0, len(names) - 1]
    model = load_model(ckpt).model
    info = load_dataset(data, split="test")
    idx = balanced_indices(info.labels, args.samples, seed=0)
    fs = collect_features(model, make_loader(info, idx, batch_size=250), [names[i] for i in picks],
                          max_dim=report["settings"]["max_dim"])
    checks = []
    for i in picks:
        t0 = time.perf_counter()
        oracle = separation_index(fs.features[names[i]], fs.labels, backend="numpy")
        checks.append({"layer": names[i], "dim": int(fs.features[names[i]].shape[1]), "cli_si": report["layers"][i]["si"],
                       "oracle_si": oracle, "equal": oracle == report["layers"][i]["si"],
                       "oracle_seconds": time.perf_counter() - t0})
        print(checks[-1])
    out = HERE / "results" / f"analyze_{stem}.json"
    write_json_atomic(out, {"benchmark": "analyze", "command": " ".join(cmd[1:]).replace(str(SHARED), "../shared"),
                            "model": args.model, "samples": args.samples, "wall_seconds": wall,
                            "peak_rss_bytes": child_rss, "oracle_checks": checks, "stdout": proc.stdout,
                            "machine": machine_info(), "report": report})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
