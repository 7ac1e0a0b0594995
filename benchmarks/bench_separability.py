"""Separation Index (SI) speed and memory: si_compress.separability vs the published reference
algorithm and scikit-learn's brute-force neighbours.

Sections (``--only`` runs one and merges it into the existing JSON):
  si      first-order SI for n x d on a grid: ours (backend auto), ours with each of the numba and faiss backends,
          the published reference (full n x n ``torch.cdist`` matrix, diagonal set to inf, row
          minimum), scikit-learn ``NearestNeighbors(algorithm="brute")`` with the query's own index
          excluded, and the floor of exact search: one float32 X.X^T (numpy; torch's for information).
  order5  high-order and soft SI of order 5: ours vs the reference's full row sort of the n x n matrix.
  csi     centre SI: ours vs the reference's n x d x C tensor of repeated class masks; the
          reference is timed in a fresh interpreter, with glibc's allocator defaults and with
          freed pages kept for reuse (see CHILD_TIMED: its temporaries' page faults are about
          half its time at d = 64).
  select  forward_select vs the naive recompute (every candidate's concatenation re-scored with
          the reference algorithm), with the identical order checked.
  big     n = 100,000: ours only (time and peak extra memory); the reference's n x n matrix would
          need 4 n^2 bytes = 40 GB, more than this machine has.

Every method gets the same seeded data: class-structured Gaussian blobs through ReLU (10 classes,
float32, ~0.5 % all-zero rows, i.e. duplicates), the shape of pooled CNN features.
Wall time: median of ``--repeats`` calls after a warm-up. Peak extra memory: one call in a fresh
interpreter, high-water RSS over the RSS after data creation and warm-up (see _harness.py).
Threads: numpy/torch/numba/faiss at their defaults (recorded in the JSON).

Usage:
  python benchmarks/bench_separability.py            # full grid (long: run on a quiet machine)
  python benchmarks/bench_separability.py --quick    # smoke run, < 2 minutes
  python benchmarks/bench_separability.py --only csi --repeats 3
  python benchmarks/bench_separability.py --table    # markdown tables from the JSON, no run
Writes benchmarks/results/separability.json (atomically, after every section).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _harness import (  # noqa: E402
    GiB,
    fmt_bytes,
    fmt_s,
    machine_info,
    median_time,
    peak_extra_memory,
    write_json_atomic,
)

DEFAULT_OUT = HERE / "results" / "separability.json"
SECTIONS = ("si", "order5", "csi", "select", "big")
N_CLASSES = 10
ZERO_FRAC = 0.005     # fraction of all-zero rows (dead activations): exact duplicates
SIGNAL = 1.4          # class-mean scale * d^(1/4): keeps SI in the 0.7-0.9 range for every d
BASE = 0.5            # shared positive feature mean (zero rows would otherwise be everyone's hub)
ORDER = 5
MIN_TOTAL_S = 0.2     # sub-millisecond calls are repeated until their times add up to this
# Pause before timing each method: the previous method's thread pool (torch, Numba, BLAS) spins
# for a while after its last call and, on 2 cores, slows the next method's short calls by up to
# 10x (seen on the reference at d = 64, in both directions).
SETTLE_S = 0.5

FULL = {
    "si": {"n": [2000, 5000, 10000, 20000], "d": [64, 1024, 4096]},
    "order5": {"n": [2000, 5000, 10000], "d": [64, 1024, 4096]},
    "csi": {"n": [2000, 5000, 10000, 20000], "d": [64, 1024, 4096]},
    "select": {"n": 2000, "groups": 64, "group_dim": 64, "informative": 12},
    "big": {"n": [100000], "d": [1024]},
}
QUICK = {
    "si": {"n": [2000, 5000], "d": [64, 1024]},
    "order5": {"n": [2000], "d": [64, 1024]},
    "csi": {"n": [2000, 5000], "d": [64, 1024]},
    "select": {"n": 500, "groups": 16, "group_dim": 16, "informative": 4},
    "big": {"n": [20000], "d": [64]},   # smoke test of the code path only
}

# acceptance thresholds (the text)
ACC_SI_N, ACC_SI_D, ACC_SI_MAX = 10000, 4096, 1.3
ACC_BIG_N, ACC_BIG_D, ACC_BIG_BYTES = 100000, 1024, 2e9
ACC_ORDER5_MIN, ACC_CSI_MIN, ACC_SELECT_MIN = 2.0, 100.0, 50.0


# =========================================================================================== data
def make_features(n: int, d: int, seed: int = 0, n_classes: int = N_CLASSES, zero_frac: float = ZERO_FRAC):
    """Seeded CNN-like features (n, d) float32 and labels (n,) int64.

    Balanced classes; x = ReLU(m + mu_y + noise): a shared positive per-feature mean m (features
    are correlated, as real activations are), class means mu_y of scale SIGNAL * d^(-1/4) (so SI
    stays in the 0.7-0.9 range for every d) and unit noise; about a third of the values are zero.
    Then ``zero_frac`` of the rows (any class) are set to exactly zero, as dead post-ReLU vectors
    are: exact duplicates. Generated in chunks; deterministic in (seed, n, d).
    """
    rng = np.random.default_rng([seed, n, d])
    y = rng.permutation(np.arange(n) % n_classes).astype(np.int64)
    m = (BASE * (0.5 + rng.random(d))).astype(np.float32)
    centers = rng.standard_normal((n_classes, d), dtype=np.float32) * np.float32(SIGNAL * d ** -0.25) + m
    X = np.empty((n, d), np.float32)
    step = max(1, (64 * 2**20) // (4 * d))
    for s in range(0, n, step):
        blk = X[s:s + step]
        blk[...] = rng.standard_normal(blk.shape, dtype=np.float32)
        blk += centers[y[s:s + step]]
        np.maximum(blk, 0, out=blk)
    n_zero = int(round(zero_frac * n))
    if n_zero:
        X[rng.choice(n, n_zero, replace=False)] = 0
    return X, y


def make_groups(n: int, n_groups: int, group_dim: int, informative: int, seed: int = 0):
    """Feature groups G (n, n_groups, group_dim) float64 and labels for forward selection.

    ``informative`` groups (spread over the index range) carry class means of decreasing strength;
    the rest are pure noise. Post-ReLU like filter outputs.
    """
    rng = np.random.default_rng([seed, n, n_groups, group_dim, 7])
    y = rng.permutation(np.arange(n) % N_CLASSES).astype(np.int64)
    G = rng.standard_normal((n, n_groups, group_dim))
    info = rng.choice(n_groups, size=min(informative, n_groups), replace=False)
    for rank, g in enumerate(info):
        strength = 1.2 * (0.8 ** rank) * group_dim ** -0.25
        centers = rng.standard_normal((N_CLASSES, group_dim)) * strength
        G[:, g, :] += centers[y]
    np.maximum(G, 0.0, out=G)
    return np.ascontiguousarray(G), y


# ====================================================================================== methods
def _torch():
    import torch

    return torch


def ref_si(X: np.ndarray, y: np.ndarray) -> float:
    """Published reference: full n x n torch.cdist matrix, diagonal masked, row minimum."""
    torch = _torch()
    Xt = torch.from_numpy(X)
    D = torch.cdist(Xt, Xt, p=2).fill_diagonal_(float("inf"))
    idx = torch.min(D, dim=1).indices
    del D
    yt = torch.from_numpy(y)
    return float((yt[idx] == yt).double().mean())


def ref_order(X: np.ndarray, y: np.ndarray, order: int, soft: bool) -> float:
    """Published reference high-order / soft SI: full n x n matrix, full row sort, first r columns."""
    torch = _torch()
    Xt = torch.from_numpy(X)
    D = torch.cdist(Xt, Xt, p=2).fill_diagonal_(float("inf"))
    _, idx = torch.sort(D, dim=1)
    del D
    nbr = idx[:, :order].clone()
    del idx
    yt = torch.from_numpy(y)
    same = (yt[nbr] == yt[:, None]).double()
    return float((same.mean(1) if soft else same.prod(1)).mean())


def ref_csi(X: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """Published reference CSI: class masks repeated to an (n, d, C) tensor for the class means,
    then the (n, d, C) differences of every sample to every centre."""
    torch = _torch()
    Xt = torch.from_numpy(X)
    yt = torch.from_numpy(y)
    n, d = Xt.shape
    onehot = torch.nn.functional.one_hot(yt, n_classes).to(Xt.dtype)        # (n, C)
    masks = onehot.unsqueeze(1).repeat(1, d, 1)                              # (n, d, C)
    centers = (Xt.unsqueeze(2) * masks).sum(0) / masks.sum(0)                # (d, C)
    del masks
    dist = ((Xt.unsqueeze(2) - centers.unsqueeze(0)) ** 2).sum(1)            # (n, C)
    return float((dist.argmin(1) == yt).double().mean())


def sklearn_si(X: np.ndarray, y: np.ndarray) -> float:
    """scikit-learn brute force, 2 neighbours; the query's own index is excluded (with duplicate
    rows the first neighbour need not be the query itself)."""
    from sklearn.neighbors import NearestNeighbors

    ind = NearestNeighbors(n_neighbors=2, algorithm="brute").fit(X).kneighbors(X, return_distance=False)
    rows = np.arange(X.shape[0])
    nbr = np.where(ind[:, 0] == rows, ind[:, 1], ind[:, 0])
    return float((y[nbr] == y).mean())


def _plain(fn):
    """A method factory for a call that needs no untimed setup."""
    return lambda: fn


def _si_methods(X, y):
    """name -> factory; the factory does untimed setup and returns the zero-argument call."""
    from si_compress.separability import separation_index

    def gemm_2op():
        Xc = X.copy()  # a distinct operand (numpy may route X @ X.T to syrk); the copy is not timed
        return lambda: (X @ Xc.T, None)[1]

    def gemm_torch():
        Xt = _torch().from_numpy(X)
        return lambda: (Xt @ Xt.T, None)[1]

    return {
        "ours": _plain(lambda: separation_index(X, y)),
        "ours_numba": _plain(lambda: separation_index(X, y, backend="numba")),
        "ours_faiss": _plain(lambda: separation_index(X, y, backend="faiss")),
        "reference": _plain(lambda: ref_si(X, y)),
        "sklearn_brute": _plain(lambda: sklearn_si(X, y)),
        "gemm_numpy": _plain(lambda: (X @ X.T, None)[1]),
        "gemm_numpy_2op": gemm_2op,
        "gemm_torch": gemm_torch,
    }


def _order5_methods(X, y):
    from si_compress.separability import separation_index, separation_profile

    return {
        "ours_hard": _plain(lambda: separation_index(X, y, order=ORDER)),
        "ours_soft": _plain(lambda: separation_index(X, y, order=ORDER, soft=True)),
        "ours_profile": _plain(lambda: (lambda p: [p.high_order_si, p.soft_si])(separation_profile(X, y, order=ORDER))),
        "reference_hard": _plain(lambda: ref_order(X, y, ORDER, soft=False)),
        "reference_soft": _plain(lambda: ref_order(X, y, ORDER, soft=True)),
    }


def _csi_methods(X, y):
    from si_compress.separability import center_separation_index

    return {
        "ours": _plain(lambda: center_separation_index(X, y)),
        "reference": _plain(lambda: ref_csi(X, y, N_CLASSES)),
        "reference_reused_pages": _plain(lambda: ref_csi(X, y, N_CLASSES)),
    }


# The CSI reference allocates three (n, d, C) float32 temporaries per call. glibc serves blocks
# that large with a fresh mmap, so every call first-touches them page by page (minor faults:
# about half its time at n = 20,000, d = 64), and how often that happens depends on the
# process's history (glibc raises its mmap threshold after frees, up to 32 MiB). Each reference
# timing therefore runs in a fresh interpreter, in two stated allocator settings:
#   reference               glibc defaults: the reference as a user's script runs it;
#   reference_reused_pages  freed memory stays in the heap (the two thresholds below), so calls
#                           after the first reuse faulted-in pages: the reference's compute alone.
REUSE_PAGES_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 * 10**9), "MALLOC_TRIM_THRESHOLD_": str(8 * 10**9),
                   "MALLOC_TOP_PAD_": str(2**30)}
CHILD_WARM_CALLS = 3   # untimed full-size calls first: the heap settles after two or three
CHILD_TIMED = {("csi", "reference"): {}, ("csi", "reference_reused_pages"): REUSE_PAGES_ENV}


METHOD_SETS = {"si": _si_methods, "order5": _order5_methods, "csi": _csi_methods}
FLOORS = ("gemm_numpy", "gemm_numpy_2op")


def skip_reason(section: str, method: str, n: int, d: int, mem_limit: float) -> str | None:
    """Why a method is not run at this size (its memory need), or None."""
    mat = 4.0 * n * n
    if method in ("reference", "gemm_numpy", "gemm_numpy_2op", "gemm_torch") and section == "si":
        what = "the n x n float32 distance matrix" if method == "reference" else "the n x n float32 output"
        if mat > mem_limit:
            return f"would need {mat / GiB:.1f} GiB for {what} (limit {mem_limit / GiB:.0f} GiB)"
    if section == "order5" and method.startswith("reference"):
        need = 16.0 * n * n  # distances + sorted values (4 B each) + int64 sort indices
        if need > mem_limit:
            return (f"would need {need / GiB:.1f} GiB for the n x n matrix and its full row sort "
                    f"(values + int64 indices; limit {mem_limit / GiB:.0f} GiB)")
    if section == "csi" and method.startswith("reference"):
        t = 4.0 * n * d * N_CLASSES
        if 3 * t > mem_limit:
            return (f"would need ~{3 * t / GiB:.1f} GiB: three (n, d, C) float32 tensors of {t / GiB:.1f} GiB "
                    f"(limit {mem_limit / GiB:.0f} GiB)")
    return None


def prepare_case(section: str, method: str, n: int, d: int, seed: int = 0):
    """Child-process entry: warm the method up on small data, build the case's data, return the call."""
    Xw, yw = make_features(min(n, 300), d, seed=seed + 1)
    METHOD_SETS[section](Xw, yw)[method]()()
    del Xw, yw
    X, y = make_features(n, d, seed=seed)
    return METHOD_SETS[section](X, y)[method]()


