"""Claim under test: the shift-add conv kernel runs at >= 1/3 of torch's fp32 conv speed on one
thread, bit-exact with the integer-multiply reference kernel, on ResNet-20's layer shapes.

Shift-add is an accelerator idea (a shifter is cheaper than a multiplier in silicon); on a CPU a
vectorised multiply costs about as much as a shift, so the goal is a usable evaluator, not a
speed-up over float. Rows: the shift kernel (pot4: one term; apot2: two terms per weight), the
integer-multiply kernel, torch fp32 conv2d and torch's int8 conv (fbgemm / qnnpack, for scale).
All kernels of a layer are timed in interleaved rounds (one call each per round, so background
load hits all alike); the median per kernel is reported, with the spread (max/min of the rounds).

Usage: python benchmarks/bench_shiftadd.py [--repeats 20] [--warmup 2] [--threads 1] [--quick]
Writes benchmarks/results/shiftadd.json (median milliseconds per call, ratios, versions, machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from si_compress.quant import conv2d_mul, conv2d_shift, quantize, quantize_pow2_weight  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "shiftadd.json"
SHAPES = [
    # name, batch, c_in, c_out, height/width, kernel, stride
    ("resnet20_stage1", 8, 16, 16, 32, 3, 1),
    ("resnet20_stage2", 8, 32, 32, 16, 3, 1),
    ("resnet20_stage3 (c64_8x8)", 8, 64, 64, 8, 3, 1),
    ("resnet20_down2 (stride 2)", 8, 16, 32, 32, 3, 2),
]
GOAL = 1 / 3  # speed of the shift kernel relative to torch fp32 conv2d, one thread


def interleaved_ms(fns: dict, *, repeats: int, warmup: int) -> dict:
    """{label: (median ms, max/min spread)} of each fn, timed in interleaved rounds after ``warmup``
    untimed rounds (the first also JIT-compiles)."""
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (statistics.median(v), max(v) / min(v)) for k, v in times.items()}


def torch_int8_conv(x, w, x_scale, w_scale, stride):
    """A callable running torch's quantized int8 conv, or the reason it is unavailable."""
    try:
        import torch.ao.nn.quantized as nnq

        engines = torch.backends.quantized.supported_engines
        engine = "fbgemm" if "fbgemm" in engines else ("qnnpack" if "qnnpack" in engines else None)
        if engine is None:
            return None, f"no quantized engine (supported: {engines})"
        torch.backends.quantized.engine = engine
        conv = nnq.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2, stride=stride)
        conv.set_weight_bias(torch.quantize_per_tensor(w, w_scale, 0, torch.qint8), None)
        conv.scale, conv.zero_point = float(x_scale), 0
        xq = torch.quantize_per_tensor(x, x_scale, 0, torch.qint8 if engine == "qnnpack" else torch.quint8)
        conv(xq)
        return (lambda: conv(xq)), engine
    except Exception as exc:  # torch builds without quantized ops, deprecations, etc.
        return None, f"{type(exc).__name__}: {exc}"


def bench_shape(name, n, cin, cout, hw, k, stride, *, repeats, warmup, gen):
    x = torch.randn(n, cin, hw, hw, generator=gen).relu()
    w = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5
    pad = k // 2
    x_scale = 2.0 ** np.ceil(np.log2(x.max().item() / 255))
    xq = quantize(x, x_scale, 8, signed=False).numpy()
    pot = quantize_pow2_weight(w, bits=4, variant="pot")
    apot = quantize_pow2_weight(w, bits=4, variant="apot2")
    w_int = pot.integer_weight()

    geo = dict(padding=pad, stride=stride)
    acc_shift = conv2d_shift(xq, pot.shifts, pot.signs, **geo)
    acc_mul = conv2d_mul(xq, w_int, **geo)
    # exact reference: float64 conv of the integers (|sums| < 2**53) and the multiply kernel
    ref = F.conv2d(torch.from_numpy(xq).double(), torch.from_numpy(w_int).double(), **geo).numpy()
    bit_exact = bool(np.array_equal(acc_shift, acc_mul) and np.array_equal(acc_mul, ref.astype(np.int64)))
    acc_apot = conv2d_shift(xq, apot.shifts, apot.signs, **geo)
    ref_apot = F.conv2d(torch.from_numpy(xq).double(), torch.from_numpy(apot.integer_weight()).double(), **geo)
    bit_exact = bit_exact and bool(np.array_equal(acc_apot, ref_apot.numpy().astype(np.int64)))

    rows = {
        "shift_pot4 (numba)": lambda: conv2d_shift(xq, pot.shifts, pot.signs, **geo),
        "shift_apot2_4 (numba, 2 terms)": lambda: conv2d_shift(xq, apot.shifts, apot.signs, **geo),
        "multiply int (numba)": lambda: conv2d_mul(xq, w_int, **geo),
        "torch fp32 conv2d": lambda: F.conv2d(x, w, **geo),
    }
    w_scale = w.abs().max().item() / 127
    int8_fn, int8_note = torch_int8_conv(x, w, x_scale, w_scale, stride)
    if int8_fn is not None:
        rows[f"torch int8 conv2d ({int8_note})"] = int8_fn
    with torch.inference_mode():
        res = interleaved_ms(rows, repeats=repeats, warmup=warmup)
    timings = {label: t for label, (t, _) in res.items()}
    base = timings["torch fp32 conv2d"]
    oh = (hw + 2 * pad - k) // stride + 1
    macs = n * cout * oh * oh * cin * k * k
    return {
        "name": name,
        "shape": {"batch": n, "c_in": cin, "c_out": cout, "height": hw, "width": hw, "kernel": k, "padding": pad,
                  "stride": stride},
        "macs": macs,
        "bit_exact_shift_vs_multiply": bit_exact,
        "torch_int8": "measured" if int8_fn is not None else f"skipped: {int8_note}",
        "median_ms": timings,
        "spread_max_over_min": {label: sp for label, (_, sp) in res.items()},
        "ratio_to_torch_fp32": {label: t / base for label, t in timings.items()},
        "speed_vs_torch_fp32": {label: base / t for label, t in timings.items()},
        "meets_goal": base / timings["shift_pot4 (numba)"] >= GOAL,
        "gmacs_per_s": {label: macs / (t * 1e-3) / 1e9 for label, t in timings.items()},
    }


