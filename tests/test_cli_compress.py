import json

import pytest
import torch

from si_compress.cli.compress import main
from si_compress.compress import load_compressed
from si_compress.data import load_dataset
from si_compress.models import build_model
from si_compress.plan import CompressionPlan


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    from si_compress.demo import train_digits_cnn

    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    train_digits_cnn(path, epochs=4)
    return path


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_digits_end_to_end(digits_ckpt, tmp_path, capsys):
    out_dir = tmp_path / "c"
    code, out, err = _run([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--si-samples", "300",
                           "--target-macs", "0.6", "--out", out_dir, "--quiet", "--export", "torchscript",
                           "--device", "cpu"], capsys)
    assert code == 0, err
    for f in ("plan.json", "model.pt", "metrics.json", "kept_filters.png", "model.ts"):
        assert (out_dir / f).stat().st_size > 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["device"] == "cpu" and metrics["config"]["device"] == "cpu" and "device cpu:" in out
    assert metrics["compressed"]["macs"] <= 0.6 * metrics["base"]["macs"] + 1
    assert metrics["accuracy"]["compensated"] > 0.8
    lat = metrics["latency"]["batch128"]
    assert lat["speedup"] == pytest.approx(lat["base_s"] / lat["compressed_s"])
    assert lat["threads"] == metrics["threads"] and isinstance(lat["noisy"], bool)
    plan = CompressionPlan.from_json((out_dir / "plan.json").read_text())
    assert plan.layers and all(len(d.keep) <= d.out_channels for d in plan.layers)
    model, plan2 = load_compressed(out_dir / "model.pt")  # weights_only=True inside
    assert plan2 == plan
    x = torch.randn(3, 1, 8, 8)
    ts = torch.jit.load(str(out_dir / "model.ts"))
    torch.testing.assert_close(ts(x), model(x), atol=1e-5, rtol=1e-5)
    assert "fewer" in out and "latency" in out

    # apply an edited plan: keep everything in the first conv
    d = json.loads((out_dir / "plan.json").read_text())
    d["layers"][0]["keep"] = list(range(d["layers"][0]["out_channels"]))
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(d))
    code, out, err = _run([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--si-samples", "200",
                           "--plan", edited, "--out", tmp_path / "c2", "--quiet"], capsys)
    assert code == 0, err
    m2, p2 = load_compressed(tmp_path / "c2" / "model.pt")
    assert m2.features[0].out_channels == 16


