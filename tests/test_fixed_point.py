"""Fixed-point quantization, calibration, STE, BN folding and fake-quant modules."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from si_compress.quant import (
    FakeQuantConv2d,
    FakeQuantLinear,
    QuantSpec,
    calibrate_scale,
    calibrating,
    dequantize,
    fake_quantize,
    find_conv_bn_pairs,
    fixed_point_format,
    fold_bn,
    fold_bn_model,
    pow2_scale,
    prepare_qat,
    qrange,
    quantize,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- ranges and validation
def test_qrange():
    assert qrange(8) == (-127, 127)
    assert qrange(2) == (-1, 1)
    assert qrange(4, signed=False) == (0, 15)


@pytest.mark.parametrize("bits", [1, 9, 0, -3, 4.0, True, "8", None])
def test_invalid_bits_raise_value_error(bits):
    with pytest.raises(ValueError, match="bits"):
        qrange(bits)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)
    with pytest.raises(ValueError, match="bits"):
        calibrate_scale(torch.randn(10), bits)


def test_quant_spec_validation():
    with pytest.raises(ValueError, match="method"):
        QuantSpec(method="max")
    with pytest.raises(ValueError, match="percentile"):
        QuantSpec(percentile=0)
    with pytest.raises(ValueError, match="axis"):
        QuantSpec(axis=1.5)
    spec = QuantSpec(bits=4, axis=0)
    with pytest.raises(Exception):
        spec.bits = 8  # frozen
    x = torch.randn(3, 5, generator=_gen())
    s = spec.calibrate(x)
    assert s.shape == (3,)
    assert torch.equal(spec.dequantize(spec.quantize(x, s), s), spec.fake_quantize(x, s))


def test_calibrate_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        calibrate_scale(torch.tensor([1.0, math.nan]), 8)
    with pytest.raises(TypeError):
        calibrate_scale(torch.arange(4), 8)
    with pytest.raises(ValueError, match="axis"):
        calibrate_scale(torch.randn(2, 3), 8, axis=2)
    with pytest.raises(ValueError, match="method"):
        calibrate_scale(torch.randn(4), 8, method="l2")


# ---------------------------------------------------------------- quantize / dequantize
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_error_bound_and_saturation(bits):
    x = torch.randn(4000, generator=_gen(bits)) * 3
    scale = torch.tensor(0.05)
    qmin, qmax = qrange(bits)
    q = quantize(x, scale, bits)
    assert q.dtype == torch.int32
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (x - dequantize(q, scale)).abs()
    inside = (x >= qmin * scale) & (x <= qmax * scale)
    assert inside.any() and (~inside).any()
    assert (err[inside] <= scale / 2 + 1e-7).all()
    # beyond the range values saturate at the end points
    assert (q[x > qmax * scale] == qmax).all()
    assert (q[x < qmin * scale] == qmin).all()


def test_round_half_to_even():
    q = quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), 1.0, 8)
    assert q.tolist() == [0, 2, 2, 0, -2]


def test_unsigned_grid():
    x = torch.tensor([-1.0, 0.0, 3.2, 100.0])
    q = quantize(x, 0.1, 8, signed=False)
    assert q.tolist() == [0, 0, 32, 255]


def test_per_channel_shapes():
    x = torch.randn(6, 3, 5, 5, generator=_gen())
    x[2] *= 10
    for axis in (0, 1, -1):
        s = calibrate_scale(x, 8, axis=axis)
        assert s.shape == (x.shape[axis],)
        q = quantize(x, s, 8, axis=axis)
        assert q.shape == x.shape
        assert dequantize(q, s, axis=axis).shape == x.shape
    s0 = calibrate_scale(x, 8, axis=0)
    assert s0[2] > 5 * s0[0]
    # the max of every channel maps to qmax exactly
    q = quantize(x, s0, 8, axis=0)
    assert (q.abs().reshape(6, -1).amax(dim=1) == 127).all()
    assert calibrate_scale(x, 8).shape == ()
    with pytest.raises(ValueError, match="axis"):
        quantize(x, s0, 8)
    with pytest.raises(ValueError, match="channels"):
        quantize(x, s0, 8, axis=1)


def test_calibration_methods_on_heavy_tailed_data():
    x = torch.distributions.StudentT(2.0).sample((20000,))
    s_mm = calibrate_scale(x, 4, method="minmax")
    s_pc = calibrate_scale(x, 4, method="percentile", percentile=99.0)
    s_mse = calibrate_scale(x, 4, method="mse")
    assert torch.isclose(s_mm, x.abs().max() / 7)
    assert s_pc < s_mm and s_mse <= s_mm

    def mse(s):
        return ((fake_quantize(x, s, 4) - x) ** 2).mean()

    assert mse(s_mse) < mse(s_mm)
    assert torch.isclose(calibrate_scale(x, 4, method="percentile", percentile=100.0), s_mm)


def test_zero_tensor_gets_unit_scale():
    assert calibrate_scale(torch.zeros(5), 8).item() == 1.0
    s = calibrate_scale(torch.zeros(3, 4), 8, axis=0, method="mse")
    assert torch.equal(s, torch.ones(3))


# ---------------------------------------------------------------- STE
def test_ste_gradient_clipped():
    scale = 0.1
    x = torch.linspace(-20, 20, 401, dtype=torch.float64).requires_grad_()
    y = fake_quantize(x, scale, 8)
    y.sum().backward()
    inside = (x.detach() >= -127 * scale) & (x.detach() <= 127 * scale)
    assert torch.equal(x.grad, inside.double())
    assert x.grad[inside].eq(1).all() and x.grad[~inside].eq(0).all()
    assert (~inside).any()


# ---------------------------------------------------------------- Qm.n and pow2 scales
def test_fixed_point_format_and_pow2_scale():
    assert fixed_point_format(2.0**-4, 8) == (3, 4)
    assert fixed_point_format(torch.tensor(2.0**-7), 8) == (0, 7)
    assert fixed_point_format(2.0**-10, 8) == (-3, 10)
    assert fixed_point_format(2.0**-4, 8, signed=False) == (4, 4)
    with pytest.raises(ValueError, match="pow2_scale"):
        fixed_point_format(0.3, 8)
    s = torch.tensor([0.3, 0.25, 0.7, 3.0])
    assert pow2_scale(s).tolist() == [0.5, 0.25, 1.0, 4.0]
    assert pow2_scale(s, rounding="floor").tolist() == [0.25, 0.25, 0.5, 2.0]
    assert pow2_scale(s, rounding="nearest").tolist() == [0.25, 0.25, 0.5, 4.0]
    with pytest.raises(ValueError, match="rounding"):
        pow2_scale(s, rounding="up")
    with pytest.raises(ValueError):
        pow2_scale(torch.tensor([0.0]))
    m, n = fixed_point_format(pow2_scale(0.0123), 8)
    assert 2.0**-n >= 0.0123


# ---------------------------------------------------------------- BN folding
def _random_bn(c, gen):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen))
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.1)
    return bn


@pytest.mark.parametrize("bias,groups,stride", [(False, 1, 1), (True, 2, 2)])
def test_fold_bn_equivalence(bias, groups, stride):
    gen = _gen(1)
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, (3, 2), stride=stride, padding=1, groups=groups, bias=bias)
    bn = _random_bn(6, gen)
    seq = nn.Sequential(conv, bn).eval()
    x = torch.randn(3, 4, 9, 8, generator=gen)
    folded = fold_bn(conv, bn).eval()
    assert folded.bias is not None
    with torch.no_grad():
        assert torch.allclose(folded(x), seq(x), atol=1e-5, rtol=1e-5)


def test_fold_bn_validation():
    with pytest.raises(ValueError, match="features"):
        fold_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="running"):
        fold_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(TypeError):
        fold_bn(nn.Linear(3, 4), nn.BatchNorm2d(4))


class _BasicBlock(nn.Module):
    """CIFAR ResNet basic block: conv1/bn1, conv2/bn2 and a Sequential(conv, bn) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(_BasicBlock(4, 8, 2))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(x.mean(dim=(2, 3)))


