"""Quantization entry points: int8 (x86 FX), fake-quant / QAT modes, percentile pruning and its
dynamic search, packed storage. Tiny models; the real ResNet-20 only in a slow test."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from si_compress.quant.engine_torch import check_fx_traceable, is_int8_model, load_int8, quantize_int8, save_int8
from si_compress.models import cifar_resnet
from si_compress.quant import FakeQuantConv2d, ShiftAddConv2d, prepare_qat
from si_compress.quant.api import (
    QuantConfig,
    apply_masks,
    compare_latency,
    dynamic_percentile_search,
    holding_masks,
    percentile_prune,
    quantize_model,
)
from si_compress.quant.storage import load_packed, pack_bits, save_packed, size_on_disk, unpack_bits


class TinyNet(nn.Module):
    """conv-bn-relu x2 + residual add + pool + linear: the patterns int8 FX must handle."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8, 4)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)) + h)
        return self.linear(self.pool(h).flatten(1))


def _trained_bn(model, seed=0):
    """Give BatchNorms non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return _trained_bn(TinyNet())


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 8, 8, generator=g)
    return x


# ----------------------------------------------------------------------------- int8 (x86 FX)
def test_int8_close_to_fp32_on_tiny_net(tiny, data):
    q = quantize_int8(tiny, data, method="minmax")
    assert is_int8_model(q) and not is_int8_model(tiny)
    with torch.no_grad():
        ref, out = tiny(data), q(data)
    err = (out - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


@pytest.mark.parametrize("method", ["mse", "percentile"])
def test_int8_calibration_methods_run(tiny, data, method):
    q = quantize_int8(tiny, data, method=method)
    with torch.no_grad():
        assert torch.isfinite(q(data)).all()


def _int8_input_scale(q) -> float:
    """Scale of the quantize node in front of the first conv of a converted FX int8 model."""
    names = [n for n, _ in q.named_buffers() if n.endswith("input_scale_0")] + \
        [n for n in dir(q) if n.endswith("input_scale_0")]
    assert names, "no input scale in the converted model"
    return float(getattr(q, sorted(names)[0]))


def test_int8_calibration_reads_every_batch_up_to_max_samples(tiny, data):
    """The torch engine observes every calibration batch (not only the first) up to max_samples."""
    big = data.clone()
    big[-1, 0, 0, 0] = 25.0  # the widest input range is in the last batch
    loader = DataLoader(TensorDataset(torch.cat([data * 0.1, big]), torch.zeros(128)), batch_size=32)
    all_of_it = quantize_int8(tiny, loader, method="minmax", max_samples=128)
    first_half = quantize_int8(tiny, loader, method="minmax", max_samples=64)
    assert _int8_input_scale(all_of_it) > 5 * _int8_input_scale(first_half)
    assert _int8_input_scale(all_of_it) * 255 >= 25.0   # uint8 activations span the outlier


@pytest.mark.parametrize("method,observer", [("minmax", "MinMaxObserver"), ("mse", "HistogramObserver"),
                                             ("percentile", "PercentileObserver")])
def test_int8_calibration_method_reaches_the_observer(tiny, data, monkeypatch, method, observer):
    """QuantConfig(calibration=...) through quantize_model -> quantize_int8 -> prepare_fx: each method gets its
    own activation observer ("mse" is torch's HistogramObserver, never a silent min/max)."""
    import torch.ao.quantization.quantize_fx as qfx

    real, seen = qfx.prepare_fx, []

    def spy(model, mapping, *a, **k):
        seen.append(type(mapping.global_qconfig.activation()).__name__)
        return real(model, mapping, *a, **k)
    monkeypatch.setattr(qfx, "prepare_fx", spy)
    quantize_model(tiny, QuantConfig(mode="int8", int8_engine="torch", calibration=method, calibration_samples=32),
                   data)
    assert seen == [observer]


def test_calibrate_scale_mse_clips_heavy_tails():
    """4-bit "mse" picks a clipping ratio well below 1 on heavy-tailed values, with a lower error than
    min/max (it must not fall back to min/max) and never a larger scale."""
    from si_compress.quant.primitives import calibrate_scale, dequantize, quantize

    v = torch.randn(20000, generator=torch.Generator().manual_seed(0)) ** 3
    s_minmax = calibrate_scale(v, 4, method="minmax")
    s_mse = calibrate_scale(v, 4, method="mse")
    assert float(s_mse) < 0.7 * float(s_minmax)
    err = {k: float(((dequantize(quantize(v, s, 4), s) - v) ** 2).mean()) for k, s in
           (("minmax", s_minmax), ("mse", s_mse))}
    assert err["mse"] < 0.8 * err["minmax"], err
    w = v.reshape(100, 200)                       # per channel: every row clipped below its own min/max
    assert (calibrate_scale(w, 4, method="mse", axis=0) < calibrate_scale(w, 4, method="minmax", axis=0)).all()


def test_activation_calibration_reads_every_batch_and_mse_clips(tiny, data):
    """Fake-quant activation ranges: every batch up to calibration_samples is observed (the widest
    range is in the last one), and "mse" / "percentile" clip a heavy-tailed input below min/max."""
    big = data.clone()
    big[-1, 0, 0, 0] = 25.0
    loader = DataLoader(TensorDataset(torch.cat([data * 0.1, big]), torch.zeros(128)), batch_size=32)

    def input_range(res):
        return float(next(m for m in res.model.modules() if hasattr(m, "act_quant")).act_quant.max_val)

    every = quantize_model(tiny, QuantConfig(mode="int4", calibration="minmax", calibration_samples=128), loader)
    half = quantize_model(tiny, QuantConfig(mode="int4", calibration="minmax", calibration_samples=64), loader)
    assert input_range(every) >= 25.0 > 5 * input_range(half)
    heavy = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)) ** 3
    first = {}
    for method in ("minmax", "mse", "percentile"):
        res = quantize_model(tiny, QuantConfig(mode="int4", calibration=method, percentile=99.0), heavy)
        first[method] = float(next(m for m in res.model.modules() if hasattr(m, "act_quant")).act_quant.scale())
    assert first["percentile"] < first["mse"] < 0.98 * first["minmax"], first