def prepare_select(method: str, n: int, groups: int, group_dim: int, informative: int, seed: int = 0):
    from si_compress.separability import forward_select

    Gw, yw = make_groups(60, min(groups, 4), group_dim, 2, seed=seed + 1)
    forward_select(Gw, yw)
    G, y = make_groups(n, groups, group_dim, informative, seed=seed)
    return lambda: forward_select(G, y).order


# ===================================================================================== sections
def _hits(v, n):
    return None if v is None else int(round(v * n))


def _print_row(name, rec, t_ref=None, floor=None):
    if rec["status"] != "ok":
        print(f"    {name:<16}{rec['status']}: {rec.get('reason', '')}", flush=True)
        return
    t = rec["median_s"]
    parts = [f"    {name:<16}{fmt_s(t):>11}", f"{fmt_bytes(rec.get('peak_extra_bytes')):>11}"]
    parts.append(f"{t / t_ref:>9.2f}x" if t_ref else f"{'':>10}")
    parts.append(f"{t / floor:>9.2f}x" if floor else f"{'':>10}")
    v = rec.get("value")
    if isinstance(v, (int, float)):
        parts.append(f"  {v:.4f}")
    elif isinstance(v, list):
        parts.append("  " + "/".join(f"{x:.4f}" for x in v))
    if rec.get("agrees") is not None:
        parts.append("  agrees" if rec["agrees"] else f"  DIFFERS (hits differ by {rec.get('hit_diff')})")
    if rec.get("minor_faults_per_call") is not None:
        parts.append(f"  {rec['minor_faults_per_call']:,} page faults/call")
    print("".join(parts), flush=True)


