"""Tests for si_compress.features: hooks, layer resolution, streamed collection and costs.

Only tiny seeded synthetic models are used (no dependency on si_compress.models).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from si_compress.features import (
    FeatureRecorder,
    collect_features,
    layer_costs,
    model_cost,
    module_macs,
    pooled_grid,
    resolve_layers,
)


# --------------------------------------------------------------------------- tiny models

class TinyBlock(nn.Module):
    """BasicBlock-like: conv-bn-relu1-conv-bn + shortcut, relu2 (explicit modules, inplace)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """conv1/bn1 stem with a functional ReLU, layer1.0, layer2.0 (stride 2), pooled linear."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(TinyBlock(4, 4))
        self.layer2 = nn.Sequential(TinyBlock(4, 8, stride=2))
        self.linear = nn.Linear(8, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class TinyPlain(nn.Module):
    """VGG-like: features Sequential with inplace ReLUs, classifier with a ReLU on vectors."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(6 * 4 * 4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class Reversed(nn.Module):
    """Registration order (b, a) differs from execution order (a, b)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(4, 4, 1)
        self.a = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.b(self.a(x))


def _seeded(cls, *args):
    torch.manual_seed(0)
    model = cls(*args)
    # Non-trivial BN statistics so eval mode differs from identity.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _loader(n=10, batch_size=4, hw=8, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, hw, hw, generator=g)
    y = torch.arange(n) % 3
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, **kw), x, y


# --------------------------------------------------------------------------- FeatureRecorder

def test_hooks_removed_when_forward_raises():
    model = _seeded(TinyResNet)
    with pytest.raises(RuntimeError):
        with FeatureRecorder(model, ["layer1.0", "linear:input"]):
            assert not _no_hooks(model)
            model(torch.zeros(1, 5, 8, 8))  # wrong channel count
    assert _no_hooks(model)


def test_hooks_removed_when_transform_raises():
    model = _seeded(TinyResNet)

    def boom(name, t):
        raise KeyError(name)

    with pytest.raises(KeyError):
        with FeatureRecorder(model, ["layer1.0"], transform=boom):
            model(torch.zeros(1, 3, 8, 8))
    assert _no_hooks(model)


def test_copies_survive_inplace_relu():
    model = _seeded(TinyPlain)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model.features[0](x)
    assert (expected < 0).any()  # the inplace ReLU after it would clear these
    with FeatureRecorder(model, ["features.0", "features.1"]) as rec, torch.no_grad():
        model(x)
        got = rec.take()
    torch.testing.assert_close(got["features.0"], expected)
    torch.testing.assert_close(got["features.1"], expected.clamp_min(0))


def test_tuple_output_and_input_capture():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, "aux"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.pair(x)[0])

    net = Net()
    x = torch.randn(3, 4)
    with FeatureRecorder(net, ["pair", "fc:input"]) as rec:
        net(x)
        got = rec.take()
    torch.testing.assert_close(got["pair"], x * 2)
    torch.testing.assert_close(got["fc:input"], x * 2)


def test_recorder_several_batches_and_errors():
    model = _seeded(TinyResNet)
    xs = [torch.randn(2, 3, 8, 8), torch.randn(5, 3, 8, 8)]
    with FeatureRecorder(model, ["layer2.0"]) as rec, torch.no_grad():
        for x in xs:
            model(x)
            assert rec.take()["layer2.0"].shape == (x.shape[0], 8, 4, 4)
        with pytest.raises(ValueError, match="did not run"):
            rec.take()
        model(xs[0])
        model(xs[0])
        with pytest.raises(ValueError, match="ran 2 times"):
            rec.take()
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="Did you mean.*layer1.0"):
        FeatureRecorder(model, ["layer1.O"])
    with pytest.raises(ValueError, match="empty"):
        FeatureRecorder(model, [])


def test_shared_module_reuse_is_reported():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(self.relu(x)))

    net = Shared()
    with FeatureRecorder(net, ["relu"]) as rec:
        net(torch.randn(1, 3, 4, 4))
        with pytest.raises(ValueError, match="reused within one forward"):
            rec.take()


# --------------------------------------------------------------------------- resolve_layers

def test_resolve_globs_and_exact_names():
    model = _seeded(TinyResNet)
    got = resolve_layers(model, ["layer2.*", "conv1"])
    assert got[0] == "conv1"  # registration order without an example input
    assert "layer2.0" in got and "layer2.0.relu2" in got and "layer2.0.shortcut.0" in got
    assert not any(n.startswith("layer1") for n in got)
    assert resolve_layers(model, "linear:input") == ["linear:input"]
    with pytest.raises(ValueError, match="matches no module"):
        resolve_layers(model, ["layer9.*"])
    with pytest.raises(ValueError, match="no module named 'lnear'"):
        resolve_layers(model, ["lnear"])


def test_resolve_execution_order_with_example_input():
    net = Reversed()
    assert resolve_layers(net, ["*"]) == ["b", "a"]
    assert resolve_layers(net, ["*"], example_input=torch.zeros(1, 3, 2, 2)) == ["a", "b"]
    assert resolve_layers(net, ["b:input", "a"], example_input=torch.zeros(1, 3, 2, 2)) == ["a", "b:input"]


def test_default_layers_residual():
    model = _seeded(TinyResNet)
    expected = ["layer1.0:input", "layer1.0", "layer2.0", "linear:input"]
    with pytest.raises(ValueError, match="example_input"):
        resolve_layers(model)   # the default is read from a traced forward pass
    assert resolve_layers(model, example_input=torch.zeros(1, 3, 8, 8)) == expected
    # The stem entry is the block's input: relu(bn1(conv1(x))), although the ReLU is functional.
    x = torch.randn(2, 3, 8, 8)
    with FeatureRecorder(model, expected) as rec, torch.no_grad():
        model(x)
        got = rec.take()
        stem = F.relu(model.bn1(model.conv1(x)))
    torch.testing.assert_close(got["layer1.0:input"], stem)
    assert got["linear:input"].shape == (2, 8)


def test_default_layers_plain():
    model = _seeded(TinyPlain)
    # the classifier input is the input of the head (its first Linear after the last conv)
    expected = ["features.1", "features.3", "classifier.0:input"]
    assert resolve_layers(model, example_input=torch.zeros(1, 3, 8, 8)) == expected
    flat = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))
    assert resolve_layers(flat, example_input=torch.zeros(1, 3, 4, 4)) == ["1", "3:input"]


def test_resolve_restores_training_mode_and_bn_stats():
    model = _seeded(TinyResNet).train()
    before = model.bn1.running_mean.clone()
    resolve_layers(model, example_input=torch.randn(4, 3, 8, 8))
    assert model.training and model.layer1[0].bn1.training
    torch.testing.assert_close(model.bn1.running_mean, before)


# --------------------------------------------------------------------------- collect_features

def test_pooled_grid_rule():
    assert pooled_grid((4, 8, 8), 4096) is None
    assert pooled_grid((4, 8, 8), 64) == 4          # 4*4*4 = 64
    assert pooled_grid((4, 8, 8), 63) == 3          # 4*3*3 = 36 <= 63 < 64
    assert pooled_grid((2, 3, 3), 17) == 2          # 2*2*2 = 8; 2*3*3 = 18 > 17
    assert pooled_grid((16, 8, 8), 15) == 1         # C > max_dim: keep C features
    assert pooled_grid((1, 2, 50), 50) == 2         # k <= min(H, W)


def test_collect_shapes_pooling_labels_predictions():
    model = _seeded(TinyResNet)
    loader, x, y = _loader(n=10, batch_size=4)
    layers = ["layer1.0:input", "layer1.0", "layer2.0", "linear:input"]
    calls = []
    fs = collect_features(model, loader, layers, max_dim=64, progress=lambda d, t: calls.append((d, t)))

    assert fs.layers == tuple(layers)
    assert fs.shapes == {"layer1.0:input": (4, 8, 8), "layer1.0": (4, 8, 8), "layer2.0": (8, 4, 4),
                         "linear:input": (8,)}
    assert fs.reductions == {"layer1.0:input": "avgpool 4x4", "layer1.0": "avgpool 4x4",
                             "layer2.0": "avgpool 2x2", "linear:input": "none"}
    assert fs.grids["layer2.0"] == (2, 2) and fs.grids["linear:input"] is None
    assert fs.dims == {"layer1.0:input": 64, "layer1.0": 64, "layer2.0": 32, "linear:input": 8}
    for name in layers:
        arr = fs.features[name]
        assert arr.dtype == np.float32 and arr.flags.c_contiguous and arr.shape == (10, fs.dims[name])
    assert fs.nbytes == 10 * (64 + 64 + 32 + 8) * 4
    assert calls == [(4, 10), (8, 10), (10, 10)]

    np.testing.assert_array_equal(fs.labels, y.numpy())
    assert fs.labels.dtype == np.int64
    with torch.no_grad():
        logits = model(x)
        with FeatureRecorder(model, layers) as rec:
            model(x)
            maps = rec.take()
    np.testing.assert_array_equal(fs.predictions, logits.argmax(1).numpy())
    assert fs.accuracy == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    # Reduced features equal F.adaptive_avg_pool2d of the full map, channel-major.
    for name, k in [("layer1.0", 4), ("layer2.0", 2)]:
        ref = F.adaptive_avg_pool2d(maps[name], k).flatten(1).numpy()
        np.testing.assert_allclose(fs.features[name], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fs.features["linear:input"], maps["linear:input"].numpy(), rtol=1e-5, atol=1e-6)


def test_collect_without_reduction_and_restores_mode():
    model = _seeded(TinyPlain).train()
    loader, x, _ = _loader(n=6, batch_size=6)
    fs = collect_features(model, loader, ["features.1"], dtype=np.float64)
    assert fs.reductions["features.1"] == "none" and fs.features["features.1"].shape == (6, 4 * 8 * 8)
    assert fs.features["features.1"].dtype == np.float64
    assert model.training
    model.eval()
    with torch.no_grad():
        ref = F.relu(model.features[0](x)).flatten(1).numpy()
    np.testing.assert_allclose(fs.features["features.1"], ref, rtol=1e-5, atol=1e-6)


def test_collect_labels_order_with_sampler_and_drop_last():
    model = _seeded(TinyResNet)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, 8, 8, generator=g)
    y = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2])
    idx = [9, 3, 7, 0, 5]
    sampler = SubsetRandomSampler(idx, generator=torch.Generator().manual_seed(0))
    order = list(iter(SubsetRandomSampler(idx, generator=torch.Generator().manual_seed(0))))
    loader = DataLoader(TensorDataset(x, y), batch_size=2, sampler=sampler)
    fs = collect_features(model, loader, ["linear:input"])
    np.testing.assert_array_equal(fs.labels, y[order].numpy())

    loader = DataLoader(TensorDataset(x, y), batch_size=5, drop_last=True)
    fs = collect_features(model, loader, ["layer2.0"])
    np.testing.assert_array_equal(fs.labels, y[:10].numpy())


def test_collect_nan_names_layer_and_batch():
    model = _seeded(TinyResNet)
    loader, x, _ = _loader(n=10, batch_size=4)
    x[5, 0, 2, 3] = float("nan")  # sample 5 is in batch 1
    model.train()
    model.layer1.eval()   # mixed modes: each module's own flag must come back, not one for all
    before = {name: m.training for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"layer 'layer1.0:input' .*NaN/Inf.* batch 1 \(samples 4\.\.7\)"):
        collect_features(model, loader, ["layer1.0:input", "layer2.0"])
    assert _no_hooks(model)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.training and not model.layer1.training


def test_collect_input_errors():
    model = _seeded(TinyResNet)
    loader, _, _ = _loader(n=4)
    with pytest.raises(ValueError, match="max_dim"):
        collect_features(model, loader, ["layer1.0"], max_dim=0)
    with pytest.raises(ValueError, match="no module named"):
        collect_features(model, loader, ["layer7"])
    with pytest.raises(ValueError, match="yielded 4 samples but 5"):
        collect_features(model, loader, ["layer1.0"], n_samples=5)
    unlabeled = DataLoader(torch.randn(4, 3, 8, 8), batch_size=2)
    with pytest.raises(ValueError, match="labels"):
        collect_features(model, unlabeled, ["layer1.0"])


# --------------------------------------------------------------------------- costs

class HandNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)               # 108 params
        self.bn = nn.BatchNorm2d(4)                                          # 8 params
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)       # 6*2*9 + 6 = 114
        self.linear = nn.Linear(6, 3)                                        # 18 + 3 = 21

    def forward(self, x):
        out = self.conv2(self.relu(self.bn(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def test_costs_exact_on_hand_computed_net():
    net = HandNet()
    ex = torch.zeros(1, 3, 8, 8)
    conv1 = 8 * 8 * 4 * 3 * 9          # 6912
    conv2 = 4 * 4 * 6 * (4 // 2) * 9   # 1728
    fc = 6 * 3                         # 18
    assert module_macs(net, ex) == {"conv1": conv1, "conv2": conv2, "linear": fc}
    assert model_cost(net, ex) == (251, conv1 + conv2 + fc)
    costs = layer_costs(net, ex, ["relu", "conv2", "linear:input", "linear"])
    assert [(c.params, c.macs) for c in costs.values()] == [
        (116, conv1), (230, conv1 + conv2), (230, conv1 + conv2), (251, conv1 + conv2 + fc)]
    assert costs["conv2"].module_macs == conv2 and costs["linear:input"].module_macs == 0
    assert costs["linear"].total_params == 251 and costs["linear"].macs_fraction == 1.0
    # Batch size does not change per-sample counts.
    assert model_cost(net, torch.zeros(3, 3, 8, 8)) == (251, conv1 + conv2 + fc)
    assert _no_hooks(net)


def test_costs_residual_blocks_cumulative():
    model = _seeded(TinyResNet)
    ex = torch.zeros(1, 3, 8, 8)
    costs = layer_costs(model, ex, ["layer1.0:input", "layer1.0", "layer2.0", "linear:input"])
    stem = costs["layer1.0:input"]
    assert stem.params == 3 * 4 * 9 + 8 and stem.macs == 8 * 8 * 4 * 3 * 9
    b1 = sum(p.numel() for p in model.layer1.parameters())
    assert costs["layer1.0"].params == stem.params + b1
    assert costs["layer1.0"].module_macs == 2 * (8 * 8 * 4 * 4 * 9)
    assert costs["linear:input"].params == stem.total_params - 8 * 3 - 3
    assert costs["linear:input"].macs == stem.total_macs - 8 * 3


def _bias_ops(m, macs):
    """torch_pruning's extra count for a bias: one add per output element (per sample)."""
    if m.bias is None:
        return 0
    if isinstance(m, nn.Linear):
        return macs // m.in_features
    return macs // ((m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])


def test_total_macs_match_torch_pruning():
    tp = pytest.importorskip("torch_pruning")
    ex = torch.zeros(1, 3, 8, 8)
    for net in [_seeded(TinyResNet), _seeded(TinyPlain), HandNet()]:
        _, tp_params, tp_layer_flops, _ = tp.utils.count_ops_and_params(net, ex, layer_wise=True)
        ours = module_macs(net, ex)
        modules = dict(net.named_modules())
        # torch_pruning also counts bias adds (one per output element) and BN/ReLU/pool ops, which
        # we leave out: compare conv + linear modules only, with its bias term removed.
        convs_linears = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert sorted(ours) == sorted(convs_linears)
        for name, macs in ours.items():
            assert tp_layer_flops[modules[name]] - _bias_ops(modules[name], macs) == macs, name
        total_params, total_macs = model_cost(net, ex)
        assert total_params == tp_params
        tp_total = sum(tp_layer_flops[modules[n]] - _bias_ops(modules[n], ours[n]) for n in convs_linears)
        assert tp_total == total_macs
