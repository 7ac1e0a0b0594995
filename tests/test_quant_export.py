"""si_compress.quant.export: low-bit code export (.npz, C header, QDQ ONNX) and the integer reference that re-reads it."""
import numpy as np
import pytest
import torch
from torch import nn

from si_compress.quant.export import (
    ReferenceIntLayer,
    export_c_header,
    export_codes,
    load_codes,
    reference_model,
)
from si_compress.quant import ShiftAddConv2d, calibrating, convert_to_shiftadd, prepare_qat


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 12, 1)
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h)) + h[:, :, ::2, ::2]
        h = self.conv3(h).mean(dim=(2, 3))  # signed input to fc1
        return self.fc2(torch.relu(self.fc1(h)))


def _shiftadd(variant, bits=4):
    torch.manual_seed(0)
    model = Net().eval()
    sa = convert_to_shiftadd(model, bits=bits, variant=variant).eval()
    x = torch.randn(16, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), calibrating(sa):
        sa(x)
    return sa, x


@pytest.mark.parametrize("variant,bits", [("pot", 4), ("apot2", 4), ("pot", 6)])
def test_reference_reproduces_shiftadd_logits_bit_for_bit(tmp_path, variant, bits):
    sa, x = _shiftadd(variant, bits)
    path = export_codes(sa, tmp_path / "codes.npz")
    codes = load_codes(path)
    assert [k for k in codes if k != "state"] == ["conv2", "conv3", "fc1"]  # conv1 / fc2 stay float
    assert codes["conv2"]["signs"].dtype == np.int8 and codes["conv2"]["shifts"].shape[0] == (2 if variant == "apot2"
                                                                                                 else 1)
    ref = reference_model(path, sa)
    assert isinstance(ref.conv2, ReferenceIntLayer) and isinstance(ref.fc1, ReferenceIntLayer)
    with torch.no_grad():
        xs = torch.randn(5, 3, 9, 9, generator=torch.Generator().manual_seed(2)) * 1.5  # some saturate
        for inp in (x, xs):
            a, b = sa(inp), ref(inp)
            assert a.dtype == b.dtype == torch.float32
            assert torch.equal(a, b), (a - b).abs().max()  # bit for bit
    # the file carries what it says: integer weight * scale is the module's dequantized weight
    sh = codes["conv2"]["shifts"].astype(np.int64)
    w = codes["conv2"]["signs"].astype(np.int64) * np.where(sh >= 0, np.left_shift(1, np.maximum(sh, 0)), 0).sum(0)
    deq = w * codes["conv2"]["weight_scale"].reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(deq.astype(np.float32), sa.conv2.dequantized_weight().numpy())


def test_reference_catches_a_changed_code(tmp_path):
    sa, x = _shiftadd("pot")
    path = export_codes(sa, tmp_path / "codes.npz")
    z = dict(np.load(path))
    signs = z["conv2/signs"].copy()
    signs.flat[np.flatnonzero(signs)[0]] *= -1
    z["conv2/signs"] = signs
    np.savez(tmp_path / "edited.npz", **z)
    with torch.no_grad():
        assert not torch.equal(reference_model(tmp_path / "edited.npz", sa)(x), sa(x))


def test_int4_codes_and_header(tmp_path):
    torch.manual_seed(0)
    fq = prepare_qat(Net().eval(), weight_bits=4, weight_format="int").eval()
    x = torch.randn(8, 3, 9, 9)
    with torch.no_grad(), calibrating(fq):
        fq(x)
    path = export_codes(fq, tmp_path / "int4.npz")
    codes = load_codes(path)
    c = codes["conv2"]
    assert str(c["kind"]) == "int" and int(c["bits"]) == 4 and np.abs(c["codes"]).max() <= 7
    np.testing.assert_allclose(c["codes"] * c["weight_scale"].reshape(-1, 1, 1, 1),
                               fq.conv2.quantized_weight().detach().double().numpy(), rtol=1e-6, atol=1e-7)
    h = export_c_header(path, tmp_path / "codes.h").read_text()
    assert "static const int8_t conv2_codes[" in h and h.count("#endif") == 1
    n = int(h.split("conv2_codes[")[1].split("]")[0])
    assert n == c["codes"].size


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="no quantized layer"):
        export_codes(Net(), tmp_path / "x.npz")
    m = ShiftAddConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="calibrate"):
        export_codes(nn.Sequential(m), tmp_path / "x.npz")
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a readable"):
        load_codes(tmp_path / "bad.npz")


@pytest.mark.parametrize("variant", ["pot", "apot2"])
def test_qdq_onnx_holds_the_codes_and_runs(tmp_path, variant):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from si_compress.quant.export import export_qdq_onnx

    sa, x = _shiftadd(variant)
    path = export_qdq_onnx(sa, tmp_path / "m.onnx", x[:1])
    codes = load_codes(export_codes(sa, tmp_path / "c.npz"))
    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for layer in ("conv2", "conv3", "fc1"):
        e = codes[layer]
        sh = e["shifts"].astype(np.int64)
        w = e["signs"].astype(np.int64) * np.where(sh >= 0, np.left_shift(1, np.maximum(sh, 0)), 0).sum(0)
        assert inits[f"{layer}_codes"].dtype == np.int8
        np.testing.assert_array_equal(inits[f"{layer}_codes"], w)
        assert inits[f"{layer}_wscale"].shape == (w.shape[0],)
        assert float(inits[f"{layer}_ascale"]) == float(e["act_scale"])
    assert sum(n.op_type == "QuantizeLinear" for n in g.node) == 3
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        y = sa(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    # float32 runtime vs our exact integer sums: equal up to float rounding
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4 * np.abs(y).max())