def _memory(args, prepare: str, kwargs: dict, repeats: int = 1) -> dict:
    return peak_extra_memory(__file__, prepare, kwargs, repeats=repeats, timeout_s=args.child_timeout)


def run_grid(section: str, args, grid: dict) -> dict:
    """One of si / order5 / csi: every (n, d), every method, time + memory + agreement."""
    cases = []
    ns, ds = grid["n"], grid["d"]
    titles = {"si": "first-order SI", "order5": f"order-{ORDER} hard/soft SI", "csi": "centre SI (CSI)"}
    print(f"\n== {titles[section]}: n in {ns}, d in {ds}", flush=True)
    for d in ds:
        for n in ns:
            X, y = make_features(n, d, seed=args.seed)
            n_zero = int((~X.any(axis=1)).sum())
            methods = METHOD_SETS[section](X, y)
            case = {"n": n, "d": d, "n_classes": N_CLASSES, "zero_rows": n_zero, "methods": {}}
            print(f"  n={n:,} d={d} ({n_zero} all-zero rows)   {'median':>11}{'peak extra':>11}"
                  f"{'/ ours':>10}{'/ floor':>10}  value", flush=True)
            measure_mem = args.memory == "all" or (args.memory == "largest" and n == max(ns) and d == max(ds))
            for name, factory in methods.items():
                reason = skip_reason(section, name, n, d, args.mem_limit)
                if reason:
                    case["methods"][name] = {"status": "skipped", "reason": reason}
                    continue
                if (section, name) in CHILD_TIMED:
                    case["methods"][name] = _time_in_child(args, section, name, n, d, CHILD_TIMED[(section, name)])
                    continue
                try:
                    fn = factory()
                    time.sleep(SETTLE_S)
                    tm = median_time(fn, args.repeats, args.warmup, budget_s=args.budget_s,
                                     long_call_s=args.long_call_s, min_total_s=MIN_TOTAL_S)
                except MemoryError as exc:
                    case["methods"][name] = {"status": "error", "reason": f"MemoryError: {exc}"}
                    continue
                rec = {"status": "ok", "median_s": tm["median_s"], "times_s": tm["times_s"],
                       "warmup_counted": tm["warmup_counted"], "value": tm["value"]}
                if measure_mem:
                    mem = _memory(args, "prepare_case", {"section": section, "method": name, "n": n, "d": d,
                                                         "seed": args.seed})
                    if "error" in mem:
                        rec["memory_error"] = mem["error"]
                    else:
                        rec["peak_extra_bytes"] = mem["peak_extra_bytes"]
                        rec["memory_method"] = mem["memory_method"]
                        rec["child_time_s"] = mem["median_s"]
                case["methods"][name] = rec
            _agreement(section, case, n)
            _ratios(section, case)
            ref = case["methods"].get("ours") or case["methods"].get("ours_hard")
            floor = case.get("floor_s")
            for name, rec in case["methods"].items():
                base = ref["median_s"] if ref and ref["status"] == "ok" else None
                if section == "order5" and name.endswith("soft"):
                    b2 = case["methods"].get("ours_soft")
                    base = b2["median_s"] if b2 and b2["status"] == "ok" else None
                _print_row(name, rec, base, floor)
            cases.append(case)
            del X, y, methods
    return {"cases": cases}


