"""The package-root API: importable lazily (no torch at `import si_compress`), and it works end to end."""
import subprocess
import sys

import torch


def test_root_api_is_lazy():
    code = ("import sys, si_compress; assert 'torch' not in sys.modules; "
            "si_compress.CompressionPlan; assert 'torch' not in sys.modules; "
            "import si_compress.analysis as a; assert si_compress.analyze is a.analyze; "
            "from si_compress.compress.export import load_compressed; "
            "assert si_compress.load_compressed is load_compressed; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_compress_model_save_reload_and_plan_io(tmp_path):
    import si_compress
    from si_compress.data import load_dataset, make_loader

    torch.manual_seed(0)
    from si_compress.models import build_model

    model = build_model("digits_cnn", 10).eval()
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    sample = make_loader(train, list(range(200)), batch_size=100)
    x0 = next(iter(sample))[0][:1]
    small, plan, m = si_compress.compress_model(
        model, sample, make_loader(test, list(range(100))), example_input=x0, arch="digits_cnn",
        config=si_compress.CompressConfig(target_macs=0.6, objective="macs"))
    assert m["macs"] <= 0.6 * plan.predicted["base_macs"] and plan.num_classes == 10
    plan.save(tmp_path / "plan.json")
    assert si_compress.CompressionPlan.load(tmp_path / "plan.json") == plan
    si_compress.save_compressed(tmp_path / "m.pt", small, plan, arch="digits_cnn", num_classes=10, input_shape=(1, 8, 8))
    again, plan2 = si_compress.load_compressed(tmp_path / "m.pt")
    assert plan2 == plan
    torch.testing.assert_close(again(x0), small(x0))
