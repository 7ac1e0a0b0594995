"""Exact SI out of one process: a Dask LocalCluster against one process, and the torch screen.

Sections:
  dask    first-order SI of n x d CNN-like features (bench_separability's generator) read from
          ``.npy`` shards on disk: one process (``separation_index`` on the in-memory array, backend
          auto) against a ``distributed.LocalCluster`` of ``--workers`` worker processes with one
          thread each (``separation_index`` on ``open_feature_shards``: block-pair tasks). Wall time
          (median of ``--repeats`` runs after a warm-up), peak extra memory per worker (VmHWM over
          the RSS before the run, read in each worker) and of the single process (in a fresh
          interpreter, see _harness.py), and whether the neighbours are identical.
  torch   the torch screen backend against the default backend at a few sizes: wall time ratio
          and equality; on a CPU this measures the code path, on a GPU the device.
  gpu     (a CUDA machine only) first-order SI with ``backend="torch"`` at n = 100,000 and
          1,000,000, d = 2,048: wall time, peak GPU memory, and equality of the neighbours of
          ``--check-rows`` random samples with the CPU search (numba backend, same rows as queries).

A 2-core machine cannot make a 2-worker cluster faster than one process that already uses both
cores: the cluster's figure here is its overhead and its bounded memory per worker, not a speed-up.

Usage:
  python benchmarks/bench_cluster.py                     # n = 200,000, d = 1,024 (long)
  python benchmarks/bench_cluster.py --n 50000 --d 1024  # what fits a session
  python benchmarks/bench_cluster.py --table
Writes benchmarks/results/cluster.json (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _harness import fmt_bytes, fmt_s, machine_info, peak_extra_memory, write_json_atomic  # noqa: E402
from bench_separability import make_features  # noqa: E402

DEFAULT_OUT = HERE / "results" / "cluster.json"


def _reset_hwm() -> int:
    """Worker side: reset the high-water mark; returns the RSS now (bytes)."""
    import _harness

    _harness._reset_hwm()
    return _harness._status_kib("VmRSS") * 1024


def _hwm() -> int:
    import _harness

    return _harness._status_kib("VmHWM") * 1024


def prepare_single(n: int, d: int, seed: int = 0):
    """For the fresh-interpreter memory probe: the one-process SI call, warmed up."""
    from si_compress.separability import separation_index

    X, y = make_features(n, d, seed)
    separation_index(X[:2000], y[:2000])
    return lambda: separation_index(X, y)


def run_dask(args) -> dict:
    import distributed

    from si_compress.separability import nearest_neighbors, separation_index
    from si_compress.separability.cluster import open_feature_shards, save_feature_shards

    n, d = args.n, args.d
    X, y = make_features(n, d, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="si_shards_", dir=args.scratch))
    try:
        save_feature_shards(X, tmp, rows_per_shard=args.block_rows)
        # one process
        separation_index(X[:2000], y[:2000])
        single_t, single_si = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            single_si = separation_index(X, y)
            single_t.append(time.perf_counter() - t)
        nbr_single = nearest_neighbors(X, 1)
        single_mem = peak_extra_memory(__file__, "prepare_single", dict(n=n, d=d, seed=args.seed))
        # the cluster
        cluster = distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                           memory_limit=f"{args.worker_memory_gib}GiB", dashboard_address=None)
        client = distributed.Client(cluster)
        try:
            Xd = open_feature_shards(tmp)
            small = open_feature_shards(tmp)[:2000]
            separation_index(small, y[:2000])                          # warm-up: imports, JIT caches
            dask_t, dask_si, peaks = [], None, []
            for _ in range(args.repeats):
                base = client.run(_reset_hwm)
                t = time.perf_counter()
                dask_si = separation_index(Xd, y)
                dask_t.append(time.perf_counter() - t)
                hwm = client.run(_hwm)
                peaks.append({w: hwm[w] - base[w] for w in base})
            nbr_dask = nearest_neighbors(Xd, 1)
        finally:
            client.close()
            cluster.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_worker = [max(p.values()) for p in peaks]
    return dict(n=n, d=d, workers=args.workers, block_rows=args.block_rows, repeats=args.repeats,
                single=dict(times_s=single_t, median_s=float(np.median(single_t)), si=single_si,
                            peak_extra_bytes=single_mem.get("peak_extra_bytes")),
                dask=dict(times_s=dask_t, median_s=float(np.median(dask_t)), si=dask_si,
                          peak_worker_extra_bytes=per_worker, max_worker_extra_bytes=int(max(per_worker))),
                identical_neighbors=bool(np.array_equal(nbr_single, nbr_dask)),
                data_bytes=int(X.nbytes))


def run_torch(args) -> dict:
    import torch

    from si_compress.separability._knn import knn

    rows = []
    for n, d in ((5000, 64), (5000, 1024), (10000, 1024)):
        X, _ = make_features(n, d, args.seed)
        knn(X[:500], 1)
        knn(X[:500], 1, backend="torch")
        t_auto, t_torch = [], []
        for _ in range(args.repeats):          # interleaved: a busy spell hits both
            t = time.perf_counter()
            a = knn(X, 1)
            t_auto.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = knn(X, 1, backend="torch")
            t_torch.append(time.perf_counter() - t)
        rows.append(dict(n=n, d=d, auto_s=t_auto, torch_s=t_torch,
                         ratio=float(np.median(t_torch) / np.median(t_auto)), identical=bool(np.array_equal(a, b))))
    return dict(device="cuda" if torch.cuda.is_available() else "cpu",
                cpu_capability=torch.backends.cpu.get_cpu_capability(), rows=rows)


def run_gpu(args) -> dict:
    import torch

    from si_compress.separability import separation_index
    from si_compress.separability._knn import knn

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    rows = []
    for n in args.gpu_n:
        X, y = make_features(n, args.gpu_d, args.seed)
        knn(X[:4096], 1, backend="torch")                     # warm-up: CUDA context, kernels
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        si = separation_index(X, y, backend="torch")
        secs = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated()
        nbr = knn(X, 1, backend="torch")
        rng = np.random.default_rng(args.seed)
        sub = np.sort(rng.choice(n, args.check_rows, replace=False))
        # the CPU search with the sampled rows as queries: k = 2, dropping each row's own index
        cpu = knn(X, 2, query=X[sub], backend="numba")
        own = cpu == sub[:, None]
        cpu1 = np.where(own[:, :1], cpu[:, 1:2], cpu[:, :1])[:, 0]
        rows.append(dict(n=n, d=args.gpu_d, seconds=secs, si=si, peak_gpu_bytes=int(peak),
                         checked_rows=int(sub.size), equal_to_cpu=bool(np.array_equal(nbr[sub, 0], cpu1))))
        log_line = f"gpu n={n:,}: {secs:.1f} s, peak {peak / 2**30:.2f} GiB, equal: {rows[-1]['equal_to_cpu']}"
        print(log_line, flush=True)
        del X
    return dict(device=torch.cuda.get_device_name(), rows=rows)


def table(path: Path) -> str:
    if not path.exists():
        return "_Not measured yet: run `python benchmarks/bench_cluster.py`._"
    r = json.loads(path.read_text())
    out = []
    if "dask" in r:
        k = r["dask"]
        s, c = k["single"], k["dask"]
        spread = lambda t: f"{fmt_s(min(t))}-{fmt_s(max(t))}"  # noqa: E731
        out += [f"n = {k['n']:,}, d = {k['d']:,} float32 ({fmt_bytes(k['data_bytes'])}), "
                f"blocks of {k['block_rows']:,} rows, {k['repeats']} runs each; "
                f"neighbours identical: {'yes' if k['identical_neighbors'] else '**no**'}.", "",
                "| run | median time (range) | peak extra memory | SI |", "|---|---|---|---|",
                f"| one process | {fmt_s(s['median_s'])} ({spread(s['times_s'])}) | "
                f"{fmt_bytes(s['peak_extra_bytes'])} | {s['si']:.4f} |",
                f"| LocalCluster, {k['workers']} workers x 1 thread | {fmt_s(c['median_s'])} ({spread(c['times_s'])}) | "
                f"{fmt_bytes(c['max_worker_extra_bytes'])} per worker (max) | {c['si']:.4f} |",
                "", f"Cluster / one process: {c['median_s'] / s['median_s']:.2f}x the time."]
    if "torch" in r:
        t = r["torch"]
        out += ["", f"torch screen on `{t['device']}` (CPU capability {t['cpu_capability']}) against the default backend:", "",
                "| n | d | torch / default time | identical |", "|---:|---:|---:|---|"]
        out += [f"| {x['n']:,} | {x['d']:,} | {x['ratio']:.2f}x | {'yes' if x['identical'] else '**no**'} |" for x in t["rows"]]
    g = r.get("gpu")
    if g and "rows" in g:
        out += ["", f"GPU (`{g['device']}`), backend `torch`, first-order SI:", "",
                "| n | d | time | peak GPU memory | neighbours equal to the CPU search (sampled rows) |",
                "|---:|---:|---:|---:|---|"]
        out += [f"| {x['n']:,} | {x['d']:,} | {fmt_s(x['seconds'])} | {fmt_bytes(x['peak_gpu_bytes'])} | "
                f"{'yes' if x['equal_to_cpu'] else '**no**'} ({x['checked_rows']:,} rows) |" for x in g["rows"]]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("dask", "torch", "gpu"), nargs="+", default=["dask", "torch"])
    p.add_argument("--gpu-n", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--gpu-d", type=int, default=2048)
    p.add_argument("--check-rows", type=int, default=1000)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker-memory-gib", type=float, default=8)
    p.add_argument("--block-rows", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scratch", default=None, help="folder for the temporary shards (default: the system's)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.table:
        print(table(out))
        return 0
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(machine=machine_info(), timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  threads=os.cpu_count())
    for section in args.only:
        print(f"[{section}] running ...", flush=True)
        result[section] = {"dask": run_dask, "torch": run_torch, "gpu": run_gpu}[section](args)
        write_json_atomic(out, result)
    print(table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