def _time_in_child(args, section: str, method: str, n: int, d: int, env: dict) -> dict:
    """Median time of ``args.repeats`` calls in a fresh interpreter with ``env`` added, after
    CHILD_WARM_CALLS untimed full-size calls (the first one's peak extra memory is recorded);
    minor page faults per call."""
    time.sleep(SETTLE_S)
    res = peak_extra_memory(__file__, "prepare_case", {"section": section, "method": method, "n": n, "d": d,
                                                        "seed": args.seed},
                            repeats=max(1, args.repeats) + CHILD_WARM_CALLS, timeout_s=args.child_timeout, env=env)
    if "error" in res:
        return {"status": "error", "reason": res["error"]}
    times, faults = res["times_s"][CHILD_WARM_CALLS:], res["minor_faults"][CHILD_WARM_CALLS:]
    rec = {"status": "ok", "median_s": float(np.median(times)), "times_s": times, "warmup_counted": False,
           "value": res["value"], "timed_in": "fresh interpreter" + (f" with {env}" if env else ", allocator defaults"),
           "first_call_s": res["times_s"][0], "minor_faults_per_call": int(np.median(faults)),
           "minor_faults": faults}
    if res.get("peak_extra_bytes") is not None:
        rec["peak_extra_bytes"] = res["peak_extra_bytes"]
        rec["memory_method"] = res["memory_method"]
    return rec


def _agreement(section, case, n):
    m = case["methods"]
    if section == "si" or section == "csi":
        ours = m.get("ours")
        ov = ours.get("value") if ours and ours["status"] == "ok" else None
        for name, rec in m.items():
            if rec["status"] != "ok" or name == "ours" or rec.get("value") is None or ov is None:
                continue
            rec["hit_diff"] = abs(_hits(rec["value"], n) - _hits(ov, n))
            rec["agrees"] = rec["hit_diff"] == 0
    elif section == "order5":
        pairs = {"reference_hard": "ours_hard", "reference_soft": "ours_soft"}
        for name, rec in m.items():
            if rec["status"] != "ok":
                continue
            if name in pairs and m.get(pairs[name], {}).get("status") == "ok":
                scale = n * ORDER if name.endswith("soft") else n
                rec["hit_diff"] = abs(int(round(rec["value"] * scale)) - int(round(m[pairs[name]]["value"] * scale)))
                rec["agrees"] = rec["hit_diff"] == 0
            if name == "ours_profile" and m.get("ours_hard", {}).get("status") == "ok" \
                    and m.get("ours_soft", {}).get("status") == "ok":
                rec["agrees"] = rec["value"][0] == m["ours_hard"]["value"] and rec["value"][1] == m["ours_soft"]["value"]
                rec["hit_diff"] = 0 if rec["agrees"] else None


def _ratios(section, case):
    m = case["methods"]

    def t(name):
        r = m.get(name)
        return r["median_s"] if r and r["status"] == "ok" else None

    ratios = {}
    if section == "si":
        floors = [t(f) for f in FLOORS if t(f) is not None]
        case["floor_s"] = min(floors) if floors else None
        if t("ours"):
            for name in m:
                if name != "ours" and t(name):
                    ratios[f"{name}/ours"] = t(name) / t("ours")
            if case["floor_s"]:
                ratios["ours/floor"] = t("ours") / case["floor_s"]
                if t("ours_faiss"):
                    ratios["ours_faiss/floor"] = t("ours_faiss") / case["floor_s"]
                if t("gemm_torch"):
                    ratios["ours/gemm_torch"] = t("ours") / t("gemm_torch")
    elif section == "order5":
        for kind in ("hard", "soft"):
            if t(f"ours_{kind}") and t(f"reference_{kind}"):
                ratios[f"reference_{kind}/ours_{kind}"] = t(f"reference_{kind}") / t(f"ours_{kind}")
        if t("ours_profile") and t("reference_hard") and t("reference_soft"):
            ratios["reference_hard+soft/ours_profile"] = (t("reference_hard") + t("reference_soft")) / t("ours_profile")
    elif section == "csi":
        for name in ("reference", "reference_reused_pages"):
            if t("ours") and t(name):
                ratios[f"{name}/ours"] = t(name) / t("ours")
    case["ratios"] = ratios


def naive_forward_select(G: np.ndarray, y: np.ndarray):
    """Greedy forward selection re-scoring every candidate concatenation from scratch with the
    reference algorithm (torch.cdist full matrix, diagonal masked, row minimum). Ties in SI go to
    the lowest group index (strict >), as in forward_select. Returns (order, si, seconds per step)."""
    torch = _torch()
    n, ng, gd = G.shape
    Gt = torch.from_numpy(G)
    yt = torch.from_numpy(y)
    chosen: list[int] = []
    remaining = list(range(ng))
    order, sis, step_s = [], [], []
    for _ in range(ng):
        t0 = time.perf_counter()
        best_hits, best = -1, None
        for g in remaining:
            feats = Gt[:, chosen + [g], :].reshape(n, -1)
            D = torch.cdist(feats, feats, p=2).fill_diagonal_(float("inf"))
            idx = torch.min(D, dim=1).indices
            hits = int((yt[idx] == yt).sum())
            if hits > best_hits:
                best_hits, best = hits, g
        chosen.append(best)
        remaining.remove(best)
        order.append(best)
        sis.append(best_hits / n)
        step_s.append(time.perf_counter() - t0)
    return np.array(order), np.array(sis), step_s


