import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from si_compress.cli.analyze import main
from si_compress.models import build_model
from _shared import require_shared


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    torch.save({"state_dict": build_model("digits_cnn", 10).state_dict()}, path)
    return path


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_digits_end_to_end(digits_ckpt, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = _run([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--samples", "200",
                           "--out", out_dir, "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "device cpu;" in out
    assert "features.10" in out and "highest SI" in out
    for f in ("report.json", "layers.csv", "si_layers.png", "si_per_class.png"):
        assert (out_dir / f).stat().st_size > 0
    rep = json.loads((out_dir / "report.json").read_text())
    assert rep["schema"] == "si_compress.analysis" and rep["n_samples"] == 200
    assert rep["data"]["name"] == "digits" and rep["versions"]["torch"]
    assert rep["settings"]["device"] == "cpu"
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def _expect_error(argv, capsys, match, tmp_path):
    out_dir = tmp_path / "err_out"
    code, out, err = _run(list(argv) + ["--out", out_dir, "--quiet"], capsys)
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("si-analyze: error:"), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (out_dir / "report.json").exists()


def test_missing_file(tmp_path, capsys):
    _expect_error([tmp_path / "nope.pt", "--data", "digits"], capsys, "nope.pt", tmp_path)


def test_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("this is not a checkpoint")
    _expect_error([bad, "--data", "digits", "--arch", "digits_cnn"], capsys, "bad.pt", tmp_path)


def test_unknown_arch(digits_ckpt, tmp_path, capsys):
    _expect_error([digits_ckpt, "--data", "digits", "--arch", "resnet999"], capsys, "resnet999", tmp_path)


def test_mismatched_arch(digits_ckpt, tmp_path, capsys):
    _expect_error([digits_ckpt, "--data", "digits", "--arch", "resnet20"], capsys, "resnet20", tmp_path)


def test_full_pickle_needs_trust(tmp_path, capsys):
    path = tmp_path / "full.pt"
    torch.save(build_model("digits_cnn", 10), path)
    _expect_error([path, "--data", "digits"], capsys, "--trust-model", tmp_path)
    code, out, err = _run([path, "--data", "digits", "--trust-model", "--samples", "100", "--order", "1",
                           "--out", tmp_path / "ok", "--quiet"], capsys)
    assert code == 0, err


def _image_tree(root, classes, n=4, size=8, extra=None):
    for c in classes:
        d = root / c
        d.mkdir(parents=True)
        for i in range(n):
            arr = (np.random.default_rng(i).random((size, size)) * 255).astype(np.uint8)
            Image.fromarray(arr, mode="L").save(d / f"{i}.png")
    if extra:
        (root / classes[0] / extra).write_text("not an image")
    return root


def test_empty_folder(digits_ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error([digits_ckpt, "--arch", "digits_cnn", "--data", empty], capsys, "empty", tmp_path)


def test_class_count_mismatch(digits_ckpt, tmp_path, capsys):
    tree = _image_tree(tmp_path / "three", ["a", "b", "c"])
    _expect_error([digits_ckpt, "--arch", "digits_cnn", "--data", tree, "--normalize", "0.5/0.5"], capsys,
                  "3 classes but the model outputs 10", tmp_path)


def test_non_image_file(digits_ckpt, tmp_path, capsys):
    tree = _image_tree(tmp_path / "mixed", [str(i) for i in range(10)], extra="notes.txt")
    _expect_error([digits_ckpt, "--arch", "digits_cnn", "--data", tree], capsys, "notes.txt", tmp_path)


def test_nan_activations(tmp_path, capsys):
    model = build_model("digits_cnn", 10)
    with torch.no_grad():
        model.features[0].weight.fill_(float("nan"))
    path = tmp_path / "nan.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    _expect_error([path, "--arch", "digits_cnn", "--data", "digits", "--samples", "100"], capsys, "NaN", tmp_path)


def test_too_few_samples_per_class(digits_ckpt, tmp_path, capsys):
    _expect_error([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--samples", "30", "--order", "3"],
                  capsys, "per class", tmp_path)


def test_too_many_samples(digits_ckpt, tmp_path, capsys):
    _expect_error([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--samples", "100000"], capsys,
                  "--samples", tmp_path)


def test_wrong_input_channels(tmp_path, capsys):
    path = tmp_path / "r20.pt"
    torch.save({"state_dict": build_model("resnet20", 10).state_dict()}, path)
    _expect_error([path, "--data", "digits", "--samples", "100"], capsys, "cannot run on digits", tmp_path)


def test_bad_option_values(digits_ckpt, tmp_path, capsys):
    _expect_error([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--normalize", "x"], capsys,
                  "--normalize", tmp_path)
    _expect_error([digits_ckpt, "--arch", "digits_cnn", "--data", "digits", "--layers", "nonexistent.*"], capsys,
                  "nonexistent", tmp_path)


@pytest.mark.slow
def test_shared_resnet20_cli(tmp_path, capsys):
    ckpt = require_shared("models/resnet20-cifar10-jpeg.th")
    data = require_shared("data/cifar10-jpeg")
    code, out, err = _run([ckpt, "--data", data, "--samples", "200", "--order", "3", "--reference-split", "train",
                           "--out", tmp_path / "r20", "--quiet"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r20" / "report.json").read_text())
    assert rep["model"]["arch"] == "resnet20"
    assert all(r["cross_si"] is not None for r in rep["layers"])
    assert "xSI" in out
