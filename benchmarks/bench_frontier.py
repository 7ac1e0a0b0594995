"""Accuracy against measured speed, every compressed model of several bench_compress runs timed in one run.

"At equal accuracy, which model is faster?" needs models from different cuts (torch-pruning at a shallower
cut may match the SI model's accuracy). Each run's models are rebuilt from their recorded widths
(``bench_compress.rebuilt_models``), then all of them and the base go through one interleaved timing
(``si_compress.latency.compare_models``) per batch size. The runs must share the base model and the training
that produced each accuracy (compensation, reconstruction budget, fine-tuning), or they are not comparable.

A model is *dominated* at a batch size when another model is at least as accurate and at least as fast there,
and better in one of the two. For each model the table names the models that dominate it, per batch size.

  python benchmarks/bench_frontier.py                    # the three ResNet-56 reconstruction runs
  python benchmarks/bench_frontier.py --table            # print the table from the JSON
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _harness import machine_info, write_json_atomic  # noqa: E402
from bench_compress import fine_tuning, log, rebuilt_models  # noqa: E402
from report import last_stage  # noqa: E402

RESULTS = HERE / "results"
DEFAULT_RUNS = ("compress_resnet56_recon50k.json", "compress_resnet56_paper_recon.json",
                "compress_resnet56_deep70_recon.json", "compress_resnet56_streams_recon.json")
DEFAULT_OUT = RESULTS / "frontier_resnet56_recon.json"
# what made each accuracy: runs that differ here are not compared
SAME = ("model", "arch", "compensation", "reconstruct_steps", "reconstruct_images", "reconstruct_lr",
        "reconstruct_bn", "teacher", "epochs", "max_steps", "lr", "eval_samples")
RECON_SAME = ("targets", "bn", "steps", "images", "batch", "lr", "temperature", "labels_used")


def _setting(d: dict, k: str):
    """A run's setting ``k`` as it shaped the accuracies (fine-tuning settings of a run that fine-tuned
    nothing count as none)."""
    if k == "eval_samples":
        return d.get("eval_samples")
    ft = fine_tuning(d)
    return ft[k] if k in ft else d["settings"].get(k)


def check_comparable(runs: dict[str, dict]) -> None:
    """SystemExit naming the first setting (or reconstruction record) in which the runs differ."""
    names = list(runs)
    first = runs[names[0]]
    for name in names[1:]:
        d = runs[name]
        for k in SAME:
            a, b = (_setting(first, k), _setting(d, k))
            if a != b:
                raise SystemExit(f"{name}: {k} = {b!r} but {names[0]} has {a!r}; the accuracies were made "
                                 "differently, compare runs with the same training")
    recs = {(n, meth): {k: m["reconstruct"].get(k) for k in RECON_SAME}
            for n, d in runs.items() for meth, m in d["results"].items() if m.get("reconstruct")}
    if recs:
        (n0, m0), r0 = next(iter(recs.items()))
        for (n, meth), r in recs.items():
            diff = [k for k in RECON_SAME if r[k] != r0[k]]
            if diff:
                raise SystemExit(f"{n} {meth}: its reconstruction ran with other {', '.join(diff)} than {n0} {m0} "
                                 "(a time budget that cut it short?); compare runs with the same reconstruction")


def dominated_by(points: dict[str, tuple[float, float]]) -> dict[str, list[str]]:
    """name -> the names that dominate it: at least as accurate and at least as fast, better in one.

    ``points``: name -> (accuracy, speed-up); larger is better in both."""
    out = {}
    for n, (a, s) in points.items():
        out[n] = sorted(o for o, (ao, so) in points.items()
                        if o != n and ao >= a and so >= s and (ao > a or so > s))
    return out


def measure(args) -> dict:
    from si_compress.latency import compare_models

    runs = {}
    for f in args.runs:
        p = f if f.is_file() else RESULTS / f
        if not p.is_file():
            raise SystemExit(f"{f}: no such result; run its bench_compress command first (README names it)")
        runs[p.name] = json.loads(p.read_text())
    check_comparable(runs)
    models, rows = {}, {}
    for i, (fname, d) in enumerate(runs.items()):
        built = rebuilt_models(d)
        if i == 0:
            models["base"] = built["base"]
            base_acc = d["base"]["acc"]
        for meth, m in d["results"].items():
            key = f"{meth} @ {-100 * m['macs_reduction']:.1f}% MACs"
            models[key] = built[meth]
            rows[key] = dict(run=fname, method=meth, macs_reduction=m["macs_reduction"],
                             params_reduction=m["params_reduction"], acc=last_stage(m)[1])
        log(f"{fname}: {len(d['results'])} models rebuilt")
    timing = {}
    for b in (1, 128):
        t = compare_models(models, b, (3, 32, 32), repeats=args.repeats)
        tb = t["models"]["base"]["median_s"]
        for key, r in rows.items():
            tc = t["models"][key]
            r[f"batch{b}"] = dict(median_s=tc["median_s"], spread=tc["spread"], speedup=tb / tc["median_s"])
        timing[f"batch{b}"] = dict(base_s=tb, base_spread=t["models"]["base"]["spread"], noisy=t["noisy"],
                                   retried=t["retried"], repeats=t["repeats"], threads=t["threads"])
        log(f"batch {b}: " + ", ".join(f"{k} {tb / v['median_s']:.2f}x" for k, v in t["models"].items()
                                       if k != "base") + (" (NOISY)" if t["noisy"] else ""))
    for b in (1, 128):
        dom = dominated_by({k: (r["acc"], r[f"batch{b}"]["speedup"]) for k, r in rows.items()})
        for k, r in rows.items():
            r[f"batch{b}"]["dominated_by"] = dom[k]
    first = next(iter(runs.values()))
    return dict(benchmark="frontier", runs=list(runs), settings={k: _setting(first, k) for k in SAME[:-1]},
                eval_samples=first.get("eval_samples"), base=dict(model=first["settings"]["model"], acc=base_acc),
                timing=timing, rows=rows, machine=machine_info())


def table(path: Path) -> str:
    d = json.loads(path.read_text())
    s, t = d["settings"], d["timing"]
    steps = s.get("reconstruct_steps")
    lines = [f"Base {d['base']['model']}: {100 * d['base']['acc']:.2f}% top-1 on {d['eval_samples']} test JPEGs. "
             f"Every model: {s['compensation']}"
             + (f", {steps} reconstruction steps on {s['reconstruct_images']:,} unlabelled train images" if
                "reconstruct" in str(s["compensation"]) else "")
             + f", {s['epochs']} fine-tuning epoch(s). From: " + ", ".join(f"`{r}`" for r in d["runs"]) + ".", "",
             "| model | MACs | params | top-1 | CPU speed-up b1 | b128 | dominated at b1 by | dominated at b128 by |",
             "|---|---|---|---|---|---|---|---|"]
    for k, r in sorted(d["rows"].items(), key=lambda kv: -kv[1]["acc"]):
        dom = [", ".join(r[b]["dominated_by"]) or "none" for b in ("batch1", "batch128")]
        lines.append(f"| {k} | {-100 * r['macs_reduction']:.1f}% | {-100 * r['params_reduction']:.1f}% | "
                     f"{100 * r['acc']:.2f}% | {r['batch1']['speedup']:.2f}x | {r['batch128']['speedup']:.2f}x | "
                     f"{dom[0]} | {dom[1]} |")
    noisy = [b for b in ("batch1", "batch128") if t[b]["noisy"]]
    lines += ["", f"Speed-up: base latency / model latency (medians), eager PyTorch on the CPU, {t['batch128']['threads']} "
              f"threads; the base and all {len(d['rows'])} models timed in turn in the same {t['batch128']['repeats']} "
              "rounds, one run."
              + (f" NOISY at {' and '.join(noisy)}: interquartile spread above 10%, do not rank by it." if noisy else
                 " Interquartile spread below 10% at both batch sizes")
              + " (largest spread of a model: " + ", ".join(
                  f"{100 * max(r[b]['spread'] for r in d['rows'].values()):.1f}% at {b.replace('batch', 'b')}"
                  for b in ("batch1", "batch128")) + "; speed-ups closer than that are ties). Dominated: another "
              "model is at least as accurate and at least as fast there, and better in one."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, default=[Path(f) for f in DEFAULT_RUNS],
                   help="bench_compress JSONs (in benchmarks/results or paths) made with the same training")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except SystemExit as e:
        if isinstance(e.code, str):  # a message for the user: one line, exit code 2
            print(f"bench_frontier: {e.code}", file=sys.stderr)
            return 2
        raise


def _run(args) -> int:
    if args.table:
        if not args.out.is_file():
            raise SystemExit(f"{args.out}: not measured yet; run python benchmarks/bench_frontier.py")
        print(table(args.out))
        return 0
    d = measure(args)
    write_json_atomic(args.out, d)
    log(f"wrote {args.out}")
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