def run_select(args, cfg: dict) -> dict:
    from si_compress.separability import forward_select

    n, ng, gd, inf = cfg["n"], cfg["groups"], cfg["group_dim"], cfg["informative"]
    print(f"\n== forward_select: n={n}, {ng} groups x {gd} dims ({inf} informative), float64", flush=True)
    G, y = make_groups(n, ng, gd, inf, seed=args.seed)
    tm = median_time(lambda: forward_select(G, y), args.repeats, args.warmup, budget_s=args.budget_s,
                     long_call_s=args.long_call_s)
    res = tm["value"]
    ours = {"status": "ok", "median_s": tm["median_s"], "times_s": tm["times_s"], "order": res.order.tolist(),
            "si": res.si.tolist()}
    if args.memory != "none":
        mem = _memory(args, "prepare_select", {"method": "ours", "n": n, "groups": ng, "group_dim": gd,
                                               "informative": inf, "seed": args.seed})
        if "error" in mem:
            ours["memory_error"] = mem["error"]
        else:
            ours["peak_extra_bytes"] = mem["peak_extra_bytes"]
    print(f"    ours            {fmt_s(ours['median_s']):>11}{fmt_bytes(ours.get('peak_extra_bytes')):>11}"
          f"   order[:8]={ours['order'][:8]}", flush=True)
    print("    naive recompute: running once (every candidate re-scored with the reference) ...", flush=True)
    t0 = time.perf_counter()
    n_order, n_si, step_s = naive_forward_select(G, y)
    naive_s = time.perf_counter() - t0
    identical = bool(np.array_equal(n_order, res.order))
    first_diff = None if identical else int(np.nonzero(n_order != res.order)[0][0])
    naive = {"status": "ok", "median_s": naive_s, "times_s": [naive_s], "order": n_order.tolist(),
             "si": n_si.tolist(), "step_s": step_s, "n_cdist_calls": ng * (ng + 1) // 2,
             "memory": "not measured (one run; its peak is one n x n matrix plus one concatenation)"}
    ratio = naive_s / ours["median_s"]
    print(f"    naive           {fmt_s(naive_s):>11}{'':>11}   {ratio:.1f}x ours; identical order: {identical}"
          + ("" if identical else f" (first difference at step {first_diff})"), flush=True)
    return {"n": n, "groups": ng, "group_dim": gd, "informative": inf, "dtype": "float64",
            "methods": {"ours": ours, "naive": naive}, "identical_order": identical,
            "first_difference_step": first_diff,
            "max_abs_si_diff": float(np.max(np.abs(n_si - res.si))),
            "ratios": {"naive/ours": ratio}}


def run_big(args, grid: dict) -> dict:
    mem_total = machine_info().get("mem_total_bytes")
    print(f"\n== big: ours only, n in {grid['n']}, d in {grid['d']} (time and memory from one call in a fresh process)",
          flush=True)
    cases = []
    for d in grid["d"]:
        for n in grid["n"]:
            need = 4.0 * n * n
            fits = bool(mem_total and need < mem_total)
            ref_reason = f"would need {need / GiB:.1f} GiB ({need / 1e9:.0f} GB) for the n x n float32 distance matrix"
            if mem_total:
                ref_reason += (f"; this machine has {mem_total / GiB:.1f} GiB in all" if not fits else
                               f" (fits this machine's {mem_total / GiB:.1f} GiB; not run: the big case times ours only)")
            mem = _memory(args, "prepare_case", {"section": "si", "method": "ours", "n": n, "d": d, "seed": args.seed},
                          repeats=args.big_repeats)
            if "error" in mem:
                ours = {"status": "error", "reason": mem["error"]}
            else:
                ours = {"status": "ok", "median_s": mem["median_s"], "times_s": mem["times_s"],
                        "peak_extra_bytes": mem["peak_extra_bytes"], "memory_method": mem["memory_method"],
                        "value": mem["value"], "baseline_rss_bytes": mem["baseline_rss_bytes"]}
            case = {"n": n, "d": d, "data_bytes": 4 * n * d,
                    "methods": {"ours": ours,
                                "reference": {"status": "skipped", "reason": ref_reason,
                                              "need_bytes": need, "fits_machine": fits},
                                "gemm_numpy": {"status": "skipped",
                                               "reason": f"the n x n float32 output would need {need / GiB:.1f} GiB"},
                                "sklearn_brute": {"status": "skipped", "reason": "not measured in the big case"}}}
            cases.append(case)
            print(f"  n={n:,} d={d}: ours {fmt_s(ours.get('median_s'))}, peak extra {fmt_bytes(ours.get('peak_extra_bytes'))}"
                  f" (data itself {fmt_bytes(4 * n * d)}), SI={ours.get('value')}"
                  + (f" [{ours['reason']}]" if ours["status"] != "ok" else "") + f"; reference: {ref_reason}", flush=True)
    return {"cases": cases}


# =================================================================================== acceptance
def _find(section: dict | None, n, d):
    for c in (section or {}).get("cases", []):
        if c["n"] == n and c["d"] == d:
            return c
    return None


def _largest_ref_cases(section: dict | None, ref_name: str):
    """Per d, the case with the largest n where the reference ran."""
    best = {}
    for c in (section or {}).get("cases", []):
        r = c["methods"].get(ref_name)
        if r and r["status"] == "ok" and (c["d"] not in best or c["n"] > best[c["d"]]["n"]):
            best[c["d"]] = c
    return [best[d] for d in sorted(best)]


