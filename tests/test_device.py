"""--device: resolution, moving models there and back, and every stage running its batches there.

No GPU is needed: the stages are watched through ``si_compress._device.to_device`` (the one place a
batch is moved), which the tests replace by a version that tags what it moved; a probe model records,
per forward, whether its input was moved there and checks it sits where the model's weights are.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import si_compress._device as D
from si_compress.plan import CompressionPlan, LayerDecision

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- resolve_device
def test_auto_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_device("auto") == CPU and D.resolve_device(None) == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert D.resolve_device("auto") == torch.device("cuda", 0)
    assert D.resolve_device("cuda") == torch.device("cuda", 0)
    assert D.resolve_device("cpu") == CPU                    # an explicit cpu stays cpu
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        D.resolve_device("cuda:1")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA"])
def test_cuda_without_cuda_is_a_one_line_value_error(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        D.resolve_device(spec)
    msg = str(err.value)
    assert "\n" not in msg and "no CUDA device" in msg and "use --device cpu or auto" in msg


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "", 3, "mps"])
def test_unknown_device_spec(spec):
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        D.resolve_device(spec)


def test_compress_config_checks_its_device():
    from si_compress.pipeline import CompressConfig

    assert CompressConfig().device == "auto" and CompressConfig(device=" CPU ").device == "cpu"
    with pytest.raises(ValueError, match="device"):
        CompressConfig(device="gpu")


# ----------------------------------------------------------------------------- on_device
class _Recording(nn.Linear):
    """A module whose .to() records where it is sent (and stays put: there is no second device here)."""

    def __init__(self):
        super().__init__(2, 2)
        self.sent = []

    def to(self, *args, **kwargs):
        self.sent.append(torch.device(args[0]))
        return self


def test_on_device_moves_there_and_back_also_on_error():
    a, b = _Recording(), _Recording()
    meta = torch.device("meta")
    with pytest.raises(RuntimeError, match="boom"):
        with D.on_device(meta, a, None, b):
            assert a.sent == [meta] and b.sent == [meta]
            raise RuntimeError("boom")
    assert a.sent == [meta, CPU] and b.sent == [meta, CPU]
    with D.on_device(CPU, a):       # already there: not moved
        pass
    with D.on_device(None, a):      # None: the module's own device, nothing moves
        pass
    assert a.sent == [meta, CPU]


# ----------------------------------------------------------------------------- every stage
class Probe(nn.Module):
    """A plain chain that records, per forward, the device its input was moved to (None: not moved)
    and fails when the input is not where its weights are."""

    def __init__(self, num_classes=2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, num_classes)
        self.seen = []

    def forward(self, x):
        assert x.device == self.classifier.weight.device, (x.device, self.classifier.weight.device)
        self.seen.append(getattr(x, "_moved_to", None))
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class _Plain(Probe):
    def __init__(self, probe):
        super().__init__()
        self.load_state_dict(probe.state_dict())

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _tagging_to_device(t, device):
    out = t.to(device).clone()          # a new tensor: the loader's own tensors stay untagged
    out._moved_to = torch.device(device)
    return out


@pytest.fixture
def tagged(monkeypatch):
    monkeypatch.setattr(D, "to_device", _tagging_to_device)


def _loader(n=24, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.arange(n) % 2
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _probe():
    torch.manual_seed(0)
    return Probe().eval()


def _moved(model, n_batches):
    """The model ran at least one forward per batch on batches moved to the CPU, and none elsewhere."""
    moved = [d for d in model.seen if d is not None]
    assert len(moved) >= n_batches, model.seen
    assert set(moved) == {CPU}


def _plan():
    return CompressionPlan(arch="probe", num_classes=2,
                           layers=(LayerDecision(name="features.0", out_channels=8, keep=(0, 2, 4, 6)),))


def _pruned(base):
    from si_compress.compress import apply_plan

    p = apply_plan(base, _plan(), example_input=torch.zeros(1, 3, 8, 8))
    p.seen = []
    return p


def test_evaluate_runs_on_the_device(tagged):
    from si_compress.compress import evaluate

    m = _probe()
    evaluate(m, _loader(), device="cpu")
    _moved(m, 3)


def test_collect_features_and_filter_groups_run_on_the_device(tagged):
    from si_compress.features import collect_features
    from si_compress.structure import collect_filter_groups

    m = _probe()
    collect_features(m, _loader(), ["features.2"], device="cpu")
    _moved(m, 3)
    m.seen = []
    collect_filter_groups(m, _loader(), ["features.3:input"], device="cpu")
    _moved(m, 3)


def test_analyze_runs_on_the_device_and_says_so(tagged):
    from si_compress.analysis import analyze

    m = _probe()
    r = analyze(m, _loader(n=40), layers=["features.2", "features.5"], order=1, device="cpu")
    _moved(m, 5)
    assert r.settings["device"] == "cpu"


def test_train_head_and_finetune_run_on_the_device(tagged):
    from si_compress.compress import finetune, train_head

    m, teacher = _probe(), _probe()
    train_head(m, _loader(), epochs=1, device="cpu")
    _moved(m, 3)
    m.seen = []
    finetune(m, _loader(), epochs=1, teacher=teacher, device="cpu")
    _moved(m, 3)
    _moved(teacher, 3)          # the teacher's logits come from the same moved batches


def test_compensation_runs_on_the_device(tagged):
    from si_compress.compress import recalibrate_bn, reconstruct, refit_consumers, refit_head

    base = _probe()
    for run in (lambda p: refit_consumers(p, base, _plan(), _loader(), device="cpu"),
                lambda p: refit_head(p, base, _loader(), device="cpu"),
                lambda p: recalibrate_bn(p, _loader(), device="cpu"),
                lambda p: reconstruct(p, base, _loader(), steps=3, targets="both", bf16=False, device="cpu")):
        base.seen = []
        p = _pruned(base)
        run(p)
        _moved(p, 3)
        if run is not None and base.seen:          # the base's targets come from moved batches too
            assert CPU in base.seen


@pytest.mark.parametrize("case", ["refit+bn, head", "refit+reconstruct, finetune", "truncated"])
def test_pipeline_hands_every_stage_the_configured_device(monkeypatch, case):
    """execute() passes the resolved config.device to each stage it runs (spied), records it in its
    metrics, and returns the model on the CPU."""
    import si_compress.compress as C
    from si_compress.pipeline import CompressConfig, execute

    got = {}
    for name in ("evaluate", "refit_consumers", "refit_head", "recalibrate_bn", "reconstruct", "train_head",
                 "finetune"):
        real = getattr(C, name)

        def spy(*a, _real=real, _name=name, **k):
            got.setdefault(_name, []).append(k.get("device"))
            return _real(*a, **k)
        monkeypatch.setattr(C, name, spy)
    kw = {"refit+bn, head": dict(compensation="refit+bn", head_only=True, head_epochs=1),
          "refit+reconstruct, finetune": dict(compensation="refit+reconstruct", reconstruct_steps=2,
                                              finetune_epochs=1, finetune_steps=2),
          "truncated": dict(compensation="refit", head_epochs=1)}[case]
    plan = _plan() if case != "truncated" else CompressionPlan(arch="probe", num_classes=2, truncate_after="features.5")
    base = _probe() if case != "truncated" else _Plain(_probe())   # torch.fx traces the cut: no checks
    small, m = execute(base, plan, example_input=torch.zeros(1, 3, 8, 8), calib_loader=_loader(),
                       test_loader=_loader(seed=1), train_loader=_loader(seed=2),
                       config=CompressConfig(device="cpu", **kw))
    want = {"refit+bn, head": {"evaluate", "refit_consumers", "recalibrate_bn", "train_head"},
            "refit+reconstruct, finetune": {"evaluate", "refit_consumers", "reconstruct", "finetune"},
            "truncated": {"evaluate", "refit_head", "train_head"}}[case]
    assert want <= set(got), got
    assert all(d == CPU for calls in got.values() for d in calls), got
    assert m["device"] == "cpu" and D.model_device(small) == CPU


def test_si_plan_hands_the_device_to_feature_collection(monkeypatch):
    import si_compress.analysis as A
    import si_compress.structure as S
    from si_compress.pipeline import CompressConfig, si_plan

    got = []
    for mod, name in ((A, "analyze"), (S, "collect_filter_groups")):
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **k):
            got.append((_name, k.get("device")))
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, spy)
    base = _probe()
    si_plan(base, _loader(n=40), arch="probe", num_classes=2, example_input=torch.zeros(1, 3, 8, 8),
            config=CompressConfig(device="cpu", objective="macs", truncate=False, target_macs=0.7, round_to=2))
    assert {n for n, _ in got} == {"analyze", "collect_filter_groups"}
    assert all(d == CPU for _, d in got), got