def test_compress_errors(digits_ckpt, tmp_path, capsys):
    for argv, match in [
        ([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--target-macs", "1.5"], "--target-macs"),
        ([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--plan", tmp_path / "none.json"], "does not exist"),
        ([tmp_path / "missing.pt", "--data", "digits"], "missing.pt"),
    ]:
        code, out, err = _run(argv + ["--out", tmp_path / "e", "--quiet"], capsys)
        assert code == 2, err
        assert match in err.strip().splitlines()[-1] and "Traceback" not in err
        assert not (tmp_path / "e" / "plan.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "si_compress.plan", "schema_version": 1, "arch": "resnet20", "num_classes": 10}')
    code, out, err = _run([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--plan", bad,
                           "--out", tmp_path / "e", "--quiet"], capsys)
    assert code == 2 and "plan is for resnet20" in err


def test_pipeline_resnet_budget_counts_like_torch_pruning():
    from si_compress.pipeline import CompressConfig, count_tp, si_plan
    from si_compress.compress import apply_plan

    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    x = torch.randn(120, 3, 32, 32)
    y = torch.arange(120) % 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=60)
    plan, ev = si_plan(model, loader, arch="resnet20", num_classes=10, example_input=x[:1],
                       config=CompressConfig(target_macs=0.6))
    base, _ = count_tp(model, x[:1])
    got, _ = count_tp(apply_plan(model, plan, example_input=x[:1]), x[:1])
    assert got <= 0.6 * base
    assert plan.predicted["macs"] == got
    # inner convs alone, or a residual stream with every writer named
    assert all(d.name.endswith("conv1") or d.coupled for d in plan.layers)


def test_compress_then_int8(digits_ckpt, tmp_path, capsys):
    out_dir = tmp_path / "q"
    code, out, err = _run([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--si-samples", "300",
                           "--out", out_dir, "--quiet", "--quant", "int8"], capsys)
    assert code == 0, err
    q = json.loads((out_dir / "metrics.json").read_text())["quant"]
    assert q["kind"].startswith("int8") and q["size_on_disk_bytes"] < 0.3 * q["fp32_size_bytes"]
    assert q["accuracy"]["quantized"] > 0.8
    assert (out_dir / "model.int8.onnx").exists() and "bits/weight" in out  # onnxruntime: the default int8 engine
    # metrics name the files where they end up (not the staging folder they were written to)
    assert q["int8_onnx_path"] == str(out_dir / "model.int8.onnx") and q["packed_path"] == str(out_dir / "weights.siqp")
    # a later run without --quant removes the int8 model of this one (no stale output)
    code, out, err = _run([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--si-samples", "300",
                           "--out", out_dir, "--quiet"], capsys)
    assert code == 0, err
    assert not (out_dir / "model.int8.onnx").exists() and not (out_dir / "weights.siqp").exists()


def test_user_class_compresses_reloads_and_compresses_again(tmp_path, capsys):
    """A user's own class (file.py:Class, constructor options as JSON): si-compress, reload with
    weights_only=True and the same --arch, si-analyze it, and compress the compressed model again."""
    from pathlib import Path

    from si_compress.cli.analyze import main as analyze_main
    from si_compress.models import load_model

    arch = f"{Path(__file__).resolve().parent / '_archs.py'}:UserNet"
    kwargs = '{"in_channels": 1}'
    model = build_model(arch, 10, {"in_channels": 1})
    ckpt = tmp_path / "user.pt"
    torch.save(model.state_dict(), ckpt)
    out1 = tmp_path / "c1"
    code, out, err = _run([ckpt, "--arch", arch, "--arch-kwargs", kwargs, "--data", "digits", "--si-samples", "200",
                           "--eval-samples", "200", "--target-macs", "0.6", "--objective", "macs", "--round-to", "4",
                           "--out", out1, "--quiet"], capsys)
    assert code == 0, err
    m = json.loads((out1 / "metrics.json").read_text())
    assert m["compressed"]["macs"] <= 0.6 * m["base"]["macs"]
    # user code is never imported from the file alone
    with pytest.raises(ValueError, match="--arch"):
        load_compressed(out1 / "model.pt")
    small = load_model(out1 / "model.pt", arch=arch).model
    x = torch.randn(2, 1, 8, 8)
    assert small(x).shape == (2, 10)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    code = analyze_main([str(out1 / "model.pt"), "--arch", arch, "--data", "digits", "--samples", "100",
                         "--out", str(tmp_path / "a"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    out2 = tmp_path / "c2"
    code, out, err = _run([out1 / "model.pt", "--arch", arch, "--data", "digits", "--si-samples", "200",
                           "--eval-samples", "200", "--target-macs", "0.8", "--objective", "macs", "--round-to", "4",
                           "--out", out2, "--quiet"], capsys)
    assert code == 0, err
    twice = load_model(out2 / "model.pt", arch=arch).model
    assert sum(p.numel() for p in twice.parameters()) < sum(p.numel() for p in small.parameters())
    payload = torch.load(out2 / "model.pt", weights_only=True)
    assert len(payload["prior_plans"]) == 1 and payload["arch_kwargs"] == {"in_channels": 1}


@pytest.mark.parametrize("images", [None, 400])
def test_reconstruction_compensation_and_distilled_finetuning(digits_ckpt, tmp_path, capsys, images):
    out_dir = tmp_path / "r"
    code, out, err = _run([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--si-samples", "300",
                           "--target-macs", "0.4", "--out", out_dir, "--quiet", "--compensation", "refit+reconstruct",
                           "--reconstruct-steps", "30", "--finetune-epochs", "1", "--finetune-steps", "5"]
                          + (["--reconstruct-images", str(images)] if images else []), capsys)
    assert code == 0, err
    m = json.loads((out_dir / "metrics.json").read_text())
    r = m["reconstruct"]
    # the default: every train image (digits: few and small)
    want = images or len(load_dataset("digits", split="train").labels)
    assert r["labels_used"] is False and r["steps"] == 30 and r["images"] == want and r["targets"] == "logits"
    assert m["config"]["reconstruct_images"] == want
    assert m["refit"] and m["config"]["compensation"] == "refit+reconstruct"
    assert m["finetune_teacher"] == "base" and m["finetune_history"][0]["teacher"] is True


def test_a_downsampling_section_is_scored_against_its_shortcut():
    """The SI gain of a section that halves the map compares like for like: SI of its output against SI
    of post(shortcut(x)) (what remains without it), both pooled to the same grid."""
    import torch.nn.functional as F

    from si_compress.pipeline import CompressConfig, shortcut_si, si_plan
    from si_compress.separability import separation_index

    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    x = torch.randn(120, 3, 32, 32)
    y = torch.arange(120) % 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=60)
    seen = {}
    h = model.layer2[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    blk = model.layer2[0]
    after = F.relu(blk.shortcut(seen["x"]))                    # (120, 32, 16, 16): pooled to 5 x 5 <= 1024
    ref = separation_index(F.adaptive_avg_pool2d(after, 5).flatten(1).numpy(), y.numpy())
    assert shortcut_si(model, loader, "layer2.0") == pytest.approx(ref, abs=1e-12)
    plan, _ = si_plan(model, loader, arch="resnet20", num_classes=10, example_input=x[:1],
                      config=CompressConfig(target_macs=None, objective="macs"))
    b = next(b for b in plan.blocks if b.name == "layer2.0")
    assert b.si_in == pytest.approx(ref, abs=1e-12)
    assert next(b for b in plan.blocks if b.name == "layer2.1").si_in == b.si_out   # others: the previous output


def test_cli_target_params_reaches_the_plan_and_says_when_it_cannot_be_met(digits_ckpt, tmp_path, capsys):
    def run(fraction):
        out_dir = tmp_path / f"p{fraction}"
        code, out, err = _run([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--si-samples", "300",
                               "--target-macs", "0.9", "--target-params", str(fraction), "--objective", "macs",
                               "--out", out_dir, "--quiet"], capsys)
        assert code == 0, err
        plan = json.loads((out_dir / "plan.json").read_text())
        assert plan["settings"]["target_params"] == fraction
        return plan, err
    plan, err = run(0.5)
    assert plan["predicted"]["params"] <= 0.5 * plan["predicted"]["base_params"] and "warning" not in err
    # 8 channels per layer (--round-to 8) keep more than 4% of this small net: said, not hidden
    plan, err = run(0.04)
    assert plan["predicted"]["params"] > 0.04 * plan["predicted"]["base_params"]
    assert "of the parameters (target 4.0%)" in plan["settings"]["budget_unmet"]
    assert "warning:" in err and "lower --round-to" in err


def test_a_parameter_budget_holds_on_the_pruned_model():
    """--target-params: the pruned network (counted by torch-pruning, like metrics.json) keeps at most
    that fraction of the parameters, and the MACs budget still holds; without it the same MACs budget
    keeps more parameters (so the size budget did the work)."""
    from si_compress.compress import apply_plan
    from si_compress.models import cifar_resnet
    from si_compress.pipeline import CompressConfig, count_tp, si_plan

    torch.manual_seed(0)
    model = cifar_resnet(20, width=(8, 16, 32)).eval()
    x = torch.randn(80, 3, 32, 32)
    y = torch.arange(80) % 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=40)
    base_macs, base_params = count_tp(model, x[:1])

    def measured(**kw):
        plan = si_plan(model, loader, arch="r", num_classes=10, example_input=x[:1],
                       config=CompressConfig(target_macs=0.7, objective="macs", round_to=4, **kw))[0]
        macs, params = count_tp(apply_plan(model, plan, example_input=x[:1]), x[:1])
        assert plan.predicted["params"] == params and plan.settings.get("target_params") == kw.get("target_params")
        return macs / base_macs, params / base_params
    macs, params = measured()
    assert macs <= 0.7 and params > 0.5
    macs, params = measured(target_params=0.5)
    assert macs <= 0.7 and params <= 0.5


def test_streams_can_be_kept_whole():
    from si_compress.models import cifar_resnet
    from si_compress.pipeline import CompressConfig, si_plan

    torch.manual_seed(0)
    model = cifar_resnet(14, width=(8, 16, 16)).eval()
    x = torch.randn(80, 3, 32, 32)
    y = torch.arange(80) % 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=40)

    def plan(streams):
        return si_plan(model, loader, arch="r", num_classes=10, example_input=x[:1],
                       config=CompressConfig(target_macs=0.5, objective="macs", streams=streams, round_to=4))[0]
    assert any(d.coupled for d in plan(True).layers)
    assert not any(d.coupled for d in plan(False).layers)