def acceptance(payload: dict) -> list[dict]:
    S = payload.get("sections", {})
    out = []

    def quick(name):
        return bool(S.get(name, {}).get("meta", {}).get("quick"))

    # 1. SI vs GEMM floor at n=10k, d=4096
    sec = S.get("si")
    c = _find(sec, ACC_SI_N, ACC_SI_D)
    text = f"first-order SI at n={ACC_SI_N:,}, d={ACC_SI_D} <= {ACC_SI_MAX}x one float32 X.X^T GEMM"
    if c and c.get("ratios", {}).get("ours/floor") is not None:
        r = c["ratios"]["ours/floor"]
        extra = ""
        if c["ratios"].get("ours/gemm_torch"):
            extra = f"; vs torch (MKL) GEMM {c['ratios']['ours/gemm_torch']:.2f}x"
        out.append({"check": "si_vs_gemm", "text": text, "measured": r, "threshold": ACC_SI_MAX,
                    "status": "PASS" if r <= ACC_SI_MAX else "FAIL",
                    "detail": f"ours {fmt_s(c['methods']['ours']['median_s'])} vs floor {fmt_s(c['floor_s'])} "
                              f"(fastest numpy float32 X.X^T){extra}"})
    else:
        info = ""
        if sec and sec.get("cases"):
            cs = [x for x in sec["cases"] if x.get("ratios", {}).get("ours/floor") is not None]
            if cs:
                big = max(cs, key=lambda x: (x["n"] * x["n"] * x["d"]))
                info = f"; largest measured case n={big['n']:,} d={big['d']}: {big['ratios']['ours/floor']:.2f}x"
        out.append({"check": "si_vs_gemm", "text": text, "measured": None, "threshold": ACC_SI_MAX,
                    "status": "NOT RUN", "detail": f"case not in this run{info}"})

    # 2. big: n=100k d=1024 within 2 GB extra; reference cannot run on this machine
    c = _find(S.get("big"), ACC_BIG_N, ACC_BIG_D)
    text = f"first-order SI at n={ACC_BIG_N:,}, d={ACC_BIG_D} within {ACC_BIG_BYTES / 1e9:.0f} GB extra memory; reference cannot run"
    if c and c["methods"]["ours"]["status"] == "ok":
        o, r = c["methods"]["ours"], c["methods"]["reference"]
        ok = o["peak_extra_bytes"] <= ACC_BIG_BYTES and not r.get("fits_machine", True)
        out.append({"check": "big_memory", "text": text, "measured": o["peak_extra_bytes"],
                    "threshold": ACC_BIG_BYTES, "status": "PASS" if ok else "FAIL",
                    "detail": f"peak extra {o['peak_extra_bytes'] / 1e9:.2f} GB in {fmt_s(o['median_s'])}; "
                              f"reference {r['reason']}"})
    else:
        out.append({"check": "big_memory", "text": text, "measured": None, "threshold": ACC_BIG_BYTES,
                    "status": "NOT RUN" if not c else "FAIL",
                    "detail": "case not in this run" if not c else c["methods"]["ours"].get("reason", "")})

    # 3. order 5, hard and soft, >= 2x the full row sort (largest n where the reference ran, each d)
    cases = _largest_ref_cases(S.get("order5"), "reference_hard")
    text = f"order-{ORDER} hard and soft SI >= {ACC_ORDER5_MIN:.0f}x faster than the reference's full row sort"
    vals = []
    for c in cases:
        for kind in ("hard", "soft"):
            v = c["ratios"].get(f"reference_{kind}/ours_{kind}")
            if v is not None:
                vals.append((v, f"n={c['n']:,} d={c['d']} {kind}"))
    if vals:
        worst = min(vals)
        all_cases = [v for c in S["order5"]["cases"] for k, v in c["ratios"].items() if k.startswith("reference_")
                     and "+" not in k]
        out.append({"check": "order5_vs_sort", "text": text, "measured": worst[0], "threshold": ACC_ORDER5_MIN,
                    "status": "PASS" if worst[0] >= ACC_ORDER5_MIN else "FAIL",
                    "detail": "at the largest n the reference ran, per d: " +
                              ", ".join(f"{lab} {v:.1f}x" for v, lab in vals) +
                              f"; minimum over every size {min(all_cases):.1f}x"})
    else:
        out.append({"check": "order5_vs_sort", "text": text, "measured": None, "threshold": ACC_ORDER5_MIN,
                    "status": "NOT RUN", "detail": "no case where the reference ran"})

    # 4. CSI >= 100x the (n, d, C) mask-tensor reference
    cases = _largest_ref_cases(S.get("csi"), "reference")
    text = f"CSI >= {ACC_CSI_MIN:.0f}x faster than the reference's (n, d, C) repeated-mask tensor"
    vals = [(c["ratios"]["reference/ours"], f"n={c['n']:,} d={c['d']}") for c in cases
            if c["ratios"].get("reference/ours") is not None]
    if vals:
        worst = min(vals)
        all_cases = [c["ratios"]["reference/ours"] for c in S["csi"]["cases"] if "reference/ours" in c["ratios"]]
        reused = [(c["ratios"]["reference_reused_pages/ours"], f"d={c['d']}") for c in cases
                  if c["ratios"].get("reference_reused_pages/ours") is not None]
        note = ("; with the reference's freed pages reused (its compute alone, no page faults): " +
                ", ".join(f"{lab} {v:.0f}x" for v, lab in reused)) if reused else ""
        out.append({"check": "csi_vs_masks", "text": text, "measured": worst[0], "threshold": ACC_CSI_MIN,
                    "status": "PASS" if worst[0] >= ACC_CSI_MIN else "FAIL",
                    "detail": "reference in a fresh interpreter with glibc's default allocator, at the largest n "
                              "it ran, per d: " + ", ".join(f"{lab} {v:.0f}x" for v, lab in vals) +
                              f"; minimum over every size {min(all_cases):.0f}x" + note})
    else:
        out.append({"check": "csi_vs_masks", "text": text, "measured": None, "threshold": ACC_CSI_MIN,
                    "status": "NOT RUN", "detail": "no case where the reference ran"})

    # 5. forward_select >= 50x the naive recompute, identical order
    sel = S.get("select")
    text = f"forward_select >= {ACC_SELECT_MIN:.0f}x faster than the naive recompute, identical order"
    if sel and "ratios" in sel:
        r = sel["ratios"]["naive/ours"]
        ok = r >= ACC_SELECT_MIN and sel["identical_order"]
        out.append({"check": "select_vs_naive", "text": text, "measured": r, "threshold": ACC_SELECT_MIN,
                    "status": "PASS" if ok else "FAIL",
                    "detail": f"n={sel['n']}, {sel['groups']} groups x {sel['group_dim']} dims: naive "
                              f"{fmt_s(sel['methods']['naive']['median_s'])} vs ours "
                              f"{fmt_s(sel['methods']['ours']['median_s'])}; identical order: {sel['identical_order']}"})
    else:
        out.append({"check": "select_vs_naive", "text": text, "measured": None, "threshold": ACC_SELECT_MIN,
                    "status": "NOT RUN", "detail": "section not in this run"})
    sec_of = {"si_vs_gemm": "si", "big_memory": "big", "order5_vs_sort": "order5", "csi_vs_masks": "csi",
              "select_vs_naive": "select"}
    for a in out:
        a["quick_run"] = quick(sec_of[a["check"]])
    return out


def print_acceptance(checks: list[dict]) -> None:
    print("\n== acceptance (each a ratio measured in one run)", flush=True)
    for a in checks:
        m = a["measured"]
        if m is None:
            ms = "-"
        elif a["check"] == "big_memory":
            ms = f"{m / 1e9:.2f} GB"
        else:
            ms = f"{m:.2f}x"
        q = "  [quick run: smaller sizes than the acceptance text]" if a.get("quick_run") else ""
        print(f"  {a['status']:<8}{a['text']}: {ms}{q}\n          {a['detail']}", flush=True)