def machine_info():
    import numba

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
    }


def table(path: Path) -> str:
    """Markdown table of a results JSON (what the README shows)."""
    d = json.loads(Path(path).read_text())
    lines = [f"{d['threads']} thread(s), median of {d['repeats']} interleaved rounds after {d['warmup']} warm-up "
             "round(s); speed = torch fp32 conv2d time / kernel time (goal for the shift kernel: >= "
             f"{GOAL:.2f}); spread = slowest / fastest round.", "",
             "| layer | kernel | median ms | speed vs torch fp32 | GMAC/s | spread | bit-exact |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in d["results"]:
        s = r["shape"]
        shape = (f"{r['name']} (batch {s['batch']}, {s['c_in']}->{s['c_out']}, {s['height']}x{s['width']}"
                 f"{', stride ' + str(s['stride']) if s.get('stride', 1) != 1 else ''})")
        for label, t in r["median_ms"].items():
            exact = str(r["bit_exact_shift_vs_multiply"]).lower() if label.startswith(("shift", "multiply")) else ""
            speed = r.get("speed_vs_torch_fp32", {}).get(label, 1 / r["ratio_to_torch_fp32"][label])
            spread = r.get("spread_max_over_min", {}).get(label)
            lines.append(f"| {shape} | {label} | {t:.3f} | {speed:.2f} | {r['gmacs_per_s'][label]:.2f} | "
                         f"{'-' if spread is None else f'{spread:.2f}'} | {exact} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and "--table" in sys.argv[1:]:
        print(table(RESULTS))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 1 instead of 8 (smoke run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for numba and torch alike (default 1: stable on a shared machine, and "
                             "a per-core comparison)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1 (the first warm-up call compiles the kernels)")
    import numba

    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}]")
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    results = []
    for name, n, cin, cout, hw, k, stride in SHAPES:
        res = bench_shape(name, 1 if args.quick else n, cin, cout, hw, k, stride, repeats=args.repeats,
                          warmup=args.warmup, gen=gen)
        results.append(res)
        s = res["shape"]
        print(f"\n{name}: batch {s['batch']}, {s['c_in']}->{s['c_out']}, {s['height']}x{s['width']}, "
              f"{s['kernel']}x{s['kernel']}  (bit-exact shift vs multiply: {res['bit_exact_shift_vs_multiply']}; "
              f"torch int8: {res['torch_int8']})")
        print(f"  {'kernel':<44}{'median ms':>10}{'speed':>9}{'GMAC/s':>9}{'spread':>8}")
        for label, t in res["median_ms"].items():
            speed, rate = res["speed_vs_torch_fp32"][label], res["gmacs_per_s"][label]
            print(f"  {label:<44}{t:>10.3f}{speed:>9.2f}{rate:>9.2f}{res['spread_max_over_min'][label]:>8.2f}")
    from _harness import write_json_atomic

    payload = {"benchmark": "shiftadd", "goal_speed_vs_torch_fp32": GOAL, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
               "machine": machine_info(), "results": results}
    write_json_atomic(args.out, payload)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
