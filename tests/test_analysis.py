import json

import numpy as np
import pytest
import torch

from si_compress.analysis import (
    AnalysisReport,
    analyze,
    check_samples_per_class,
    format_table,
    layers_csv,
    plan_passes,
)
from si_compress.data import balanced_indices, load_dataset, make_loader
from si_compress.features import collect_features
from si_compress.models import build_model, load_model
from si_compress.separability import center_separation_index, separation_index
from _shared import require_shared


@pytest.fixture(scope="module")
def digits_setup():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10).eval()
    info = load_dataset("digits", split="test")
    idx = balanced_indices(info.labels, 200, seed=0)
    return model, info, make_loader(info, idx, batch_size=64)


def test_analyze_matches_oracle_on_captured_features(digits_setup):
    model, info, loader = digits_setup
    rep = analyze(model, loader, order=3, class_names=info.class_names)
    assert [r.name for r in rep.layers] == ["features.2", "features.6", "features.10", "classifier:input"]
    fs = collect_features(model, loader, [r.name for r in rep.layers])
    for r in rep.layers:
        X = fs.features[r.name]
        assert r.si == separation_index(X, fs.labels, backend="numpy")
        assert r.high_order_si == separation_index(X, fs.labels, order=3, backend="numpy")
        assert r.soft_si == pytest.approx(separation_index(X, fs.labels, order=3, soft=True, backend="numpy"))
        assert r.csi == center_separation_index(X, fs.labels, backend="numpy")
        counts = np.bincount(fs.labels)
        assert np.dot(r.per_class_si, counts) / counts.sum() == pytest.approx(r.si)
    # cumulative cost grows with depth
    macs = [r.macs for r in rep.layers]
    assert macs == sorted(macs) and rep.total_macs >= macs[-1]
    assert rep.n_samples == 200 and rep.samples_per_class == (20,) * 10


def test_multi_pass_equals_single_pass(digits_setup):
    model, info, loader = digits_setup
    one = analyze(model, loader, order=2)
    many = analyze(model, loader, order=2, memory_budget_bytes=200 * 600 * 4)
    assert many.settings["passes"] > 1
    assert [(r.name, r.si, r.csi, r.high_order_si) for r in one.layers] == \
        [(r.name, r.si, r.csi, r.high_order_si) for r in many.layers]


def test_plan_passes_respects_budget():
    dims = {"a": 100, "b": 100, "c": 300, "d": 50}
    assert plan_passes(dims, 10, 10 * 200 * 4) == [["a", "b"], ["c"], ["d"]]
    assert plan_passes(dims, 10, 10**9) == [["a", "b", "c", "d"]]


def test_cross_si_against_reference(digits_setup):
    model, info, loader = digits_setup
    train = load_dataset("digits", split="train")
    ref_loader = make_loader(train, balanced_indices(train.labels, 300, seed=1), batch_size=128)
    rep = analyze(model, loader, order=1, reference_loader=ref_loader, layers=["classifier:input"])
    assert rep.layers[0].cross_si is not None and 0.0 <= rep.layers[0].cross_si <= 1.0


def test_report_json_round_trip(digits_setup):
    model, info, loader = digits_setup
    rep = analyze(model, loader, order=2, layers=["features.*"], max_dim=128)
    assert all(r.dim <= 128 or r.reduction != "none" for r in rep.layers)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["schema"] == "si_compress.analysis" and d["schema_version"] == 1
    back = AnalysisReport.from_dict(d)
    assert back == rep or back.to_dict() == rep.to_dict()
    with pytest.raises(ValueError, match="schema version"):
        AnalysisReport.from_dict({**d, "schema_version": 99})
    with pytest.raises(ValueError, match="not an si_compress analysis report"):
        AnalysisReport.from_dict({"schema": "other"})
    assert layers_csv(rep).count("\n") == len(rep.layers) + 1
    assert "SI" in format_table(rep)


