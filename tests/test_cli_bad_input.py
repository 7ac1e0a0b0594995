"""Every bad input of issue 16, through the CLIs' main(argv): exit code 2, one line on stderr naming
the problem and the fix, no traceback, and nothing (partial or stale) left in --out."""
import json
import os
import stat
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from si_compress.cli.analyze import main as analyze_main
from si_compress.cli.compress import main as compress_main
from si_compress.models import build_model
from si_compress.plan import CompressionPlan, LayerDecision

NET = '''
from torch import nn
class Net(nn.Module):
    def __init__(self, num_classes=2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, num_classes)
    def forward(self, x):
        return self.classifier(self.features(x))
'''


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    torch.save({"state_dict": build_model("digits_cnn", 10).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """A 2-class RGB model (user code file) and its checkpoint."""
    root = tmp_path_factory.mktemp("rgb")
    (root / "net.py").write_text(NET)
    arch = f"{root / 'net.py'}:Net"
    torch.manual_seed(0)
    ckpt = root / "net.pt"
    torch.save(build_model(arch, 2).state_dict(), ckpt)
    return arch, ckpt


def _tree(root, n=6, size=8, odd=None):
    """root/<class>/<i>.png, 2 classes of n RGB images; ``odd``: (class, i, size) of a differently sized one."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            s = odd[2] if odd and odd[:2] == (c, i) else size
            Image.fromarray((rng.random((s, s, 3)) * 255).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def _run(main, argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _expect(main, argv, capsys, out_dir, *match):
    """Exit 2, one stderr line containing every ``match``, no traceback, no output folder content."""
    existed = out_dir.exists()
    code, out, err = _run(main, list(argv) + ["--out", out_dir, "--quiet"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and ": error: " in lines[0], err
    assert "Traceback" not in err + out
    for m in match:
        assert m in lines[0], lines[0]
    if existed and out_dir.is_dir():
        assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".") or p.suffix in (".json", ".pt")]
    else:
        assert not out_dir.exists() or out_dir.is_file()
    return lines[0]


DIGITS = ["--arch", "digits_cnn", "--data", "digits"]


# ----------------------------------------------------------------------------- data
def test_mixed_image_sizes_name_the_file(rgb, tmp_path, capsys):
    arch, ckpt = rgb
    data = _tree(tmp_path / "mixed", odd=("b", 3, 10))
    _expect(analyze_main, [ckpt, "--arch", arch, "--data", data], capsys, tmp_path / "o",
            str(data / "b" / "3.png"), "10x10", "resize")


def test_truncated_image_read_by_a_worker_names_the_file(rgb, tmp_path, capsys):
    arch, ckpt = rgb
    data = _tree(tmp_path / "t")
    bad = data / "a" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])
    line = _expect(analyze_main, [ckpt, "--arch", arch, "--data", data, "--workers", "1"], capsys, tmp_path / "o",
                   str(bad), "remove or replace")
    assert "DataLoader worker" not in line


def test_flat_folder_is_not_used_as_both_train_and_test(rgb, tmp_path, capsys):
    arch, ckpt = rgb
    data = _tree(tmp_path / "flat")
    _expect(compress_main, [ckpt, "--arch", arch, "--data", data, "--si-samples", "20"], capsys, tmp_path / "o",
            "no train/ and test/", "train/<class>")


@pytest.mark.parametrize("opt", ["--si-samples", "--eval-samples"])
def test_samples_above_the_data_are_refused_not_clipped(digits_ckpt, tmp_path, capsys, opt):
    _expect(compress_main, [digits_ckpt, *DIGITS, opt, "100000"], capsys, tmp_path / "o",
            f"{opt} 100000 exceeds", f"lower {opt}")


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("main", [analyze_main, compress_main])
def test_threads_must_be_positive(digits_ckpt, tmp_path, capsys, main):
    _expect(main, [digits_ckpt, *DIGITS, "--threads", "-1"], capsys, tmp_path / "o", "--threads", ">= 1")


@pytest.mark.parametrize("main", [analyze_main, compress_main])
def test_batch_size_zero(digits_ckpt, tmp_path, capsys, main):
    _expect(main, [digits_ckpt, *DIGITS, "--batch-size", "0"], capsys, tmp_path / "o", "--batch-size", ">= 1")


@pytest.mark.parametrize("lr", ["nan", "inf", "-0.1", "0"])
def test_lr_must_be_finite_and_positive(digits_ckpt, tmp_path, capsys, lr):
    _expect(compress_main, [digits_ckpt, *DIGITS, "--finetune-epochs", "1", "--lr", lr], capsys, tmp_path / "o",
            "--lr", "finite number > 0")


@pytest.mark.parametrize("main", [analyze_main, compress_main])
@pytest.mark.parametrize("device, match", [("cuda", "use --device cpu or auto"), ("cuda:1", "use --device cpu or auto"),
                                           ("gpu", "auto, cpu, cuda or cuda:N")])
def test_device_unavailable_or_unknown(digits_ckpt, tmp_path, capsys, monkeypatch, main, device, match):
    import si_compress.models

    # refused before any model is loaded, also on a machine that has a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(si_compress.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    _expect(main, [digits_ckpt, *DIGITS, "--device", device], capsys, tmp_path / "o", "--device", match)


@pytest.mark.parametrize("extra, match", [(["--target-params", "0"], "in (0, 1]"),
                                          (["--target-params", "1.5"], "in (0, 1]"),
                                          (["--target-params", "0.5", "--delta", "0.02"], "use one of them")])
def test_target_params_is_a_budget_fraction(digits_ckpt, tmp_path, capsys, extra, match):
    _expect(compress_main, [digits_ckpt, *DIGITS, *extra], capsys, tmp_path / "o", "--target-params", match)


@pytest.mark.parametrize("extra, match", [(["--latency-batch", "0"], "batch sizes >= 1"),
                                          (["--latency-batch", "1", "--objective", "macs"], "--objective macs")])
def test_latency_batch_is_checked_before_any_work(digits_ckpt, tmp_path, capsys, extra, match):
    _expect(compress_main, [digits_ckpt, *DIGITS, *extra], capsys, tmp_path / "o", "--latency-batch", match)


def test_finetune_steps_without_epochs(digits_ckpt, tmp_path, capsys):
    _expect(compress_main, [digits_ckpt, *DIGITS, "--finetune-steps", "150"], capsys, tmp_path / "o",
            "--finetune-steps", "--finetune-epochs 1")


# ----------------------------------------------------------------------------- --out
def test_out_is_an_existing_file(digits_ckpt, tmp_path, capsys, monkeypatch):
    import si_compress.models

    # checked before anything is loaded: loading the model would fail the test
    monkeypatch.setattr(si_compress.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    target = tmp_path / "file"
    target.write_text("mine")
    _expect(compress_main, [digits_ckpt, *DIGITS], capsys, target, "exists and is not a folder")
    assert target.read_text() == "mine"


def test_out_unwritable_fails_before_the_work(digits_ckpt, tmp_path, capsys, monkeypatch):
    import si_compress.models

    monkeypatch.setattr(si_compress.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "f").write_text("")
    _expect(compress_main, [digits_ckpt, *DIGITS], capsys, tmp_path / "f" / "sub", "cannot write into --out",
            "writable --out")
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        _expect(analyze_main, [digits_ckpt, *DIGITS], capsys, ro / "x", "cannot write into --out")


def test_reused_out_loses_stale_exports_and_says_what_ran(digits_ckpt, tmp_path, capsys):
    """A second run into the same --out: no model.onnx / model.ts of the earlier model survive; files
    follow the umask; the fine-tune label counts the steps that ran; metrics name both splits."""
    out = tmp_path / "c"
    out.mkdir()
    for stale in ("model.onnx", "model.ts"):
        (out / stale).write_text("from an earlier run")
    threads_before = torch.get_num_threads()
    old = os.umask(0o027)
    try:
        code, stdout, err = _run(compress_main, [digits_ckpt, *DIGITS, "--si-samples", "100", "--eval-samples", "100",
                                                 "--objective", "macs", "--finetune-epochs", "1", "--finetune-steps", "2",
                                                 "--threads", "1", "--out", out, "--quiet"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert not (out / "model.onnx").exists() and not (out / "model.ts").exists()
    assert "removed model.ts, model.onnx" in stdout or "removed model.onnx, model.ts" in stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    for f in ("plan.json", "model.pt", "metrics.json", "kept_filters.png"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o640, f
    assert "fine-tuned 2 steps" in stdout and "1 ep" not in stdout.split("fine-tuned")[1].split("->")[0][:8]
    m = json.loads((out / "metrics.json").read_text())
    assert "(test," in m["data"]["accuracy"] and "(train," in m["data"]["si"]
    assert m["finetune_steps"] == 2
    for b in ("batch1", "batch128"):
        assert set(m["latency"][b]) >= {"speedup", "base_spread", "compressed_spread", "noisy"}
        assert m["latency"][b]["threads"] == m["threads"] == 1
    assert torch.get_num_threads() == threads_before and "(1 threads," in stdout


# ----------------------------------------------------------------------------- plans
def _plan_file(tmp_path, d):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    return p


def _digits_plan(**edit):
    plan = CompressionPlan(arch="digits_cnn", num_classes=10,
                           layers=(LayerDecision(name="features.0", out_channels=16, keep=tuple(range(8))),))
    return {**plan.to_dict(), **edit}


@pytest.mark.parametrize("keep", [[0, 0.5, 2], ["1", "2"], [True, 3]])
def test_plan_keep_values_are_not_coerced(digits_ckpt, tmp_path, capsys, keep):
    d = _digits_plan()
    d["layers"][0]["keep"] = keep
    _expect(compress_main, [digits_ckpt, *DIGITS, "--plan", _plan_file(tmp_path, d)], capsys, tmp_path / "o",
            "keep must list filter indices (integers)", repr([k for k in keep if not type(k) is int][0]))


@pytest.mark.parametrize("version", [2, "1", None, True])
def test_plan_schema_version_is_checked(digits_ckpt, tmp_path, capsys, version):
    d = _digits_plan(schema_version=version)
    _expect(compress_main, [digits_ckpt, *DIGITS, "--plan", _plan_file(tmp_path, d)], capsys, tmp_path / "o",
            f"schema_version {version!r} is not supported", "make the plan again")


def test_plan_with_an_edited_arch_is_refused(tmp_path, capsys):
    """A ResNet-20 plan relabelled resnet32: its layer names exist in ResNet-32 too, but its
    prediction (base counts) belongs to ResNet-20."""
    from si_compress.pipeline import count_tp

    x = torch.zeros(1, 3, 8, 8)
    macs, params = count_tp(build_model("resnet20", 2).eval(), x)
    plan = CompressionPlan(arch="resnet32", num_classes=2,
                           layers=(LayerDecision(name="layer1.0.conv1", out_channels=16, keep=tuple(range(8))),),
                           predicted=dict(base_macs=macs, base_params=params, macs=macs, params=params,
                                          counter="torch_pruning.utils.count_ops_and_params"))
    ckpt = tmp_path / "r32.pt"
    torch.save(build_model("resnet32", 2).state_dict(), ckpt)
    data = tmp_path / "d"
    _tree(data / "train", n=10), _tree(data / "test")
    _expect(compress_main, [ckpt, "--data", data, "--si-samples", "20", "--plan", _plan_file(tmp_path, plan.to_dict())],
            capsys, tmp_path / "o", f"base_params {params:,}", "make a plan for this model")


# ----------------------------------------------------------------------------- checkpoints
def test_plain_pickle_gets_the_trust_model_hint(tmp_path, capsys):
    import pickle

    path = tmp_path / "net.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"weights": [1, 2]}, fh, protocol=4)
    _expect(analyze_main, [path, *DIGITS], capsys, tmp_path / "o", "--trust-model", "safe loader refused")
    _expect(analyze_main, [path, *DIGITS, "--trust-model"], capsys, tmp_path / "o", "torch.save(model.state_dict()")


def test_pickled_class_that_cannot_be_imported(tmp_path, capsys):
    mod = tmp_path / "gone_module_16.py"
    mod.write_text(NET)
    sys.path.insert(0, str(tmp_path))
    try:
        import gone_module_16

        torch.save(gone_module_16.Net(10), tmp_path / "full.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gone_module_16", None)
    mod.unlink()
    _expect(analyze_main, [tmp_path / "full.pt", "--data", "digits"], capsys, tmp_path / "o",
            "gone_module_16.Net", "--trust-model")
    _expect(analyze_main, [tmp_path / "full.pt", "--data", "digits", "--trust-model"], capsys, tmp_path / "o",
            "no module named 'gone_module_16'", "PYTHONPATH")


# ----------------------------------------------------------------------------- bugs
def test_internal_error_is_reported_as_a_bug_with_a_log(digits_ckpt, tmp_path, capsys, monkeypatch):
    import si_compress.analysis

    def boom(*a, **k):
        raise RuntimeError("deliberate failure inside the library")

    monkeypatch.setattr(si_compress.analysis, "analyze", boom)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    code, out, err = _run(analyze_main, [digits_ckpt, *DIGITS, "--samples", "100", "--out", tmp_path / "o",
                                         "--quiet"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert "internal error (a bug" in lines[0] and "deliberate failure" in lines[0]
    log = lines[0].split("traceback in ")[1].split(";")[0]
    assert "Traceback" in open(log).read() and "deliberate failure" in open(log).read()
    assert not (tmp_path / "o").exists()