# ======================================================================================== table
def _md_time(rec):
    return fmt_s(rec["median_s"]) if rec and rec.get("status") == "ok" else "—"


def _md_mem(rec):
    return fmt_bytes(rec.get("peak_extra_bytes")) if rec and rec.get("status") == "ok" and \
        rec.get("peak_extra_bytes") is not None else "—"


def render_table(payload: dict) -> str:
    """Markdown tables (for the README) from the JSON payload."""
    S = payload.get("sections", {})
    lines = []
    mi = payload.get("machine", {})
    flags = [f for f, v in mi.get("cpu_flags", {}).items() if v and f.startswith(("avx512f", "amx_tile"))]
    lines.append(f"Machine: {mi.get('cpu_model', '?')}, {mi.get('cpus_usable', '?')} cores"
                 + (f" ({', '.join(flags)})" if flags else "")
                 + f", {fmt_bytes(mi.get('mem_total_bytes'))} RAM; threads {mi.get('threads', {})}; "
                 + ", ".join(f"{k} {v}" for k, v in mi.get("versions", {}).items()) + ".")
    lines.append("")
    lines.append(f"Times are medians of at least `--repeats` calls after a warm-up call; calls under a "
                 f"millisecond are repeated until they add up to {MIN_TOTAL_S} s, and each method starts "
                 f"after a {SETTLE_S} s pause (the previous method's idle threads spin for a while).")
    if any(s.get("meta", {}).get("quick") for s in S.values()):
        lines.append("")
        lines.append("**Quick run** (`--quick`): small sizes, few repeats; not the acceptance measurement.")

    if "si" in S:
        lines += ["", "### First-order SI: median wall time (peak extra memory)", "",
                  "| n | d | SI | ours (auto) | ours (numba) | ours (faiss) | reference (cdist n×n) | sklearn brute |"
                  " X·Xᵀ floor (numpy) | X·Xᵀ (torch) | ref / ours | sklearn / ours | ours / floor |",
                  "|---:|---:|---:|---|---|---|---|---|---|---|---:|---:|---:|"]
        for c in S["si"]["cases"]:
            m, r = c["methods"], c.get("ratios", {})

            def cell(name):
                rec = m.get(name)
                if not rec or rec["status"] != "ok":
                    return "skipped" if rec and rec["status"] == "skipped" else "—"
                s = f"{_md_time(rec)} ({_md_mem(rec)})"
                return s + ("" if rec.get("agrees", True) else f" ≠{rec.get('hit_diff')}")

            floor_rec = None
            fl = [m.get(f) for f in FLOORS if m.get(f, {}).get("status") == "ok"]
            if fl:
                floor_rec = min(fl, key=lambda x: x["median_s"])
            lines.append(f"| {c['n']:,} | {c['d']} | {_v(m.get('ours', {}).get('value'))} | {cell('ours')} | {cell('ours_numba')} | {cell('ours_faiss')} | "
                         f"{cell('reference')} | {cell('sklearn_brute')} | "
                         f"{(_md_time(floor_rec) + ' (' + _md_mem(floor_rec) + ')') if floor_rec else 'skipped'} | "
                         f"{cell('gemm_torch')} | "
                         f"{_r(r.get('reference/ours'))} | {_r(r.get('sklearn_brute/ours'))} | {_r(r.get('ours/floor'), 2)} |")
        lines.append("")
        skipped = sorted({f"n={c['n']:,}: {v['reason']}" for c in S["si"]["cases"]
                          for k, v in c["methods"].items() if v["status"] == "skipped" and k == "reference"})
        if skipped:
            lines.append("Reference skipped: " + "; ".join(skipped) + ".")
        lines.append("`≠k`: the number of hits (samples whose neighbour shares the label) differs from ours by k "
                     "(float32 near-ties, or the order of ties among duplicate all-zero rows).")
    if "big" in S:
        lines += ["", "### Large n: ours only (time and peak extra memory of one call in a fresh process)", "", "| n | d | SI | ours | peak extra memory | data size | reference |",
                  "|---:|---:|---:|---|---|---|---|"]
        for c in S["big"]["cases"]:
            o = c["methods"]["ours"]
            v = o.get("value")
            lines.append(f"| {c['n']:,} | {c['d']} | {_v(v)} | {_md_time(o)} | {_md_mem(o)} | "
                         f"{fmt_bytes(c['data_bytes'])} | {c['methods']['reference']['reason']} |"
                         if o["status"] == "ok" else
                         f"| {c['n']:,} | {c['d']} | — | error: {o.get('reason')} | — | {fmt_bytes(c['data_bytes'])} | "
                         f"{c['methods']['reference']['reason']} |")
    if "order5" in S:
        lines += ["", f"### Order-{ORDER} SI (hard / soft): median wall time (peak extra memory)", "",
                  "| n | d | ours hard | ours soft | ours both (profile) | reference hard (full sort) | "
                  "reference soft | ref / ours (hard) | ref / ours (soft) |",
                  "|---:|---:|---|---|---|---|---|---:|---:|"]
        for c in S["order5"]["cases"]:
            m, r = c["methods"], c.get("ratios", {})

            def cell(name):
                rec = m.get(name)
                if not rec or rec["status"] != "ok":
                    return "skipped" if rec and rec["status"] == "skipped" else "—"
                return f"{_md_time(rec)} ({_md_mem(rec)})" + ("" if rec.get("agrees", True) else
                                                              f" ≠{rec.get('hit_diff')}")
            lines.append(f"| {c['n']:,} | {c['d']} | {cell('ours_hard')} | {cell('ours_soft')} | {cell('ours_profile')} | "
                         f"{cell('reference_hard')} | {cell('reference_soft')} | "
                         f"{_r(r.get('reference_hard/ours_hard'))} | {_r(r.get('reference_soft/ours_soft'))} |")
    if "csi" in S:
        lines += ["", "### Centre SI: median wall time (peak extra memory)", "",
                  "| n | d | CSI | ours | reference (n×d×C masks), allocator defaults | ref / ours "
                  "| reference, freed pages reused | ref / ours |", "|---:|---:|---:|---|---|---:|---|---:|"]

        def refcell(ref):
            if ref is None:
                return "—"
            if ref["status"] != "ok":
                return f"{ref['status']}: {ref.get('reason')}"
            faults = ref.get("minor_faults_per_call")
            return (f"{_md_time(ref)} ({_md_mem(ref)}" + (f"; {faults:,} page faults/call" if faults is not None else "")
                    + ")" + ("" if ref.get("agrees", True) else f" ≠{ref.get('hit_diff')}"))
        for c in S["csi"]["cases"]:
            m, r = c["methods"], c.get("ratios", {})
            lines.append(f"| {c['n']:,} | {c['d']} | {_v(m['ours'].get('value'))} | "
                         f"{_md_time(m['ours'])} ({_md_mem(m['ours'])}) | {refcell(m.get('reference'))} | "
                         f"{_r(r.get('reference/ours'), 0)} | {refcell(m.get('reference_reused_pages'))} | "
                         f"{_r(r.get('reference_reused_pages/ours'), 0)} |")
    if "select" in S:
        s = S["select"]
        o, nv = s["methods"]["ours"], s["methods"]["naive"]
        lines += ["", "### forward_select", "",
                  "| n | groups × dims | ours | naive recompute (reference SI per candidate) | naive / ours | identical order |",
                  "|---:|---|---|---|---:|---|",
                  f"| {s['n']:,} | {s['groups']} × {s['group_dim']} | {_md_time(o)} ({_md_mem(o)}) | {_md_time(nv)} "
                  f"({nv['n_cdist_calls']} cdist calls) | {s['ratios']['naive/ours']:.0f}× | "
                  f"{'yes' if s['identical_order'] else 'no (step ' + str(s['first_difference_step']) + ')'} |"]
    checks = payload.get("acceptance") or acceptance(payload)
    lines += ["", "### Acceptance", "", "| check | measured | status |", "|---|---|---|"]
    for a in checks:
        m = a["measured"]
        ms = "—" if m is None else (f"{m / 1e9:.2f} GB" if a["check"] == "big_memory" else f"{m:.2f}×")
        lines.append(f"| {a['text']} | {ms} — {a['detail']} | {a['status']}{' (quick)' if a.get('quick_run') else ''} |")
    return "\n".join(lines) + "\n"


