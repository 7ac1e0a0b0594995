"""Power-of-two weights, shift-add kernels (bit-exact vs multiply) and ShiftAdd modules."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from si_compress.quant import calibrating, dequantize, fixed_point_format, quantize
from si_compress.quant.shiftadd import (
    PowerOfTwoWeight,
    ShiftAddConv2d,
    ShiftAddLinear,
    conv2d_mul,
    conv2d_shift,
    convert_to_shiftadd,
    linear_mul,
    linear_shift,
    pow2_codebook,
    quantize_pow2_weight,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _is_signed_pow2_or_zero(w: torch.Tensor) -> bool:
    nz = w[w != 0].abs().double()
    mant, _ = torch.frexp(nz)
    return bool((mant == 0.5).all())


# ---------------------------------------------------------------- codebooks and weights
def test_pot_code_table():
    table = pow2_codebook(4, variant="pot").table()
    assert [m for _, m, _ in table] == [0.0] + [2.0**e for e in range(-6, 1)]
    assert pow2_codebook(2).magnitudes.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_apot2_code_table(bits):
    cb = pow2_codebook(bits, variant="apot2")
    mags = cb.magnitudes
    assert mags.shape == (2 ** (bits - 1),)
    assert len(set(mags.tolist())) == mags.size  # every code is a distinct magnitude
    for code, mag, exps in cb.table():
        assert len(exps) <= 2 and mag == sum(2.0**e for e in exps)
    assert cb.max_level == (1.0 if bits == 2 else 1.5)


@pytest.mark.parametrize("bits,variant", [(1, "pot"), (7, "pot"), (9, "apot2"), (4, "log")])
def test_invalid_bits_or_variant(bits, variant):
    with pytest.raises(ValueError):
        pow2_codebook(bits, variant=variant)
    with pytest.raises(ValueError):
        ShiftAddConv2d.from_conv(nn.Conv2d(2, 2, 3), bits=bits, variant=variant)
    with pytest.raises(ValueError):
        ShiftAddLinear.from_linear(nn.Linear(2, 2), bits=bits, variant=variant)
    with pytest.raises(ValueError, match="act_bits"):
        ShiftAddLinear.from_linear(nn.Linear(2, 2), act_bits=12)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_pot_weights_are_signed_powers_of_two(bits):
    w = torch.randn(8, 3, 3, 3, generator=_gen(bits))
    pw = quantize_pow2_weight(w, bits=bits, variant="pot")
    deq = pw.dequantize(dtype=torch.float64)
    assert deq.shape == w.shape
    w_int = deq / torch.from_numpy(pw.scale).reshape(-1, 1, 1, 1)  # integer grid: 2**shift
    assert _is_signed_pow2_or_zero(w_int)  # deq = per-channel scale * signed power of two
    assert torch.equal(w_int, torch.from_numpy(pw.integer_weight()).double())
    n_levels = 2 ** (bits - 1) - 1
    ratio = w_int[w_int != 0].abs() / 2.0 ** (n_levels - 1)  # relative to the channel's top level
    assert ratio.max() <= 1 and ratio.min() >= 2.0 ** -(n_levels - 1)
    # signs agree wherever the weight is kept; the largest weight of a channel is exact
    assert (torch.sign(deq[deq != 0]) == torch.sign(w[deq != 0])).all()
    assert torch.allclose(deq.abs().amax(dim=(1, 2, 3)), w.abs().amax(dim=(1, 2, 3)).double())
    # nearest level: each weight is at least as close to its level as to the neighbouring ones
    assert ((deq - w).abs() <= w.abs() + 1e-12).all()


def test_apot2_weights_are_two_term_sums_and_more_accurate():
    w = torch.randn(16, 32, generator=_gen(1))
    pot = quantize_pow2_weight(w, bits=4, variant="pot")
    apot = quantize_pow2_weight(w, bits=4, variant="apot2")
    assert apot.shifts.shape == (2, 16, 32)
    assert ((apot.shifts >= 0).sum(axis=0) <= 2).all()
    err = {k: ((v.dequantize(dtype=torch.float64) - w) ** 2).mean() for k, v in (("pot", pot), ("apot2", apot))}
    assert err["apot2"] < err["pot"]
    mse = quantize_pow2_weight(w, bits=4, variant="pot", method="mse")
    assert ((mse.dequantize(dtype=torch.float64) - w) ** 2).mean() <= err["pot"]
    assert (mse.scale <= pot.scale + 1e-15).all()


def test_integer_weight_matches_dequantize():
    w = torch.randn(5, 7, generator=_gen(2))
    pw = quantize_pow2_weight(w, bits=5, variant="apot2")
    wi = pw.integer_weight()
    assert wi.dtype == np.int64 and wi.min() >= -(2**31) and (wi != 0).any()
    assert np.allclose(wi * pw.scale[:, None], pw.dequantize(dtype=torch.float64).numpy(), rtol=0, atol=0)


def test_power_of_two_weight_validation():
    signs = np.ones((2, 3), np.int8)
    with pytest.raises(ValueError, match="int8"):
        PowerOfTwoWeight(np.zeros((1, 2, 3), np.int64), signs, np.ones(2), bits=4, variant="pot")
    with pytest.raises(ValueError, match="n_terms"):
        PowerOfTwoWeight(np.zeros((1, 3, 2), np.int8), signs, np.ones(2), bits=4, variant="pot")
    with pytest.raises(ValueError, match="scale"):
        PowerOfTwoWeight(np.zeros((1, 2, 3), np.int8), signs, np.ones(3), bits=4, variant="pot")
    with pytest.raises(ValueError, match="bits"):
        PowerOfTwoWeight(np.zeros((1, 2, 3), np.int8), signs, np.ones(2), bits=7, variant="pot")


# ---------------------------------------------------------------- kernels
def _random_shift_weight(rng, shape, n_terms, max_shift):
    shifts = rng.integers(-1, max_shift + 1, (n_terms, *shape)).astype(np.int8)
    signs = rng.integers(-1, 2, shape).astype(np.int8)
    return shifts, signs


def _integer_weight(shifts, signs):
    mag = np.where(shifts >= 0, np.left_shift(1, np.maximum(shifts, 0).astype(np.int64)), 0).sum(axis=0)
    return signs.astype(np.int64) * mag


CONV_CASES = [
    # (N, C, H, W), (Co, KH, KW), stride, padding, dilation, groups, n_terms
    ((3, 4, 9, 7), (6, 3, 2), 2, 1, 1, 2, 1),
    ((3, 3, 8, 11), (5, 3, 3), 1, 2, 1, 1, 2),
    ((1, 4, 7, 7), (4, 1, 3), (2, 1), (0, 2), (1, 2), 4, 1),
    ((2, 6, 10, 9), (6, 2, 3), 3, (1, 2, 0, 1), 2, 3, 2),
    ((3, 2, 5, 6), (3, 5, 1), 1, "same", 1, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_shift_is_bit_exact_with_multiply(case):
    xs, (co, kh, kw), stride, padding, dilation, groups, n_terms = case
    rng = np.random.default_rng(abs(hash(str(case))) % 2**32)
    x = rng.integers(-127, 128, xs).astype(np.int32)
    shifts, signs = _random_shift_weight(rng, (co, xs[1] // groups, kh, kw), n_terms, 9)
    w = _integer_weight(shifts, signs)
    opts = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    acc_shift = conv2d_shift(x, shifts, signs, **opts)
    acc_mul = conv2d_mul(x, w, **opts)
    assert acc_shift.dtype == np.int64 and acc_mul.dtype == np.int64
    assert np.array_equal(acc_shift, acc_mul)
    # and both equal torch's conv (float64 is exact at these magnitudes)
    if isinstance(padding, tuple) and len(padding) == 4:
        xt = F.pad(torch.from_numpy(x).double(), (padding[2], padding[3], padding[0], padding[1]))
        tpad = 0
    else:
        xt, tpad = torch.from_numpy(x).double(), padding
    ref = F.conv2d(xt, torch.from_numpy(w).double(), stride=stride, padding=tpad, dilation=dilation, groups=groups)
    assert np.array_equal(acc_mul, ref.numpy().astype(np.int64))


def _slow_conv_reference(x, w, stride, padding, dilation, groups):
    """The obvious definition: for every output pixel, the dot product of the window with the weight
    (python ints: no overflow, no reordering question). padding: (top, bottom, left, right)."""
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    sh, sw = stride
    dh, dw = dilation
    pt, pb, pl, pr = padding
    xp = np.zeros((n, c, h + pt + pb, wd + pl + pr), dtype=object)
    xp[:, :, pt:pt + h, pl:pl + wd] = x.astype(object)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, co, oh, ow), dtype=object)
    wo = w.astype(object)
    for b in range(n):
        for o in range(co):
            g = o // (co // groups)
            for i in range(oh):
                for j in range(ow):
                    win = xp[b, g * cg:(g + 1) * cg, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                             j * sw:j * sw + dw * (kw - 1) + 1:dw]
                    out[b, o, i, j] = int((win * wo[o]).sum())
    return out


ODD_CASES = [
    # (N, C, H, W), (Co, KH, KW), stride, padding (t, b, l, r), dilation, groups, n_terms
    ((2, 3, 5, 7), (4, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 1),  # 1x1
    ((3, 6, 6, 5), (6, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6, 1),  # depthwise
    ((2, 4, 9, 8), (8, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, 2),  # stride 2
    ((1, 2, 3, 3), (3, 3, 3), (1, 1), (2, 0, 0, 2), (1, 1), 1, 1),  # asymmetric pad larger than input edge
    ((5, 4, 7, 7), (4, 3, 3), (1, 2), (1, 1, 1, 1), (2, 1), 2, 2),  # pixel tiles cross images
]


@pytest.mark.parametrize("case", ODD_CASES)
@pytest.mark.parametrize("acc", ["int32", "int64"])
def test_conv_kernels_match_slow_reference(case, acc, monkeypatch):
    """Both kernels against the per-pixel definition, on the int32 path (small exponents) and on the
    int64 path (large ones), with pixel tiles of 16 so tiles cross rows and images."""
    from si_compress.quant import _kernels

    xs, (co, kh, kw), stride, padding, dilation, groups, n_terms = case
    rng = np.random.default_rng(sum(xs) * 7 + co)
    x = rng.integers(-255, 256, xs).astype(np.int32)
    x.flat[0], x.flat[-1] = 255, -255  # the extremes of the grid
    max_shift = 6 if acc == "int32" else 28  # 28: weights fit int32, sums do not
    shifts, signs = _random_shift_weight(rng, (co, xs[1] // groups, kh, kw), n_terms, max_shift)
    shifts[0].flat[0], signs.flat[0] = max_shift, -1
    w = _integer_weight(shifts, signs)
    row_sums = np.abs(w.astype(np.float64)).reshape(co, -1).sum(axis=1)
    from si_compress.quant.shiftadd import _acc_dtype

    assert _acc_dtype(x, row_sums) == (np.int32 if acc == "int32" else np.int64)
    monkeypatch.setattr(_kernels, "TILE_TARGET", 16 * xs[1] // groups * kh * kw)
    monkeypatch.setattr(_kernels, "DIRECT_TILE", 16)
    opts = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = _slow_conv_reference(x, w, stride, padding, dilation, groups)
    for got in (conv2d_shift(x, shifts, signs, **opts), conv2d_mul(x, w, **opts)):
        assert got.dtype == np.int64 and got.shape == ref.shape
        assert np.array_equal(got.astype(object), ref)


RANDOM_LAYERS = [
    # (N, C, H, W), (Co, K), stride, padding, n_terms, signed input
    ((1, 3, 5, 7), (4, 3), 1, 1, 1, False),  # batch 1, odd sizes
    ((2, 5, 9, 6), (7, 3), 2, 1, 2, True),  # stride 2, odd channel counts
    ((3, 4, 11, 13), (5, 5), 1, 2, 1, True),
    ((1, 9, 6, 6), (3, 1), 1, 0, 2, False),  # 1x1
    ((4, 2, 7, 5), (6, 3), (2, 1), (1, 0), 1, False),
    ((8, 16, 8, 8), (16, 3), 1, 1, 1, False),  # a ResNet-like block shape
    ((2, 6, 10, 10), (4, 3), 2, 0, 1, True),  # stride 2, no padding
]


@pytest.mark.parametrize("layer", RANDOM_LAYERS)
@pytest.mark.parametrize("tiles", ["default", "tiny"])
def test_conv_shift_matches_multiply_on_random_layers(layer, tiles, monkeypatch):
    """The shift kernel (Horner passes over the phase-split input, every stride) equals the integer-multiply
    kernel and the float64 conv exactly, with default tiles and with 16-pixel tiles (tiles that
    cross output rows)."""
    from si_compress.quant import _kernels

    xs, (co, k), stride, padding, n_terms, signed = layer
    if tiles == "tiny":
        monkeypatch.setattr(_kernels, "TILE_TARGET", 16 * xs[1] * k * k)
        monkeypatch.setattr(_kernels, "DIRECT_TILE", 16)
    rng = np.random.default_rng(sum(xs) * 31 + co * k)
    x = rng.integers(-128 if signed else 0, 128 if signed else 256, xs).astype(np.int32)
    shifts, signs = _random_shift_weight(rng, (co, xs[1], k, k), n_terms, 7)
    w = _integer_weight(shifts, signs)
    got = conv2d_shift(x, shifts, signs, stride=stride, padding=padding)
    assert got.dtype == np.int64
    assert np.array_equal(got, conv2d_mul(x, w, stride=stride, padding=padding))
    ref = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), stride=stride, padding=padding)
    assert np.array_equal(got, ref.numpy().astype(np.int64))


@pytest.mark.parametrize("x_val,hi_shift,acc", [(2**14, 15, np.int32), (2**15, None, np.int64)])
def test_int32_accumulator_boundary(x_val, hi_shift, acc):
    """A worst case just under 2**31 stays on int32 and is exact; exactly 2**31 needs (and gets) int64."""
    from si_compress.quant.shiftadd import _acc_dtype

    x = np.full((1, 1, 3, 3), x_val, np.int32)
    shifts = np.full((2, 1, 1, 3, 3), -1, np.int8)
    signs = np.zeros((1, 1, 3, 3), np.int8)
    shifts[0, 0, 0, 1, 1], signs[0, 0, 1, 1] = 16, 1  # the centre tap only: w = 2**16 (+ 2**hi_shift)
    if hi_shift is not None:
        shifts[1, 0, 0, 1, 1] = hi_shift
    w = _integer_weight(shifts, signs)
    assert _acc_dtype(x, np.abs(w.astype(np.float64)).reshape(1, -1).sum(axis=1)) == acc
    expect = x_val * int(w[0, 0, 1, 1])
    for sign in (1, -1):
        got = conv2d_shift(x * sign, shifts, signs, padding=1)
        assert int(got[0, 0, 1, 1]) == sign * expect and int(np.abs(got).max()) == expect
        ref = _slow_conv_reference(x * sign, w, (1, 1), (1, 1, 1, 1), (1, 1), 1)
        assert np.array_equal(got.astype(object), ref)


def test_kernels_threads_agree():
    import numba

    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (3, 8, 12, 12)).astype(np.int32)
    shifts, signs = _random_shift_weight(rng, (16, 8, 3, 3), 1, 6)
    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = conv2d_shift(x, shifts, signs, padding=1)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = conv2d_shift(x, shifts, signs, padding=1)
    finally:
        numba.set_num_threads(prev)
    assert np.array_equal(one, many)


@pytest.mark.parametrize("n,k,m,n_terms", [(3, 17, 5, 1), (1, 9, 4, 2), (7, 33, 1, 2)])
def test_linear_shift_is_bit_exact_with_multiply(n, k, m, n_terms):
    rng = np.random.default_rng(n * 100 + k)
    x = rng.integers(0, 256, (n, k)).astype(np.int32)
    shifts, signs = _random_shift_weight(rng, (m, k), n_terms, 12)
    w = _integer_weight(shifts, signs)
    acc = linear_shift(x, shifts, signs)
    assert acc.shape == (n, m)
    assert np.array_equal(acc, linear_mul(x, w))
    assert np.array_equal(acc, x.astype(np.int64) @ w.T)


def test_kernel_input_validation():
    x = np.zeros((1, 4, 5, 5), np.int32)
    shifts, signs = np.zeros((1, 2, 2, 3, 3), np.int8), np.ones((2, 2, 3, 3), np.int8)
    with pytest.raises(TypeError, match="integer"):
        conv2d_shift(x.astype(np.float32), shifts, signs)
    with pytest.raises(ValueError, match="groups"):
        conv2d_shift(x, shifts, signs, groups=1)
    with pytest.raises(ValueError, match="stride"):
        conv2d_shift(x, shifts, signs, groups=2, stride=0)
    with pytest.raises(ValueError, match="smaller"):
        conv2d_shift(x[:, :, :2, :2], shifts, signs, groups=2)
    with pytest.raises(ValueError, match="overflows"):
        linear_shift(np.full((1, 4), 2**30, np.int32), np.full((1, 2, 4), 40, np.int8), np.ones((2, 4), np.int8))


# ---------------------------------------------------------------- modules vs float fake quant
def _fake_quant_reference_conv(module: ShiftAddConv2d, conv: nn.Conv2d, x):
    s = module.act_scale.item()
    xq = dequantize(quantize(x, s, module.act_bits, signed=module.act_signed), s)
    w = module.dequantized_weight()
    return conv._conv_forward(xq, w, conv.bias)


@pytest.mark.parametrize("variant,bits,post_relu", [("pot", 4, True), ("apot2", 4, False), ("pot", 3, False)])
def test_shiftadd_conv_matches_fake_quant_float_conv(variant, bits, post_relu):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, groups=2)
    x = torch.randn(3, 4, 11, 9, generator=_gen(8))
    if post_relu:
        x = x.relu()
    m = ShiftAddConv2d.from_conv(conv, bits=bits, act_bits=8, variant=variant)
    with pytest.raises(RuntimeError, match="calibrate"):
        m(x)
    m.calibrate(x)
    assert m.act_signed == (not post_relu)
    fixed_point_format(m.act_scale, 8, signed=m.act_signed)  # a Qm.n format: power-of-two scale
    with torch.no_grad():
        y = m(x)
        ref = _fake_quant_reference_conv(m, conv, x)
        assert y.shape == conv(x).shape and y.dtype == x.dtype
    assert ((y - ref).norm() / ref.norm()).item() < 1e-4
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    # PoT at 3-4 bits is coarse but still close to the float conv
    with torch.no_grad():
        rel = ((y - conv(x)).norm() / conv(x).norm()).item()
    assert rel < 0.35


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_shiftadd_conv_padding_modes(padding_mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode, bias=False)
    x = torch.randn(2, 3, 6, 7, generator=_gen(9))
    m = ShiftAddConv2d.from_conv(conv).calibrate(x)
    ref = _fake_quant_reference_conv(m, conv, x)
    with torch.no_grad():
        assert torch.allclose(m(x), ref, rtol=1e-4, atol=1e-5)


def test_shiftadd_linear_matches_fake_quant_float_linear():
    torch.manual_seed(0)
    lin = nn.Linear(20, 7)
    x = torch.randn(5, 2, 20, generator=_gen(10))
    m = ShiftAddLinear.from_linear(lin, bits=5, variant="apot2")
    m.calibrate(x[:2]).calibrate(x[2:])  # running range over two batches
    s = m.act_scale.item()
    xq = dequantize(quantize(x, s, 8, signed=True), s)
    with torch.no_grad():
        ref = F.linear(xq, m.dequantized_weight(), lin.bias)
        y = m(x)
    assert y.shape == (5, 2, 7)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    with pytest.raises(ValueError, match="in_features|expected"):
        m(torch.randn(3, 19))


def test_shiftadd_state_dict_round_trip():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5, generator=_gen(11))
    m = ShiftAddConv2d.from_conv(conv, bits=4, variant="apot2").calibrate(x)
    fresh = ShiftAddConv2d(3, 4, 3, padding=1, bits=4, variant="apot2")
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_convert_to_shiftadd_and_calibrating():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    sa = convert_to_shiftadd(model, bits=5, variant="pot")
    assert isinstance(sa[0], nn.Conv2d) and not isinstance(sa[0], ShiftAddConv2d)
    assert isinstance(sa[2], ShiftAddConv2d) and isinstance(sa[6], ShiftAddLinear)
    assert type(sa[8]) is nn.Linear
    x = torch.randn(4, 3, 8, 8, generator=_gen(12))
    with torch.no_grad(), calibrating(sa):
        sa(x)
    assert sa[2].calibrated and not sa[2].observing and not sa[2].act_signed  # post-ReLU -> unsigned
    with torch.no_grad():
        rel = ((sa(x) - model(x)).norm() / model(x).norm()).item()
    assert rel < 0.2


def test_import_does_not_load_numba():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, si_compress.quant, si_compress.nn; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_quant_module_imports_have_no_circle():
    """Module-level imports inside si_compress.quant form a DAG: primitives <- pow2 <- fakequant <- shiftadd."""
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "si_compress" / "quant"

    def deps(name):
        tree = ast.parse((pkg / f"{name}.py").read_text())
        return {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1}

    assert deps("primitives") == set()
    assert deps("pow2") == {"primitives"}
    assert deps("fakequant") == {"pow2", "primitives"}
    assert deps("shiftadd") == {"fakequant", "pow2", "primitives"}
    # and no function-level back-import either
    for name in ("primitives", "pow2", "fakequant"):
        assert "shiftadd" not in (pkg / f"{name}.py").read_text().replace("si_compress.quant.shiftadd", "")
