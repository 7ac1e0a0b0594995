"""int8 through onnxruntime (si_compress.quant.engine_ort): QDQ per-channel export, calibration
methods, the CLI default path free of deprecation warnings."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

from si_compress.quant.engine_ort import ORT_CALIBRATION, cpu_has_vnni, quantize_int8_ort  # noqa: E402
from si_compress.quant.api import QuantConfig, quantize_model  # noqa: E402

from test_quantize import TinyNet, _trained_bn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return _trained_bn(TinyNet())


@pytest.fixture
def data():
    return torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _graph(result):
    return onnx.load_from_string(result.int8.onnx_bytes).graph


def _input_scale(graph) -> float:
    """Scale of the QuantizeLinear that quantizes the graph input."""
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == graph.input[0].name:
            return float(inits[node.input[1]])
    raise AssertionError("no QuantizeLinear on the input")


def test_int8_qdq_per_channel_and_close_to_fp32(tiny, data):
    res = quantize_int8_ort(tiny, data, method="minmax", max_samples=64)
    with torch.no_grad():
        ref = tiny(data)
        fp32 = res.fp32(data)
        q = res.int8(data)
    torch.testing.assert_close(fp32, ref, rtol=1e-4, atol=1e-4)  # the exported graph is the model
    assert ((q - ref).norm() / ref.norm()).item() < 0.05
    assert (q.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    g = _graph(res)
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    conv_weight_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                      and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 4]
    assert len(conv_weight_dq) == 2  # both convs (BN folded by the optimizer), weights stored as int8 codes
    for n in conv_weight_dq:
        codes, scale = inits[n.input[0]], inits[n.input[1]]
        assert scale.shape == (codes.shape[0],)  # per output channel
        zp = inits[n.input[2]] if len(n.input) > 2 else np.zeros(1)
        assert not zp.any()  # symmetric
    assert res.details["format"] == "QDQ" and res.details["calibration_samples"] == 64
    assert res.details["reduce_range"] == (not cpu_has_vnni())


@pytest.mark.parametrize("method", ORT_CALIBRATION)
def test_calibration_methods_run(tiny, data, method):
    x = data.clone()
    x[0, 0, 0, 0] = 40.0  # one outlier: percentile clips it, minmax does not
    res = quantize_int8_ort(tiny, x, method=method, max_samples=64, percentile=99.0)
    scale = _input_scale(_graph(res))
    minmax_scale = (40.0 - float(x.min())) / 255  # uint8 activations (reduce_range narrows weights only)
    if method == "minmax":
        assert scale == pytest.approx(minmax_scale, rel=1e-3)
    elif method == "percentile":
        assert scale < 0.5 * minmax_scale
    else:  # entropy / distribution: their own thresholds, positive and finite
        assert 0 < scale < np.inf
    with torch.no_grad():
        assert torch.isfinite(res.int8(data)).all()


def test_calibration_reads_every_batch_up_to_max_samples(tiny, data):
    small = data * 0.1
    big = data.clone()
    big[-1, 0, 0, 0] = 25.0  # the widest range is in the last batch
    loader = DataLoader(TensorDataset(torch.cat([small, big]), torch.zeros(128)), batch_size=32)
    all_of_it = quantize_int8_ort(tiny, loader, method="minmax", max_samples=128)
    first_half = quantize_int8_ort(tiny, loader, method="minmax", max_samples=64)
    assert all_of_it.details["calibration_samples"] == 128 and first_half.details["calibration_samples"] == 64
    assert _input_scale(_graph(all_of_it)) > 5 * _input_scale(_graph(first_half))


def test_cpu_has_vnni_parses_flags():
    assert cpu_has_vnni("processor: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni("flags : sse avx_vnni\n")
    assert cpu_has_vnni("flags : amx_tile amx_int8\n")
    assert not cpu_has_vnni("flags : fpu sse avx2 fma\n")
    assert not cpu_has_vnni("")


def test_quantize_model_engines(tiny, data):
    ort = quantize_model(tiny, QuantConfig(mode="int8", calibration_samples=64), data)
    assert ort.kind == "int8-onnxruntime" and ort.bits_per_weight == 8.0 and ort.reference is not None
    assert ort.details["calibration"] == "minmax"  # the onnxruntime default
    with pytest.raises(ValueError, match="torch engine for mse"):
        QuantConfig(mode="int8", calibration="mse")
    with pytest.raises(ValueError, match="int8_engine"):
        QuantConfig(mode="int8", int8_engine="tflite")
    with pytest.raises(ValueError, match="calibration"):
        QuantConfig(mode="int4", calibration="entropy")
    assert QuantConfig(mode="int8", int8_engine="torch").calibration == "mse"


def test_cli_int8_default_is_free_of_deprecation_warnings(tmp_path):
    """`python -W error::DeprecationWarning -m si_compress.cli.compress ... --quant int8` on a tiny
    model: exit 0, model.int8.onnx written, the deprecated torch.ao FX path never loaded."""
    from si_compress.demo import train_digits_cnn

    ckpt = tmp_path / "digits.pt"
    train_digits_cnn(ckpt, epochs=2)
    out = tmp_path / "c"
    code = ("import sys, runpy; sys.argv = sys.argv[1:]; "
            "runpy.run_module('si_compress.cli.compress', run_name='__main__', alter_sys=True); ")
    # `import torch` itself loads parts of torch.ao.quantization; our torch engine's FX entry point must not load
    check = "import sys; assert 'torch.ao.quantization.quantize_fx' not in sys.modules, 'torch.ao FX path ran'"
    argv = ["si-compress", str(ckpt), "--arch", "digits_cnn", "--data", "digits", "--si-samples", "200",
            "--target-macs", "0.7", "--out", str(out), "--quiet", "--quant", "int8", "--quant-samples", "64"]
    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c",
                           "import atexit\natexit.register(lambda: exec(" + repr(check) + "))\n" + code, *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeprecationWarning" not in proc.stderr and "AssertionError" not in proc.stderr, proc.stderr[-2000:]
    assert (out / "model.int8.onnx").stat().st_size > 0


def test_cli_rejects_mse_for_onnxruntime_before_any_work(tmp_path, capsys, monkeypatch):
    import si_compress.structure
    from si_compress.cli.compress import main
    from si_compress.demo import train_digits_cnn

    ckpt = tmp_path / "digits.pt"
    train_digits_cnn(ckpt, epochs=1)

    def no_work(*a, **k):
        raise AssertionError("the model was analysed before the options were checked")

    monkeypatch.setattr(si_compress.structure, "describe", no_work)
    code = main([str(ckpt), "--arch", "digits_cnn", "--data", "digits", "--out", str(tmp_path / "o"), "--quiet",
                 "--quant", "int8", "--quant-calibration", "mse"])
    out, err = capsys.readouterr()
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and "mse" in lines[0] and "--int8-engine torch" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "o" / "metrics.json").exists()