def _v(v):
    return "—" if not isinstance(v, (int, float)) else f"{v:.4f}"


def _r(v, nd=1):
    return "—" if v is None else f"{v:.{nd}f}×"


# ========================================================================================= main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small grid, few repeats (< 2 minutes)")
    p.add_argument("--only", choices=SECTIONS, action="append",
                   help="run only this section (repeatable); merged into the existing JSON")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 5; quick 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop repeating a method once its timed calls add up to this (default 60; quick 2)")
    p.add_argument("--long-call-s", type=float, default=20.0,
                   help="a warm-up call longer than this counts as a timed call")
    p.add_argument("--memory", choices=("all", "largest", "none"), default=None,
                   help="peak-memory subprocess per method: every size, only the largest case of each section, "
                        "or none (default all; quick largest)")
    p.add_argument("--mem-limit-gb", type=float, default=8.0,
                   help="skip a reference/floor whose n x n (or n x d x C) arrays would need more (GiB)")
    p.add_argument("--big-d", type=str, default=None, help="comma-separated d for the big case (default 64,1024,4096)")
    p.add_argument("--big-repeats", type=int, default=1, help="calls of ours in the big case's process")
    p.add_argument("--child-timeout", type=float, default=None, help="seconds per memory subprocess (default 3600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--table", action="store_true", help="print markdown tables from --out and exit")
    args = p.parse_args(argv)

    if args.table:
        if not args.out.exists():
            p.error(f"{args.out} not found; run the benchmark first")
        sys.stdout.write(render_table(json.loads(args.out.read_text())))
        return 0

    cfg = QUICK if args.quick else FULL
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    if args.big_d:
        cfg["big"]["d"] = [int(x) for x in args.big_d.split(",")]
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.budget_s = args.budget_s if args.budget_s is not None else (2.0 if args.quick else 60.0)
    args.memory = args.memory or ("largest" if args.quick else "all")
    args.child_timeout = args.child_timeout or (300.0 if args.quick else 3600.0)
    args.mem_limit = args.mem_limit_gb * GiB
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    sections = args.only or (["si", "order5", "csi", "select"] + (["big"] if not args.quick else []))
    if args.quick and not args.only:
        sections.append("big")  # a small smoke test of the subprocess path (n=20k, d=64)

    payload = {"benchmark": "separability", "schema": 1, "sections": {}}
    if args.only and args.out.exists():
        try:
            payload = json.loads(args.out.read_text())
            payload.setdefault("sections", {})
        except (OSError, json.JSONDecodeError):
            pass
    machine = machine_info()
    payload["machine"] = machine
    print(f"machine: {machine['cpu_model']}, {machine['cpus_usable']} cores, {fmt_bytes(machine['mem_total_bytes'])}; "
          f"threads {machine['threads']}; BLAS "
          + ", ".join(f"{t.get('internal_api')} {t.get('version') or ''} x{t.get('num_threads')}"
                      for t in machine.get("threadpools", []) if isinstance(t, dict)), flush=True)
    print(f"mode: {'quick' if args.quick else 'full'}; repeats {args.repeats}, warm-up {args.warmup}, "
          f"budget {args.budget_s:.0f} s/method, memory {args.memory}, sections {sections}", flush=True)
    t_start = time.perf_counter()
    for sec in sections:
        t0 = time.perf_counter()
        if sec in METHOD_SETS:
            res = run_grid(sec, args, cfg[sec])
        elif sec == "select":
            res = run_select(args, cfg["select"])
        else:
            res = run_big(args, cfg["big"])
        res["meta"] = {"quick": args.quick, "repeats": args.repeats, "warmup": args.warmup, "budget_s": args.budget_s,
                       "memory": args.memory, "mem_limit_bytes": args.mem_limit, "seed": args.seed,
                       "config": cfg[sec], "seconds": time.perf_counter() - t0,
                       "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "cpu_model": machine["cpu_model"], "threads": machine["threads"]}
        payload["sections"][sec] = res
        payload["acceptance"] = acceptance(payload)
        write_json_atomic(args.out, payload)
    print_acceptance(payload["acceptance"])
    print(f"\nwrote {args.out} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
