"""si-analyze on a real model: wall time, peak RSS, and per-layer SI checked against the oracle.

Default: the JPEG-fine-tuned ResNet-56 on 5,000 class-balanced JPEG test images (the issue's
acceptance case). Runs the real CLI in a child process under /usr/bin/time-like accounting
(wall clock and peak RSS of the child), then recomputes the SI of three layers (first, middle,
last) from freshly captured features with the plain numpy brute force and checks equality.
Writes benchmarks/results/analyze_<model>.json (the CLI's report.json is embedded) and the
figures are regenerated from it by figures/make_figures.py.

  python benchmarks/bench_analyze.py [--model resnet56-cifar10-jpeg.th] [--samples 5000]
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
        f"{d['samples']}` (run by `python benchmarks/bench_analyze.py`, which also does the oracle check).",
    ])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--table" in argv:
        for f in sorted((HERE / "results").glob("analyze_*.json")):
            print(table(f))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56-cifar10-jpeg.th")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--oracle-layers", type=int, default=2, help="2: first and last layer; 3: also the middle one")
    args = p.parse_args(argv)
    ckpt = SHARED / "models" / args.model
    data = SHARED / "data" / "cifar10-jpeg"
    stem = Path(args.model).name.replace(".th", "")
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