def test_cifar_resnet_is_fx_traceable_and_int8_converts(tmp_path):
    torch.manual_seed(0)
    m = _trained_bn(cifar_resnet(20))
    gm = check_fx_traceable(m)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x), m(x))
    q = quantize_int8(m, x, method="minmax")
    path = save_int8(q, tmp_path / "m.ts", x[:1])
    loaded = load_int8(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))  # TorchScript round trip, other batch size than traced


def test_int8_rejects_untraceable_and_empty(data):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="not torch.fx traceable"):
        quantize_int8(Branchy(), data)
    with pytest.raises(ValueError, match="no samples"):
        quantize_int8(TinyNet().eval(), [])
    with pytest.raises(ValueError, match="method"):
        quantize_int8(TinyNet().eval(), data, method="kl")


# ----------------------------------------------------------------------------- quantize_model
def test_quant_config_validation():
    with pytest.raises(ValueError, match="mode"):
        QuantConfig(mode="int3")
    with pytest.raises(ValueError, match="post-training only"):
        QuantConfig(mode="int8", qat_epochs=1)
    with pytest.raises(ValueError, match="shiftadd"):
        QuantConfig(mode="int4", shiftadd=True)
    with pytest.raises(ValueError, match="calibration"):
        QuantConfig(calibration="kl")


@pytest.mark.parametrize("mode,kind,fmt", [("int4", "fake-quant-int4", "int"), ("pot4", "fake-quant-pot4", "pot"),
                                           ("apot4", "fake-quant-apot4", "apot2")])
