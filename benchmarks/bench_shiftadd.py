"""Claim under test: how fast is the shift-add conv kernel on a CPU, next to the integer-multiply
kernel with the same loops, torch's fp32 conv and torch's int8 (fbgemm/qnnpack) conv?

Shift-add is an accelerator idea (a shifter is cheaper than a multiplier in silicon); on a CPU a
vectorised multiply costs about as much as a shift, so no speed-up is expected here. The numbers
show the cost of the Python-free reference path and that the kernels are bit-exact.

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

from si_compress.nn import conv2d_mul, conv2d_shift, quantize, quantize_pow2_weight  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "shiftadd.json"
SHAPES = [
    # name, batch, c_in, c_out, height/width, kernel
    ("resnet20_stage1", 8, 16, 16, 32, 3),
    ("c64_8x8", 8, 64, 64, 8, 3),
]


def median_ms(fn, *, repeats: int, warmup: int) -> float:
    """Median wall time of fn() in ms after ``warmup`` untimed calls (the first also JIT-compiles)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_int8_conv(x, w, x_scale, w_scale):
    """A callable running torch's quantized int8 conv, or the reason it is unavailable."""
    try:
        import torch.ao.nn.quantized as nnq

        engines = torch.backends.quantized.supported_engines
        engine = "fbgemm" if "fbgemm" in engines else ("qnnpack" if "qnnpack" in engines else None)
        if engine is None:
            return None, f"no quantized engine (supported: {engines})"
        torch.backends.quantized.engine = engine
        conv = nnq.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
        conv.set_weight_bias(torch.quantize_per_tensor(w, w_scale, 0, torch.qint8), None)
        conv.scale, conv.zero_point = float(x_scale), 0
        xq = torch.quantize_per_tensor(x, x_scale, 0, torch.qint8 if engine == "qnnpack" else torch.quint8)
        conv(xq)
        return (lambda: conv(xq)), engine
    except Exception as exc:  # torch builds without quantized ops, deprecations, etc.
        return None, f"{type(exc).__name__}: {exc}"


def bench_shape(name, n, cin, cout, hw, k, *, repeats, warmup, gen):
    x = torch.randn(n, cin, hw, hw, generator=gen).relu()
    w = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5
    pad = k // 2
    x_scale = 2.0 ** np.ceil(np.log2(x.max().item() / 255))
    xq = quantize(x, x_scale, 8, signed=False).numpy()
    pot = quantize_pow2_weight(w, bits=4, variant="pot")
    apot = quantize_pow2_weight(w, bits=4, variant="apot2")
    w_int = pot.integer_weight()

    acc_shift = conv2d_shift(xq, pot.shifts, pot.signs, padding=pad)
    acc_mul = conv2d_mul(xq, w_int, padding=pad)
    bit_exact = bool(np.array_equal(acc_shift, acc_mul))

    rows = {
        "shift_pot4 (numba)": lambda: conv2d_shift(xq, pot.shifts, pot.signs, padding=pad),
        "shift_apot2_4 (numba, 2 terms)": lambda: conv2d_shift(xq, apot.shifts, apot.signs, padding=pad),
        "multiply int (numba)": lambda: conv2d_mul(xq, w_int, padding=pad),
        "torch fp32 conv2d": lambda: F.conv2d(x, w, padding=pad),
    }
    w_scale = w.abs().max().item() / 127
    int8_fn, int8_note = torch_int8_conv(x, w, x_scale, w_scale)
    if int8_fn is not None:
        rows[f"torch int8 conv2d ({int8_note})"] = int8_fn
    with torch.inference_mode():
        timings = {label: median_ms(fn, repeats=repeats, warmup=warmup) for label, fn in rows.items()}
    base = timings["torch fp32 conv2d"]
    macs = n * cout * hw * hw * cin * k * k
    return {
        "name": name,
        "shape": {"batch": n, "c_in": cin, "c_out": cout, "height": hw, "width": hw, "kernel": k, "padding": pad},
        "macs": macs,
        "bit_exact_shift_vs_multiply": bit_exact,
        "torch_int8": "measured" if int8_fn is not None else f"skipped: {int8_note}",
        "median_ms": timings,
        "ratio_to_torch_fp32": {label: t / base for label, t in timings.items()},
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
    lines = [f"{d['threads']} thread(s), median of {d['repeats']} calls after {d['warmup']} warm-up(s); "
             "ratio = time / torch fp32 conv2d.", "",
             "| layer | kernel | median ms | x torch fp32 | GMAC/s | bit-exact vs multiply |", "|---|---|---:|---:|---:|---|"]
    for r in d["results"]:
        s = r["shape"]
        shape = f"{r['name']} (batch {s['batch']}, {s['c_in']}->{s['c_out']}, {s['height']}x{s['width']})"
        for label, t in r["median_ms"].items():
            exact = str(r["bit_exact_shift_vs_multiply"]).lower() if label.startswith("shift") else ""
            lines.append(f"| {shape} | {label} | {t:.3f} | {r['ratio_to_torch_fp32'][label]:.2f} | "
                         f"{r['gmacs_per_s'][label]:.2f} | {exact} |")
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
    for name, n, cin, cout, hw, k in SHAPES:
        res = bench_shape(name, 1 if args.quick else n, cin, cout, hw, k, repeats=args.repeats, warmup=args.warmup,
                          gen=gen)
        results.append(res)
        s = res["shape"]
        print(f"\n{name}: batch {s['batch']}, {s['c_in']}->{s['c_out']}, {s['height']}x{s['width']}, "
              f"{s['kernel']}x{s['kernel']}  (bit-exact shift vs multiply: {res['bit_exact_shift_vs_multiply']}; "
              f"torch int8: {res['torch_int8']})")
        print(f"  {'kernel':<44}{'median ms':>10}{'x fp32':>9}{'GMAC/s':>9}")
        for label, t in res["median_ms"].items():
            ratio, rate = res["ratio_to_torch_fp32"][label], res["gmacs_per_s"][label]
            print(f"  {label:<44}{t:>10.3f}{ratio:>9.2f}{rate:>9.2f}")
    payload = {"benchmark": "shiftadd", "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
               "machine": machine_info(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