def _randomize_bns(model, seed=2):
    gen = _gen(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.load_state_dict(_random_bn(m.num_features, gen).state_dict())
    return model


def test_fold_bn_model_cifar_block():
    torch.manual_seed(0)
    model = _randomize_bns(_TinyNet()).eval()
    pairs = find_conv_bn_pairs(model)
    assert sorted(pairs) == sorted([("conv1", "bn1"), ("layer1.0.conv1", "layer1.0.bn1"),
                                    ("layer1.0.conv2", "layer1.0.bn2"),
                                    ("layer1.0.shortcut.0", "layer1.0.shortcut.1")])
    x = torch.randn(2, 3, 8, 8, generator=_gen(3))
    folded = fold_bn_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)
    traced = fold_bn_model(model, example_input=x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in traced.modules())
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-5, rtol=1e-5)


class _PreActBlock(nn.Module):
    """bn1 runs before conv1: the naming rule would mis-pair it; tracing must not."""

    def __init__(self, c):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        return self.conv2(F.relu(self.bn2(out)))


def test_fold_bn_model_traced_preactivation():
    torch.manual_seed(0)
    model = _randomize_bns(_PreActBlock(4)).eval()
    x = torch.randn(2, 4, 6, 6, generator=_gen(4))
    folded = fold_bn_model(model, example_input=x)
    # only conv1 -> bn2 is a real conv->bn edge
    assert isinstance(folded.bn2, nn.Identity) and isinstance(folded.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- fake-quant modules
def test_fake_quant_conv_ptq_and_qat_gradient():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    fq = FakeQuantConv2d.from_float(conv, weight_bits=4, act_bits=8)
    x = torch.randn(2, 3, 7, 7, generator=_gen(5))
    with pytest.raises(RuntimeError, match="calibrating"):
        fq(x)
    with torch.no_grad(), calibrating(fq):
        fq(x)
    assert not fq.act_quant.observing and fq.act_quant.calibrated
    lo, hi = fq.act_quant.min_val.item(), fq.act_quant.max_val.item()
    fq(x * 10)  # frozen: range does not move
    assert (fq.act_quant.min_val.item(), fq.act_quant.max_val.item()) == (lo, hi)
    # close to float at 8-bit activations / 4-bit weights, and equal to a manual fake-quant conv
    y = fq(x)
    s_w = calibrate_scale(conv.weight, 4, axis=0)
    w_q = fake_quantize(conv.weight, s_w, 4, axis=0)
    x_q = fake_quantize(x, fq.act_quant.scale(), 8)
    assert torch.allclose(y, F.conv2d(x_q, w_q, conv.bias, padding=1), atol=1e-6)
    # QAT: gradient flows to the weights
    y.pow(2).sum().backward()
    assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0
    assert fq.bias.grad is not None


def test_fake_quant_linear_and_unsigned_activations():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    fq = FakeQuantLinear.from_float(lin, weight_bits=8, act_bits=8)
    x = torch.rand(4, 6, generator=_gen(6))  # non-negative -> unsigned grid
    with calibrating(fq):
        fq(x)
    assert not fq.act_quant.signed
    y = fq(x)
    assert torch.allclose(y, lin(x), atol=2e-2)
    y.sum().backward()
    assert fq.weight.grad.abs().sum() > 0


def test_prepare_qat_swaps_and_keeps_edges_at_8_bits():
    torch.manual_seed(0)
    model = fold_bn_model(_randomize_bns(_TinyNet()).eval())
    qat = prepare_qat(model, weight_bits=4, act_bits=6)
    convs = {n: m for n, m in qat.named_modules() if isinstance(m, FakeQuantConv2d)}
    lins = {n: m for n, m in qat.named_modules() if isinstance(m, FakeQuantLinear)}
    assert set(convs) == {"conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.shortcut.0"}
    assert set(lins) == {"fc"}
    assert convs["conv1"].weight_bits == 8 and convs["conv1"].act_quant.bits == 8
    assert lins["fc"].weight_bits == 8
    assert convs["layer1.0.conv2"].weight_bits == 4 and convs["layer1.0.conv2"].act_quant.bits == 6
    assert not any(isinstance(m, FakeQuantConv2d) for m in model.modules())
    x = torch.randn(4, 3, 8, 8, generator=_gen(7))
    with torch.no_grad(), calibrating(qat):
        qat(x)
    qat.train()
    loss = F.cross_entropy(qat(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(m.weight.grad is not None for m in convs.values())
    with torch.no_grad():
        rel = (qat.eval()(x) - model(x)).norm() / model(x).norm()
    assert rel < 0.3
    same = prepare_qat(model, weight_bits=4, first_last_bits=None)
    assert dict(same.named_modules())["conv1"].weight_bits == 4
    with pytest.raises(ValueError, match="weight_bits"):
        prepare_qat(model, weight_bits=9)
    with pytest.raises(ValueError, match="weight_format"):
        prepare_qat(model, weight_format="fp4")


def test_prepare_qat_pot_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    qat = prepare_qat(model, weight_bits=4, weight_format="pot")
    mid = qat[2]
    w = mid.quantized_weight().detach()
    ratio = (w.abs() / w.abs().amax(dim=(1, 2, 3), keepdim=True))[w != 0]
    log2 = torch.log2(ratio)
    assert torch.allclose(log2, log2.round(), atol=1e-5)
    mid.quantized_weight().sum().backward()
    assert torch.equal(mid.weight.grad, torch.ones_like(mid.weight))