def test_quantize_model_fake_modes(tiny, data, mode, kind, fmt):
    res = quantize_model(tiny, QuantConfig(mode=mode, calibration="mse", calibration_samples=32), data)
    assert res.kind == kind and res.details["calibration_samples"] == 32
    convs = [m for m in res.model.modules() if isinstance(m, FakeQuantConv2d)]
    assert [c.weight_format for c in convs] == ["int", fmt]  # first conv stays 8-bit int
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())  # folded
    # 4-bit conv2 (72*8 = 576 weights) with 8-bit conv1 (216) and linear (32)
    assert res.bits_per_weight == pytest.approx((216 * 8 + 576 * 4 + 32 * 8) / (216 + 576 + 32))
    with torch.no_grad():
        ref, out = tiny(data), res.model(data)
    assert (out - ref).abs().max() < 0.5 * ref.abs().max()


def test_quantize_model_int8_and_shiftadd(tiny, data):
    res = quantize_model(tiny, QuantConfig(mode="int8", calibration="minmax", int8_engine="torch"), data)
    assert res.kind == "int8-x86" and res.bits_per_weight == 8.0
    sa = quantize_model(tiny, QuantConfig(mode="pot4", shiftadd=True, calibration="minmax"), data)
    assert sa.kind == "shiftadd-pot4"
    assert sum(isinstance(m, ShiftAddConv2d) for m in sa.model.modules()) == 1
    with torch.no_grad():
        assert torch.isfinite(sa.model(data[:4])).all()


def test_activation_calibration_methods_order(tiny, data):
    """percentile and MSE scales never exceed the min-max scale."""
    ranges = {}
    for method in ("minmax", "percentile", "mse"):
        res = quantize_model(tiny, QuantConfig(mode="int4", calibration=method, percentile=99.0), data)
        ranges[method] = [float(m.act_quant.scale()) for m in res.model.modules() if hasattr(m, "act_quant")]
    for a, b in zip(ranges["minmax"], ranges["percentile"]):
        assert b <= a + 1e-6
    for a, b in zip(ranges["minmax"], ranges["mse"]):
        assert b <= a + 1e-6


def test_qat_gradients_flow_through_pot4_fake_quant(tiny, data):
    res = quantize_model(tiny, QuantConfig(mode="pot4", calibration="minmax"), data)
    model = res.model.train()
    loss = F.cross_entropy(model(data), torch.arange(64) % 4)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith("weight"):
            assert p.grad.abs().sum() > 0, name


def test_quantize_model_qat_changes_weights_and_keeps_masks(tiny, data):
    labels = torch.arange(64) % 4
    loader = DataLoader(TensorDataset(data, labels), batch_size=16, shuffle=True)
    work = copy.deepcopy(tiny)
    masks = percentile_prune(work, 50.0, hold=False)
    res = quantize_model(work, QuantConfig(mode="pot4", qat_epochs=1, lr=0.01, calibration="minmax"), data,
                         train_loader=loader, masks=masks)
    assert len(res.details["qat_history"]) == 1
    w = res.model.conv2.weight
    assert torch.equal(w == 0, ~masks.masks["conv2.weight"])  # exactly the pruned ones are zero
    with pytest.raises(ValueError, match="train_loader"):
        quantize_model(tiny, QuantConfig(mode="int4", qat_epochs=1), data)


# ----------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_percentile_prune_sparsity_is_exact(tiny, scope):
    res = percentile_prune(tiny, 70.0, scope=scope)
    n = sum(m.weight.numel() for m in tiny.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    zeros = sum(int((m.weight == 0).sum()) for m in tiny.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    if scope == "global":
        assert zeros == round(0.7 * n)
    else:
        for name, mask in res.masks.items():
            assert int((~mask).sum()) == round(0.7 * mask.numel()), name
    assert res.sparsity == pytest.approx(zeros / n)
    res.release()


def test_percentile_prune_global_removes_smallest(tiny):
    before = torch.cat([m.weight.detach().abs().reshape(-1) for m in tiny.modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear))])
    res = percentile_prune(tiny, 40.0)
    kept = torch.cat([m.reshape(-1) for m in res.masks.values()])
    assert before[~kept].max() <= before[kept].min()


