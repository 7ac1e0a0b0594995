"""benchmarks/train_cifar.py: resumable, records its recipe; the SI paper's CIFAR networks go through
the adapter (concatenation branches found, a branch drop runs)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from si_compress.models import build_model
from si_compress.structure import describe

REPO = Path(__file__).resolve().parents[1]


def _load():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("train_cifar", REPO / "benchmarks" / "train_cifar.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paper_networks_have_the_published_sizes_and_removable_branches():
    from si_compress.compress import apply_plan
    from si_compress.features.cost import count_ops
    from si_compress.plan import CompressionPlan

    x = torch.zeros(1, 3, 32, 32)
    d40 = build_model("densenet40", 10).eval()
    assert count_ops(d40, x)[1] == pytest.approx(1.06e6, rel=0.01)          # DenseNet-40 (k = 12): 1.06 M
    st = describe(d40, x)
    assert sum(b.kind == "concat" for b in st.blocks) == 36                   # 3 blocks x 12 layers
    g = build_model("googlenet_cifar_quarter", 10).eval()
    st = describe(g, x)
    assert sum(b.kind == "concat" for b in st.blocks) == 36                   # 9 inceptions x 4 branches
    small = apply_plan(g, CompressionPlan(arch="googlenet_cifar_quarter", num_classes=10,
                                          dropped_blocks=("a3.b3", "e4.b2")), example_input=x)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_ops(small, x)[0] < count_ops(g, x)[0]


def test_training_resumes_and_records_its_recipe(tmp_path, monkeypatch):
    tc = _load()
    n = 64
    fake = (torch.randn(n, 3, 32, 32), torch.arange(n) % 10, torch.randn(32, 3, 32, 32), torch.arange(32) % 10)
    monkeypatch.setattr(tc, "data", lambda args: fake)
    argv = ["--arch", "googlenet_cifar_quarter", "--epochs", "1", "--batch", "32", "--out", str(tmp_path),
            "--lr", "0.05"]
    tc.main(argv)
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["epochs_done"] == 1 and rec["recipe"]["epochs"] == 1 and len(rec["history"]) == 1
    assert (tmp_path / "googlenet_cifar_quarter.pth").exists()
    tc.main(argv)                                                             # resumes after epoch 1: done
    assert len(json.loads((tmp_path / "record.json").read_text())["history"]) == 1
    with pytest.raises(SystemExit, match="another recipe"):
        tc.main(argv[:3] + ["3"] + argv[4:])                                  # a changed recipe is refused
