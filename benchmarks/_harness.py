"""Shared helpers for the benchmarks: wall time, peak extra memory in a fresh process, machine
description and atomic JSON output.

Peak extra memory of one call is measured in a child process (``python -c``, a fresh
interpreter) so that nothing the parent allocated earlier can hide or inflate it:
1. the child imports the benchmark module and calls a *prepare* function, which builds the data
   and warms the method up (imports, JIT) and returns the callable to measure;
2. it reads the resident set size (VmRSS) as the baseline and resets the high-water mark
   (``echo 5 > /proc/self/clear_refs`` resets VmHWM to the current RSS on Linux);
3. it runs the call once and reports VmHWM - baseline.
Where clear_refs cannot be written, the fallback is ``getrusage(RUSAGE_SELF).ru_maxrss`` after
the call minus the same value before it (exact when the warm-up's own peak was lower).
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

# ../shared (real checkpoints and data), overridable like the tests' fixture
SHARED = Path(os.environ.get("SI_COMPRESS_SHARED", Path(__file__).resolve().parents[2] / "shared"))

MiB = 2**20
GiB = 2**30


# ----------------------------------------------------------------------------------- timing
def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, *,
                budget_s: float | None = None, long_call_s: float | None = None,
                min_total_s: float = 0.0, max_calls: int = 1000) -> dict:
    """Median wall time of ``fn()`` in seconds and the value of its last call.

    ``warmup`` untimed calls come first (the first one also compiles/imports). Timed calls stop
    early once their total exceeds ``budget_s`` (at least one is always taken). Calls shorter
    than a millisecond are noisy: timing goes on past ``repeats`` until the timed calls add up
    to ``min_total_s`` (at most ``max_calls`` calls), as timeit's autorange does. A warm-up call
    longer than ``long_call_s`` is itself counted as a timed sample and ends the warm-up: a call
    that long is not changed by warm caches or JIT (it is noted as ``warmup_counted``).
    Returns {"median_s", "times_s", "value", "warmup_counted"}.
    """
    times: list[float] = []
    value = None
    warmup_counted = False
    for _ in range(max(0, warmup)):
        t0 = time.perf_counter()
        value = fn()
        dt = time.perf_counter() - t0
        if long_call_s is not None and dt >= long_call_s:
            times.append(dt)
            warmup_counted = True
            break
    while len(times) < max(1, repeats) or (sum(times) < min_total_s and len(times) < max_calls):
        if times and budget_s is not None and sum(times) >= budget_s:
            break
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times, "value": value,
            "warmup_counted": warmup_counted}


# ----------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", fh.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _minflt() -> int:
    """Minor page faults of this process so far (first touches of fresh memory pages)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_in_child(prepared: Callable[[], object], repeats: int = 1) -> dict:
    """Run in the child: peak extra memory of ``prepared()`` over the baseline, and the time and
    minor page faults of each of ``repeats`` calls (the first call is the one whose peak is measured)."""
    baseline_rss = (_status_kib("VmRSS") or 0) * 1024
    method = "clear_refs" if _reset_hwm() and _status_kib("VmHWM") is not None else "ru_maxrss"
    before_max = _maxrss_bytes()
    times, faults = [], []
    value = None
    f0 = _minflt()
    t0 = time.perf_counter()
    value = prepared()
    times.append(time.perf_counter() - t0)
    faults.append(_minflt() - f0)
    if method == "clear_refs":
        peak = (_status_kib("VmHWM") or 0) * 1024
        extra = peak - baseline_rss
    else:
        peak = _maxrss_bytes()
        if peak > before_max:
            extra = peak - baseline_rss
        else:  # the warm-up's own peak was higher: this call's peak is hidden
            extra, method = None, "ru_maxrss (hidden by an earlier higher peak)"
    for _ in range(max(0, repeats - 1)):  # further calls: timing only
        f0 = _minflt()
        t0 = time.perf_counter()
        value = prepared()
        times.append(time.perf_counter() - t0)
        faults.append(_minflt() - f0)
    return {"peak_extra_bytes": None if extra is None else int(max(0, extra)), "baseline_rss_bytes": int(baseline_rss),
            "peak_rss_bytes": int(peak), "memory_method": method, "times_s": times, "minor_faults": faults,
            "median_s": statistics.median(times), "value": _jsonable(value)}