def test_masks_persist_through_sgd_steps(tiny, data):
    res = percentile_prune(tiny, 60.0, hold=True)
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    tiny.train()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(tiny(data), torch.arange(64) % 4).backward()
        opt.step()
    for name, p in tiny.named_parameters():
        if name in res.masks:
            assert torch.all(p[~res.masks[name]] == 0), name
            assert torch.any(p[res.masks[name]] != 0), name
    res.release()
    # without hooks the zeros would move: holding_masks restores them on a copy
    clone = copy.deepcopy(tiny)
    with holding_masks(clone, res):
        opt2 = torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9)
        opt2.zero_grad()
        F.cross_entropy(clone(data), torch.arange(64) % 4).backward()
        opt2.step()
    assert torch.all(clone.conv2.weight[~res.masks["conv2.weight"]] == 0)


def test_prune_validation(tiny):
    with pytest.raises(ValueError, match="percentile"):
        percentile_prune(tiny, 100)
    with pytest.raises(ValueError, match="scope"):
        percentile_prune(tiny, 10, scope="filter")
    with pytest.raises(ValueError, match="not Conv2d"):
        percentile_prune(tiny, 10, layers=["bn1"])
    with pytest.raises(ValueError, match="no parameter"):
        apply_masks(tiny, {"nope.weight": torch.ones(1, dtype=torch.bool)})


def test_dynamic_search_schedule_on_synthetic_accuracy(tiny):
    """Accuracy holds up to 73% sparsity: raise 50 -> 60 -> 70 -> 80 (drops), bisect 75 (drops),
    72.5 (holds), 73.75 (drops): stop with hi - lo = 1.25 <= min_step."""
    finetuned = []

    def eval_fn(model):
        zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        return 0.9 if zeros / n <= 0.73 else 0.5

    res = dynamic_percentile_search(tiny, eval_fn=eval_fn, finetune_fn=lambda m: finetuned.append(1), start=50,
                                    step=10, tolerance=0.005, min_step=1.25)
    assert [h["percentile"] for h in res.history] == [50, 60, 70, 80, 75, 72.5, 73.75]
    assert [h["accepted"] for h in res.history] == [True, True, True, False, False, True, False]
    assert res.percentile == 72.5 and res.accuracy == 0.9 and res.baseline_accuracy == 0.9
    assert len(finetuned) == 7
    assert res.sparsity == pytest.approx(0.725, abs=0.002)
    assert all((m.weight != 0).all() for m in tiny.modules() if isinstance(m, nn.Conv2d))  # input untouched


def test_dynamic_search_caps_and_first_failure(tiny):
    res = dynamic_percentile_search(tiny, eval_fn=lambda m: 1.0, start=90, step=10, max_percentile=95)
    assert [h["percentile"] for h in res.history] == [90, 95]
    res = dynamic_percentile_search(tiny, eval_fn=lambda m: 1.0, baseline=2.0, start=40, step=10, min_step=5)
    assert [h["percentile"] for h in res.history] == [40, 20, 10, 5]
    assert res.percentile == 0.0 and not res.masks