def test_too_few_samples_per_class():
    with pytest.raises(ValueError, match="needs at least 4 per class"):
        check_samples_per_class(np.array([0, 0, 0, 1, 1, 1, 1]), 3)
    check_samples_per_class(np.array([0, 0, 1, 1]), 1)


@pytest.mark.slow
def test_resnet20_shared_integration():
    ckpt = require_shared("models/resnet20-cifar10-jpeg.th")
    data = require_shared("data/cifar10-jpeg")
    model = load_model(ckpt).model
    info = load_dataset(data, split="test")
    loader = make_loader(info, balanced_indices(info.labels, 300, seed=0), batch_size=100)
    rep = analyze(model, loader, order=3, class_names=info.class_names)
    names = [r.name for r in rep.layers]
    # the stem's ReLU module (same tensor as layer1.0's input)
    assert names[0] == "relu" and names[-1] == "linear:input" and len(names) == 11
    assert rep.accuracy > 0.8
    assert rep.layers[-1].si > 0.7 and rep.layers[-1].si > rep.layers[0].si
    fs = collect_features(model, loader, [names[0], names[5], names[-1]])
    for name in (names[0], names[5], names[-1]):
        assert rep.layer(name).si == separation_index(fs.features[name], fs.labels, backend="numpy")


@pytest.mark.parametrize("backend", ["auto", "numba", "numpy"])
@pytest.mark.parametrize("fail", [False, True])
def test_analyze_leaves_thread_counts_as_they_were(digits_setup, monkeypatch, backend, fail):
    """The SI search pins Numba's threads for small searches and restores Numba's count, which (one
    OpenMP count) also set torch's: analyze() must leave both as it found them, also when it raises."""
    numba = pytest.importorskip("numba")
    import si_compress.analysis as A

    model, info, loader = digits_setup
    if fail:
        real = A.score_layer
        calls = []

        def failing(*a, **k):
            calls.append(real(*a, **k))     # one real SI search first, then an error
            torch.set_num_threads(3)        # a stage that leaves a count changed: analyze puts it back
            raise RuntimeError("scoring failed")
        monkeypatch.setattr(A, "score_layer", failing)
    torch_before, numba_before = torch.get_num_threads(), numba.get_num_threads()
    try:
        torch.set_num_threads(1)
        numba.set_num_threads(numba_before)          # Numba's own count unchanged: torch's is the one asked for
        torch.set_num_threads(1)
        if fail:
            with pytest.raises(RuntimeError, match="scoring failed"):
                analyze(model, loader, order=1, backend=backend)
        else:
            analyze(model, loader, order=1, backend=backend)
        assert torch.get_num_threads() == 1
        assert numba.get_num_threads() == numba_before
    finally:
        torch.set_num_threads(torch_before)


@pytest.mark.parametrize("fail", [False, True])
def test_analyze_in_a_fresh_process_keeps_torch_threads(fail):
    """Issue 16: in a fresh process analyze() (its first Numba launch sets the OpenMP count torch
    reads) left torch on all cores after the caller pinned it to one; also when it raises."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import torch, numpy as np
from torch.utils.data import DataLoader, TensorDataset
import si_compress.analysis as A
torch.set_num_threads(1)
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                        torch.nn.Linear(4, 3))
loader = DataLoader(TensorDataset(torch.randn(3000, 1, 8, 8), torch.arange(3000) % 3), batch_size=500)
if {fail}:
    real = A.score_layer
    def failing(*a, **k):
        real(*a, **k)
        raise RuntimeError("scoring failed")
    A.score_layer = failing
try:
    A.analyze(m, loader, layers=["1"], order=1, backend="numba")
except RuntimeError:
    pass
print(torch.get_num_threads())
"""
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(Path(__file__).parents[1]))
    assert out.returncode == 0 and out.stdout.split() == ["1"], out.stdout + out.stderr
