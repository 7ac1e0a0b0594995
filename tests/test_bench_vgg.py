"""benchmarks/bench_vgg.py end to end on a tiny slice of the shared JPEG CIFAR-10 (slow)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    from tests._shared import require_shared
except ImportError:  # tests/ collected as rootdir-less modules
    from _shared import require_shared

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_vgg_quick(tmp_path):
    data = require_shared("data/cifar10-jpeg")
    out, ckpt = tmp_path / "vgg.json", tmp_path / "vgg.pt"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_vgg.py"), "--quick", "--threads", "1", "--data", str(data),
           "--width", "0.25", "--train-samples", "400", "--eval-samples", "200", "--si-samples", "200",
           "--finetune-steps", "2", "--head-epochs", "1", "--latency-repeats", "1", "--no-compare",
           "--out", str(out), "--ckpt", str(ckpt)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["arch"] == "vgg16_bn_quarter" and d["train"]["epochs_done"] == 1
    assert [r["name"] for r in d["layers"]][-1] == "classifier:input" and len(d["layers"]) == 14
    t = d["truncation"]
    assert t["layer"] in [r["name"] for r in d["layers"]] and t["max_si"] >= t["si_at_cut"] >= t["max_si"] - t["tol"]
    r = d["results"]["si-truncate"]
    assert r["macs"] <= 0.5 * d["base"]["macs"] and r["truncate_after"] == t["truncate_after"]
    assert set(r["latency"]) == {"batch1", "batch128"}
    # the checkpoint reloads with weights_only=True (load_model infers the arch from its shapes)
    from si_compress.models import load_model

    assert load_model(ckpt).arch == "vgg16_bn_quarter"
    assert torch.load(ckpt, weights_only=True)["train"]["epochs_done"] == 1
    assert "| layer | SI | CSI |" in proc.stdout