# ----------------------------------------------------------------------------- storage
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 16, 32])
def test_pack_bits_round_trip_and_size(bits, rng):
    n = 101
    codes = rng.integers(0, 2**bits, n, dtype=np.uint64).astype(np.uint32)
    buf = pack_bits(codes, bits)
    assert buf.size == -(-n * bits // 8)
    np.testing.assert_array_equal(unpack_bits(buf, bits, n), codes)


@pytest.mark.parametrize("fmt,bits", [("int", 8), ("int", 4), ("int", 2), ("pot", 4), ("apot2", 4)])
@pytest.mark.parametrize("sparse", ["dense", "bitmap", "delta", "auto"])
def test_packed_round_trip_equals_dequantized_weights(tiny, tmp_path, fmt, bits, sparse):
    from si_compress.quant import fold_bn_model

    model = fold_bn_model(tiny)
    percentile_prune(model, 80.0, hold=False)
    q = prepare_qat(model, weight_bits=bits, weight_format=fmt, first_last_bits=None)
    rep = save_packed(tmp_path / "w.siqp", q, sparse=sparse)
    state = load_packed(tmp_path / "w.siqp")
    for name, m in q.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            torch.testing.assert_close(state[f"{name}.weight"], m.quantized_weight().detach(), rtol=1e-6, atol=1e-7)
            assert torch.equal(state[f"{name}.bias"], m.bias.detach())
    assert rep.size_bytes == size_on_disk(tmp_path / "w.siqp")
    assert rep.sparsity >= 0.8 - 0.002  # quantization may round more weights to zero, never fewer
    if sparse == "auto":
        dense = save_packed(tmp_path / "d.siqp", q, sparse="dense")
        assert rep.weight_bytes <= dense.weight_bytes


def test_packed_size_accounting(tmp_path):
    """Dense 4-bit: n/2 bytes of codes + 4 bytes per channel; bitmap: + n/8 bytes, nonzero codes only."""
    lin = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 64))
    model = nn.Sequential(lin)
    rep = save_packed(tmp_path / "a.siqp", model, bits=4, first_last_bits=None, sparse="dense")
    (layer,) = rep.layers
    assert (layer.code_bytes, layer.index_bytes, layer.scale_bytes) == (512, 0, 64)
    assert rep.bits_per_weight == pytest.approx(8 * 576 / 1024)
    assert rep.size_bytes == rep.header_bytes + rep.weight_bytes + rep.raw_bytes
    percentile_prune(model, 75.0, hold=False)
    rep = save_packed(tmp_path / "b.siqp", model, bits=4, first_last_bits=None, sparse="bitmap")
    (layer,) = rep.layers
    assert (layer.code_bytes, layer.index_bytes) == (128, 128)
    # float32 layers with sparsity: the sparse format alone
    rep = save_packed(tmp_path / "c.siqp", model, bits=None, sparse="auto")
    assert rep.layers[0].fmt == "float32" and rep.layers[0].code_bytes == 256 * 4
    torch.testing.assert_close(load_packed(tmp_path / "c.siqp")["0.weight"], lin.weight.detach())


def test_packed_int8_model_and_shiftadd_model(tiny, data, tmp_path):
    q = quantize_int8(tiny, data, method="minmax")
    rep = save_packed(tmp_path / "q.siqp", q)
    assert all(lay.bits == 8 and lay.fmt == "int" for lay in rep.layers) and len(rep.layers) == 3
    state = load_packed(tmp_path / "q.siqp")
    w = q.conv2.weight().dequantize()
    torch.testing.assert_close(state["conv2.weight"], w, rtol=1e-6, atol=1e-7)
    sa = quantize_model(tiny, QuantConfig(mode="pot4", shiftadd=True, calibration="minmax"), data).model
    rep = save_packed(tmp_path / "s.siqp", sa)
    assert [lay.fmt for lay in rep.layers] == ["int", "pot", "int"]
    state = load_packed(tmp_path / "s.siqp")
    torch.testing.assert_close(state["conv2.weight"], sa.conv2.dequantized_weight(), rtol=1e-6, atol=1e-7)
    assert "conv2.weight_shifts" not in state


def test_load_packed_rejects_other_files(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"not a packed file")
    with pytest.raises(ValueError, match="not an si_compress packed"):
        load_packed(p)
    with pytest.raises(ValueError, match="does not exist"):
        load_packed(tmp_path / "missing")


def test_compare_latency_interleaved(tiny, data):
    r = compare_latency({"a": tiny, "b": copy.deepcopy(tiny)}, data[:2], repeats=3, warmup=1)
    assert set(r) == {"a", "b"} and all(len(v["times_s"]) == 3 and v["median_s"] > 0 for v in r.values())


