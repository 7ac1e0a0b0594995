"""Architectures, the registry and safe checkpoint loading (synthetic) + real shared checkpoints (slow)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from si_compress.models import (
    VGG,
    VGG16_CFG,
    CifarResNet,
    LoadedModel,
    ModelLoadError,
    ShortcutA,
    available_archs,
    build_model,
    cifar_resnet,
    infer_arch,
    load_model,
    vgg16_bn_cifar,
)

try:
    from tests._shared import require_shared
except ImportError:  # tests/ collected as rootdir-less modules
    from _shared import require_shared


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_every_cifar_resnet_depth_builds_and_runs(depth):
    model = build_model(f"resnet{depth}").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert model.depth == depth
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == (depth - 2) // 6


def test_parameter_counts_match_the_paper():
    # He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters.
    assert abs(n_params(cifar_resnet(20)) / 1e6 - 0.27) < 0.005
    assert abs(n_params(cifar_resnet(56)) / 1e6 - 0.85) < 0.005
    assert abs(n_params(cifar_resnet(110)) / 1e6 - 1.7) < 0.05


def test_option_a_shortcut_subsamples_and_zero_pads():
    sc = ShortcutA(16, 32, stride=2)
    x = torch.randn(2, 16, 32, 32)
    y = sc(x)
    assert y.shape == (2, 32, 16, 16)
    assert list(sc.parameters()) == [] and list(sc.buffers()) == []
    assert torch.equal(y[:, :8], torch.zeros(2, 8, 16, 16))  # planes // 4 = 8 zero channels each side
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.equal(y[:, 24:], torch.zeros(2, 8, 16, 16))
    # An odd channel difference puts the extra zero channel after.
    z = ShortcutA(4, 7, stride=1)(torch.ones(1, 4, 3, 3))
    assert z.shape == (1, 7, 3, 3) and z[0, :, 0, 0].tolist() == [0, 1, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="only add channels"):
        ShortcutA(8, 4, stride=1)


def test_blocks_expose_non_inplace_relu_modules_and_checkpoint_key_names():
    model = cifar_resnet(20)
    names = dict(model.named_modules())
    for name in ("relu", "layer1.0.relu1", "layer1.0.relu2", "layer3.2.relu2"):
        assert isinstance(names[name], nn.ReLU) and not names[name].inplace
    assert isinstance(model.layer2[0].shortcut, ShortcutA)
    assert isinstance(model.layer2[1].shortcut, nn.Identity)
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer3.2.bn2.weight", "linear.weight", "linear.bias"} <= keys
    assert not any("shortcut" in k for k in keys)


def test_custom_widths_rebuild_from_config():
    model = CifarResNet(num_blocks=(2, 1, 1), width=(8, 12, 20), block_widths=[[3, 5], [6], [7]], num_classes=4)
    assert model.layer1[1].conv1.out_channels == 5 and model.layer1[1].conv2.out_channels == 8
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    rebuilt = CifarResNet(**model.config())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    narrow = cifar_resnet(20, width=(8, 16, 32))
    assert narrow.linear.in_features == 32


@pytest.mark.parametrize("bad", [19, 0, 8.0, True])
def test_invalid_depth_is_rejected(bad):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        cifar_resnet(bad)


def test_invalid_widths_are_rejected():
    with pytest.raises(ValueError, match="shrink"):
        cifar_resnet(20, width=(32, 16, 64))
    with pytest.raises(ValueError, match="block_widths\\[0\\]"):
        cifar_resnet(20, block_widths=[[16, 16], [32] * 3, [64] * 3])


def test_models_pickle_and_script():
    import warnings

    model = cifar_resnet(20).eval()
    x = torch.randn(2, 3, 32, 32)
    clone = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script is deprecated but still the cheapest check
            scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x), model(x))


def test_onnx_export():
    pytest.importorskip("onnx")
    import io

    buf = io.BytesIO()
    torch.onnx.export(cifar_resnet(20).eval(), torch.randn(1, 3, 32, 32), buf)
    assert buf.getbuffer().nbytes > 100_000


def test_vgg16_bn_cifar_builds_and_narrows():
    model = vgg16_bn_cifar(num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert model.classifier.in_features == 512 and isinstance(model.classifier, nn.Linear)
    assert isinstance(model.features[1], nn.BatchNorm2d) and not model.features[2].inplace
    half = vgg16_bn_cifar(width_mult=0.5)
    assert half.classifier.in_features == 256
    small = vgg16_bn_cifar(num_classes=3, cfg=[8, "M", 16, "M"])
    assert small.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert isinstance(VGG(**small.config()), VGG)
    with pytest.raises(ValueError):
        vgg16_bn_cifar(cfg=[8, "X"])
    with pytest.raises(ValueError):
        vgg16_bn_cifar(width_mult=0)


def test_registry_and_torchvision_passthrough():
    names = available_archs()
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16_bn"} <= set(names)
    assert "torchvision:resnet18" in available_archs(include_torchvision=True)
    tv = build_model("torchvision:resnet18", num_classes=7).eval()
    with torch.no_grad():
        assert tv(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert build_model("ResNet20").linear.out_features == 10  # names are case-insensitive
    with pytest.raises(ValueError, match="unknown arch 'resnet21'.*resnet20"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="unknown torchvision classifier"):
        build_model("torchvision:not_a_model")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet20", num_classes=0)


# --------------------------------------------------------------------------- loading


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x))


def test_state_dict_round_trip(tmp_path):
    model = cifar_resnet(20)
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel)
    assert (loaded.arch, loaded.num_classes, loaded.key_style, loaded.container) == ("resnet20", 10, "plain", "top-level")
    assert loaded.path == path and not loaded.model.training
    assert _same_outputs(loaded.model, model)
    with pytest.raises(Exception):
        loaded.arch = "x"  # frozen


@pytest.mark.parametrize("entry", ["state_dict", "model"])
def test_checkpoint_dict_entries_and_module_prefix(tmp_path, entry):
    model = cifar_resnet(32, num_classes=100)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "dp.th"
    torch.save({entry: sd, "epoch": 3, "best_prec1": 91.0}, path)
    loaded = load_model(path)
    assert (loaded.arch, loaded.num_classes, loaded.key_style, loaded.container) == ("resnet32", 100, "dataparallel", entry)
    assert _same_outputs(loaded.model, model)


def test_arch_inference():
    assert infer_arch(cifar_resnet(44, num_classes=5).state_dict()) == ("resnet44", 5)
    assert infer_arch(vgg16_bn_cifar(num_classes=3).state_dict()) == ("vgg16_bn", 3)
    assert infer_arch(build_model("torchvision:resnet18").state_dict()) is None
    assert infer_arch({"foo.weight": torch.zeros(2)}) is None


def test_narrow_and_pruned_vgg16_load_from_shapes(tmp_path):
    half = vgg16_bn_cifar(num_classes=10, width_mult=0.5).eval()
    assert infer_arch(half.state_dict()) == ("vgg16_bn_half", 10)
    assert infer_arch(vgg16_bn_cifar(num_classes=4, width_mult=0.25).state_dict()) == ("vgg16_bn_quarter", 4)
    # a checkpoint dict as benchmarks/bench_vgg.py writes it, reloaded with weights_only=True
    path = tmp_path / "vgg.pt"
    torch.save({"state_dict": half.state_dict(), "arch": "vgg16_bn_half", "config": half.config(),
                "train": {"epochs_done": 1}}, path)
    loaded = load_model(path)
    assert (loaded.arch, loaded.num_classes, loaded.container) == ("vgg16_bn_half", 10, "state_dict")
    assert _same_outputs(loaded.model, half)
    assert isinstance(build_model("vgg16_bn_half"), VGG)
    # other widths in VGG-16's layout (e.g. a pruned VGG): 'vgg', rebuilt from the shapes
    it = iter(range(3, 16))
    odd = VGG(cfg=[v if v == "M" else next(it) for v in VGG16_CFG], num_classes=7).eval()
    assert infer_arch(odd.state_dict()) == ("vgg", 7)
    torch.save(odd.state_dict(), path)
    loaded = load_model(path)
    assert loaded.arch == "vgg" and loaded.model.config() == odd.config() and _same_outputs(loaded.model, odd)
    # a different layout is not guessed
    assert infer_arch(VGG(cfg=(8, "M", 16), num_classes=3).state_dict()) is None


def test_pruned_cifar_resnet_rebuilds_from_checkpoint_shapes(tmp_path):
    model = cifar_resnet(20, width=(16, 24, 48), block_widths=[[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    path = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path)
    assert loaded.model.config() == model.config()
    assert _same_outputs(loaded.model, model)
    with pytest.raises(ModelLoadError, match="shape mismatches layer1.0.conv1.weight.*omit --arch"):
        load_model(path, arch="resnet20")


def test_explicit_arch_for_torchvision_checkpoint(tmp_path):
    model = build_model("torchvision:resnet18", num_classes=5)
    path = tmp_path / "tv.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    with pytest.raises(ModelLoadError, match="cannot infer the architecture.*--arch"):
        load_model(path)
    loaded = load_model(path, arch="torchvision:resnet18")
    assert loaded.num_classes == 5 and loaded.arch == "torchvision:resnet18"
    assert _same_outputs(loaded.model, model)


def test_mismatched_arch_names_keys_and_suggests_inferred_arch(tmp_path):
    path20 = tmp_path / "r20.pt"
    torch.save(cifar_resnet(20).state_dict(), path20)
    with pytest.raises(ModelLoadError) as err:
        load_model(path20, arch="resnet56")
    msg = str(err.value)
    assert msg.startswith("checkpoint does not match arch resnet56: missing keys layer1.3.conv1.weight")
    assert "did you mean --arch resnet20?" in msg and "\n" not in msg
    path56 = tmp_path / "r56.pt"
    torch.save(cifar_resnet(56).state_dict(), path56)
    with pytest.raises(ModelLoadError, match="unexpected keys layer1.3.conv1.weight.*did you mean --arch resnet56"):
        load_model(path56, arch="resnet20")


def test_num_classes_conflict_is_reported(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(cifar_resnet(20).state_dict(), path)
    assert load_model(path, num_classes=10).num_classes == 10
    with pytest.raises(ModelLoadError, match="10-class head but num_classes=100"):
        load_model(path, num_classes=100)
    with pytest.raises(ModelLoadError, match="10-class head but num_classes=3"):
        load_model(path, arch="resnet20", num_classes=3)


def test_pickled_module_needs_trust(tmp_path):
    model = cifar_resnet(20)
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(ModelLoadError, match="execute code.*--trust-model") as err:
        load_model(path)
    assert "CifarResNet" in str(err.value) and "\n" not in str(err.value)
    loaded = load_model(path, trust_model=True)
    assert (loaded.arch, loaded.key_style, loaded.container) == ("resnet20", "pickled-module", "module")
    assert _same_outputs(loaded.model, model) and not loaded.model.training
    # With an explicit arch the pickled module's weights go into a freshly built network.
    rebuilt = load_model(path, trust_model=True, arch="resnet20")
    assert type(rebuilt.model) is CifarResNet and _same_outputs(rebuilt.model, model)


def test_trust_model_still_loads_state_dicts_safely(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(cifar_resnet(20).state_dict(), path)
    assert load_model(path, trust_model=True).key_style == "plain"


@pytest.mark.parametrize(
    "content",
    [b"hello, this is a text file\n", b"", b"PK\x03\x04 truncated zip"],
    ids=["text", "empty", "bad-zip"],
)
def test_corrupt_files_raise_one_line_errors(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_truncated_checkpoint(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(cifar_resnet(20).state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint"):
        load_model(bad)


def test_missing_file_directory_and_odd_contents(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model(tmp_path)
    odd = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], odd)
    with pytest.raises(ModelLoadError, match="holds a list"):
        load_model(odd)
    meta = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, meta)
    with pytest.raises(ModelLoadError, match="no state dict: top-level keys are 'epoch', 'lr'"):
        load_model(meta)
    assert issubclass(ModelLoadError, ValueError)


def test_unknown_arch_in_load_model(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(cifar_resnet(20).state_dict(), path)
    with pytest.raises(ModelLoadError, match="unknown arch 'resnet7'"):
        load_model(path, arch="resnet7")


# --------------------------------------------------------------------------- real checkpoints (slow)

SHARED_CHECKPOINTS = {
    "resnet20-cifar10.th": ("resnet20", "dataparallel"),
    "resnet56-cifar10.th": ("resnet56", "dataparallel"),
    "resnet20-cifar10-jpeg.th": ("resnet20", "plain"),
    "resnet56-cifar10-jpeg.th": ("resnet56", "plain"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHARED_CHECKPOINTS))
def test_shared_checkpoints_load_strict_with_inferred_arch(name):
    path = require_shared(f"models/{name}")
    loaded = load_model(path)
    arch, style = SHARED_CHECKPOINTS[name]
    assert (loaded.arch, loaded.num_classes, loaded.key_style) == (arch, 10, style)
    # Explicit arch gives the same weights.
    again = load_model(path, arch=arch, num_classes=10)
    for (k, a), b in zip(loaded.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_shared_resnet20_jpeg_accuracy_on_balanced_sample():
    from si_compress.data import balanced_indices, load_dataset, make_loader

    ckpt = require_shared("models/resnet20-cifar10-jpeg.th")
    tree = require_shared("data/cifar10-jpeg")
    info = load_dataset(tree, split="test")
    idx = balanced_indices(info.labels, 500, seed=0)
    model = load_model(ckpt).model
    correct = 0
    with torch.no_grad():
        for x, y in make_loader(info, idx, batch_size=250):
            correct += int((model(x).argmax(1) == y).sum())
    acc = correct / len(idx)
    # README: 88.69 % on all 10,000 test images; 500 samples have a standard error of about 1.4 %.
    assert acc >= 0.80, acc
    assert np.bincount(info.labels[idx]).tolist() == [50] * 10