_CHILD = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_bench_child_mod", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules["_bench_child_mod"] = mod
spec.loader.exec_module(mod)
sys.path.insert(0, sys.argv[2])
from _harness import measure_in_child
kw = json.loads(sys.argv[4])
repeats = kw.pop("_repeats", 1)
fn = getattr(mod, sys.argv[3])(**kw)
res = measure_in_child(fn, repeats)
print("__RESULT__" + json.dumps(res), flush=True)
"""


def peak_extra_memory(module_file: str | Path, prepare: str, kwargs: dict, *, repeats: int = 1,
                      timeout_s: float | None = None, env: dict | None = None) -> dict:
    """Peak extra memory of one call, measured in a fresh interpreter.

    ``module_file`` defines ``prepare(**kwargs)`` that builds the data, warms up and returns a
    zero-argument callable. Returns measure_in_child's dict, or {"error": ...} when the child
    failed (killed for memory, timed out, raised), never raising itself.
    """
    kw = dict(kwargs)
    kw["_repeats"] = int(repeats)
    cmd = [sys.executable, "-c", _CHILD, str(module_file), str(Path(__file__).resolve().parent), prepare,
           json.dumps(kw)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("__RESULT__"):
            return json.loads(line[len("__RESULT__"):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    return {"error": f"child {how}: {' | '.join(tail)}"}


# ----------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Flags:\s*(.*)$", out, re.M)
        if m:
            return set(m.group(1).split())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            m = re.search(r"^MemTotal:\s+(\d+)\s+kB", fh.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def machine_info() -> dict:
    """CPU, memory, library versions, thread counts and BLAS of this process."""
    info: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_bytes": _mem_total_bytes(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                  "NUMBA_NUM_THREADS", "SI_COMPRESS_BACKEND") if k in os.environ},
    }
    flags = _cpu_flags()
    info["cpu_flags"] = {f: (f in flags) for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                                                   "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                                                   "amx_int8")}
    versions = {}
    for mod in ("numpy", "torch", "faiss", "numba", "sklearn", "threadpoolctl"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # pragma: no cover - missing optional package
            versions[mod] = f"unavailable ({type(exc).__name__})"
    info["versions"] = versions
    threads = {}
    try:
        import torch

        threads["torch"] = torch.get_num_threads()
    except Exception:
        pass
    try:
        import numba

        threads["numba"] = numba.get_num_threads()
    except Exception:
        pass
    try:
        import faiss

        threads["faiss_omp"] = faiss.omp_get_max_threads()
    except Exception:
        pass
    info["threads"] = threads
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [{k: p.get(k) for k in ("user_api", "internal_api", "prefix", "version",
                                                      "num_threads", "threading_layer", "architecture")}
                               for p in threadpool_info()]
    except Exception as exc:
        info["threadpools"] = f"threadpoolctl unavailable ({type(exc).__name__})"
    return info


# ----------------------------------------------------------------------------------- output
def _jsonable(v):
    try:
        import numpy as np

        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, np.ndarray):
            return v.tolist()
    except ImportError:
        pass
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def write_json_atomic(path: str | Path, payload: dict) -> Path:
    """Write JSON to a temporary file in the same folder, then os.replace it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(_jsonable(payload), fh, indent=2)
            fh.write("\n")
        from si_compress._io import file_mode

        os.chmod(tmp, file_mode())   # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    if b >= GiB:
        return f"{b / GiB:.2f} GiB"
    return f"{b / MiB:.0f} MiB"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-2:
        return f"{s * 1e3:.2f} ms"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"