# ----------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_resnet20_int8_and_pot4_on_jpeg_sample():
    from _shared import require_shared

    from si_compress.compress import evaluate, preload
    from si_compress.data import balanced_indices, load_dataset
    from si_compress.models import load_model

    ckpt = require_shared("models/resnet20-cifar10-jpeg.th")
    root = require_shared("data/cifar10-jpeg")
    model = load_model(ckpt).model
    test = load_dataset(root, split="test")
    sample = preload(test.dataset, balanced_indices(test.labels, 300, seed=0))
    loader = DataLoader(sample, batch_size=100)
    calib = DataLoader(TensorDataset(sample.tensors[0][::3]), batch_size=100)
    fp32 = evaluate(model, loader)
    q8 = quantize_model(model, QuantConfig(mode="int8", calibration="minmax", calibration_samples=100), calib)
    assert evaluate(q8.model, loader) >= fp32 - 0.03
    p4 = quantize_model(model, QuantConfig(mode="pot4", calibration="mse", calibration_samples=100), calib)
    assert evaluate(p4.model, loader) >= fp32 - 0.15


# ----------------------------------------------------------------------------- CLI helper
@pytest.mark.parametrize("quant,extra", [("int8", []), ("int8", ["--int8-engine", "torch"]),
                                         ("pot4", ["--shiftadd", "--sparsity", "50"])])
def test_cli_apply_quant_metrics(tiny, data, tmp_path, quant, extra):
    import argparse

    from si_compress.cli._quant import add_quant_args, apply_quant

    p = argparse.ArgumentParser()
    add_quant_args(p)
    p.add_argument("--out")
    args = p.parse_args(["--quant", quant, "--quant-samples", "32", "--out", str(tmp_path), *extra])
    loader = DataLoader(TensorDataset(data, torch.arange(64) % 4), batch_size=32)
    m = apply_quant(args, tiny, loader, None, loader)
    kind = {"int8": "int8-onnxruntime", "int8 torch": "int8-x86", "pot4": "shiftadd-pot4"}
    assert m["kind"] == kind[quant + (" torch" if "torch" in extra else "")]
    if m["kind"] == "int8-onnxruntime":
        assert m["int8_onnx_bytes"] == (tmp_path / "model.int8.onnx").stat().st_size > 0
        assert not (tmp_path / "model.int8.ts").exists()
        lat = m["latency"]["batch1"]
        assert lat["fp32_onnx_s"] > 0 and lat["speedup_vs_fp32_onnx"] == lat["fp32_onnx_s"] / lat["quant_s"]
        assert "fp32_onnx" in m["accuracy"]
    assert m["size_on_disk_bytes"] == (tmp_path / "weights.siqp").stat().st_size
    assert 0 < m["size_on_disk_bytes"] < m["fp32_size_bytes"]
    assert set(m["accuracy"]) >= {"fp32", "quantized"} and m["latency"]["batch128"]["speedup"] > 0
    if quant == "pot4":
        from si_compress.quant.export import load_codes

        assert m["codes_path"] == str(tmp_path / "model.codes.npz")
        assert "conv2_signs" in (tmp_path / "model.codes.h").read_text()
        codes = load_codes(tmp_path / "model.codes.npz")
        assert set(codes) == {"state", "conv1", "conv2", "linear"}
        assert str(codes["conv2"]["kind"]) == "pow2"  # shift-add; first conv / last linear: 8-bit int fake-quant
        assert str(codes["conv1"]["kind"]) == "int" and int(codes["linear"]["bits"]) == 8
        assert m["codes_onnx_path"] == str(tmp_path / "model.codes.onnx")
    if "--sparsity" in extra:
        assert m["sparsity"] >= 0.5 - 0.01 and "pruned" in m["accuracy"]
    p2 = argparse.ArgumentParser()
    add_quant_args(p2)
    with pytest.raises(ValueError, match="--shiftadd"):
        apply_quant(p2.parse_args(["--quant", "int4", "--shiftadd"]), tiny, loader, None, loader)
    with pytest.raises(ValueError, match="mse is offered by --int8-engine torch"):
        apply_quant(p2.parse_args(["--quant", "int8", "--quant-calibration", "mse"]), tiny, loader, None, loader)
    with pytest.raises(ValueError, match="does not apply to --quant pot4"):
        apply_quant(p2.parse_args(["--quant", "pot4", "--quant-calibration", "entropy"]), tiny, loader, None, loader)
