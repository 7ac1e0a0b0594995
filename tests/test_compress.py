"""Compression executor: plan application, compensation, training helpers, save/load, export."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from si_compress.compress import (
    apply_plan,
    cifar_augment,
    evaluate,
    export_onnx,
    export_torchscript,
    find_classifier,
    finetune,
    load_compressed,
    plan_cost,
    preload,
    recalibrate_bn,
    refit_consumers,
    save_compressed,
    train_head,
)
from si_compress.features.cost import model_cost
from si_compress.models import VGG, CifarResNet, ShortcutA, SmallCNN, register_arch
from si_compress.plan import CompressionPlan, HeadSpec, LayerDecision

X1 = torch.zeros(1, 3, 32, 32)
TINY_ARCH = "test_compress_tiny_resnet"


def tiny_resnet(num_classes=10):
    torch.manual_seed(0)
    m = CifarResNet(num_blocks=(2, 2, 2), width=(8, 16, 32), num_classes=num_classes)
    # Non-trivial BN statistics so that every test exercises the affine parts.
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.weight.data = 0.5 + torch.rand(c, generator=g)
            mod.bias.data = 0.1 * torch.randn(c, generator=g)
            mod.running_mean.data = 0.1 * torch.randn(c, generator=g)
            mod.running_var.data = 0.5 + torch.rand(c, generator=g)
    return m.eval()


def tiny_vgg():
    torch.manual_seed(0)
    return VGG(cfg=(8, "M", 16, "M", 32, 32), num_classes=10).eval()


def layer(name, channels, keep):
    return LayerDecision(name=name, out_channels=channels, keep=tuple(keep))


def plan_of(*layers, **kw):
    return CompressionPlan(arch=kw.pop("arch", TINY_ARCH), num_classes=kw.pop("num_classes", 10), layers=layers, **kw)


def data(n=32, seed=0, shape=(3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g)


@pytest.fixture(scope="module")
def resnet():
    return tiny_resnet()


# --------------------------------------------------------------------------- apply_plan


def test_pruning_conv1_keeps_exactly_the_kept_filters(resnet):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    keep = (0, 2, 3, 7)
    plan = plan_of(layer("layer1.0.conv1", 8, keep), layer("layer2.0.conv1", 16, range(0, 16, 2)))
    p = apply_plan(resnet, plan, example_input=X1)
    assert not p.training
    for k, v in resnet.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])
    ob, pb = resnet.layer1[0], p.layer1[0]
    idx = torch.tensor(keep)
    assert pb.conv1.weight.shape == (4, 8, 3, 3) and pb.conv2.weight.shape == (8, 4, 3, 3)
    assert torch.equal(pb.conv1.weight, ob.conv1.weight[idx])
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(pb.bn1, attr), getattr(ob.bn1, attr)[idx])
    assert torch.equal(pb.conv2.weight, ob.conv2.weight[:, idx])
    assert p.layer2[0].conv1.out_channels == 8 and p.layer2[0].conv2.in_channels == 8
    assert p(data(2)).shape == (2, 10)
    # config() follows the new widths, so the skeleton can be rebuilt from it.
    CifarResNet(**p.config()).load_state_dict(p.state_dict(), strict=True)


@pytest.mark.parametrize("name", ["conv1", "layer1.0.conv2", "layer2.1.conv2", "layer3.1.conv2"])
def test_channels_tied_by_residual_additions_are_refused(resnet, name):
    conv = resnet.get_submodule(name)
    with pytest.raises(ValueError, match="tied by residual additions"):
        apply_plan(resnet, plan_of(layer(name, conv.out_channels, (0, 1))), example_input=X1)


def test_classifier_and_unknown_layers_are_refused(resnet):
    with pytest.raises(ValueError, match="classifier"):
        apply_plan(resnet, plan_of(layer("linear", 10, range(5))), example_input=X1)
    with pytest.raises(ValueError, match="not a module"):
        apply_plan(resnet, plan_of(layer("layer9.conv1", 8, range(5))), example_input=X1)
    with pytest.raises(ValueError, match="different model"):
        apply_plan(resnet, plan_of(layer("layer1.0.conv1", 16, range(5))), example_input=X1)
    with pytest.raises(ValueError, match="not a removable section"):
        apply_plan(resnet, plan_of(dropped_blocks=("layer1.0.conv1",)), example_input=X1)


def test_plan_keeping_everything_is_the_identity(resnet):
    plan = plan_of(*(layer(f"layer{s}.{b}.conv1", w, range(w)) for s, w in ((1, 8), (2, 16), (3, 32)) for b in (0, 1)))
    x = data(4)
    p = apply_plan(resnet, plan, example_input=X1)
    torch.testing.assert_close(p(x), resnet(x), atol=1e-6, rtol=0)


def test_dropping_a_block_equals_replacing_it_by_its_shortcut(resnet):
    plan = plan_of(layer("layer1.1.conv1", 8, (1,)), layer("layer2.0.conv1", 16, range(8)),
                   dropped_blocks=("layer1.1", "layer2.0"))
    p = apply_plan(resnet, plan, example_input=X1)
    ref = copy.deepcopy(resnet)
    ref.layer1[1] = nn.Identity()
    ref.layer2[0] = ref.layer2[0].shortcut
    # the dropped sections keep no conv: only the shortcut path (and the ReLU after the sum) is left
    for blk in (p.layer1[1], p.layer2[0]):
        assert not any(isinstance(m, nn.Conv2d) for m in blk.modules())
    x = data(4)
    torch.testing.assert_close(p(x), ref(x), atol=1e-6, rtol=0)


def test_truncation_linear_and_mlp_heads():
    v = tiny_vgg()
    # Truncate after the second conv's ReLU: 16 channels feed the new head.
    p = apply_plan(v, plan_of(truncate_after="features.6"), example_input=X1)
    assert [n for n, _ in p.features.named_children()] == [str(i) for i in range(7)]
    assert p.classifier.in_features == 16 and p(data(2)).shape == (2, 10)
    # the kept prefix computes what the base's first 7 modules compute; the head reads its pooled map
    x = data(2)
    feats = v.features[:7](x)
    torch.testing.assert_close(p(x), p.classifier(feats.mean((2, 3))))
    # A pruned conv after the cut is ignored; one before it shrinks the head's input.
    plan = plan_of(layer("features.4", 16, range(0, 16, 4)), layer("features.8", 32, range(3)),
                   truncate_after="features.6", head=HeadSpec(kind="mlp", in_features=4, num_classes=5, hidden=12))
    p = apply_plan(v, plan, example_input=X1)
    name, head = find_classifier(p)
    assert name == "classifier" and [m.__class__ for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert head[0].in_features == 4 and head[2].out_features == 5 and p(data(3)).shape == (3, 5)
    # A linear head of the same shape keeps the (TP-pruned) classifier's weights.
    plan = plan_of(layer("features.11", 32, range(0, 32, 2)), head=HeadSpec(kind="linear", in_features=16, num_classes=10))
    p = apply_plan(v, plan, example_input=X1)
    assert torch.equal(p.classifier.weight, v.classifier.weight[:, ::2])
    with pytest.raises(ValueError, match="not a module"):
        apply_plan(v, plan_of(truncate_after="features.99"), example_input=X1)
    with pytest.raises(ValueError, match="input features"):
        apply_plan(v, plan_of(head=HeadSpec(kind="linear", in_features=7, num_classes=3)), example_input=X1)


def test_small_cnn_last_conv_prunes_the_classifier_input():
    torch.manual_seed(0)
    m = SmallCNN(in_channels=3, widths=(8, 16, 32)).eval()
    p = apply_plan(m, plan_of(layer("features.8", 32, range(0, 32, 4))), example_input=X1)
    assert p.classifier.in_features == 8 and p.widths == (8, 16, 8)
    torch.testing.assert_close(p.classifier.weight, m.classifier.weight[:, ::4])


def test_plan_cost_is_model_cost_of_the_result(resnet):
    plan = plan_of(layer("layer1.0.conv1", 8, range(3)), layer("layer3.0.conv1", 32, range(10)),
                   dropped_blocks=("layer2.1",), head=HeadSpec(kind="mlp", in_features=32, num_classes=10, hidden=6))
    params, macs = plan_cost(resnet, plan, example_input=X1)
    assert (params, macs) == model_cost(apply_plan(resnet, plan, example_input=X1), X1)
    base_params, base_macs = model_cost(resnet, X1)
    assert params < base_params and macs < base_macs


# --------------------------------------------------------------------------- compensation


def test_refit_reduces_reconstruction_error(resnet):
    plan = plan_of(layer("layer1.0.conv1", 8, (0, 3, 5)), layer("layer2.1.conv1", 16, range(0, 16, 3)),
                   dropped_blocks=("layer3.0",))
    p = apply_plan(resnet, plan, example_input=X1)
    calib = [(data(16, seed=s), None) for s in range(3)]
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    report = refit_consumers(p, resnet, plan, calib, ridge=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in resnet.state_dict().items())  # original untouched
    assert report["layer1.0.conv2"]["reason"] == "consumes pruned channels"
    assert report["layer1.1.conv2"]["reason"] == "input changed"   # after_change re-fits downstream blocks
    assert "layer3.0.conv2" not in report                          # a dropped block has nothing to fit
    for r in report.values():
        assert r["after"] < r["before"]
    only = refit_consumers(apply_plan(resnet, plan, example_input=X1), resnet, plan, calib, scope="consumers")
    assert set(only) == {"layer1.0.conv2", "layer2.1.conv2"}


def test_refit_recovers_exactly_when_pruned_channels_were_dead(resnet):
    """Pruned channels that are always zero after ReLU lose nothing; a perturbed consumer (weights
    and BN mean) is then recovered exactly by least squares, bias absorbed into running_mean."""
    orig = copy.deepcopy(resnet)
    removed = [1, 4, 6]
    orig.layer1[0].bn1.weight.data[removed] = 0.0
    orig.layer1[0].bn1.bias.data[removed] = -1.0
    keep = [i for i in range(8) if i not in removed]
    plan = plan_of(layer("layer1.0.conv1", 8, keep))
    p = apply_plan(orig, plan, example_input=X1)
    g = torch.Generator().manual_seed(3)
    p.layer1[0].conv2.weight.data += 0.3 * torch.randn(p.layer1[0].conv2.weight.shape, generator=g)
    p.layer1[0].bn2.running_mean.data += 0.5
    report = refit_consumers(p, orig, plan, [data(16, seed=s) for s in range(2)], ridge=1e-10)
    r = report["layer1.0.conv2"]
    assert r["before"] > 1e-2 and r["after"] < 1e-4
    torch.testing.assert_close(p.layer1[0].conv2.weight, orig.layer1[0].conv2.weight[:, keep], atol=1e-4, rtol=1e-4)
    x = data(4, seed=9)
    torch.testing.assert_close(p(x), orig(x), atol=1e-4, rtol=1e-4)


def test_refit_recovers_a_stream_whose_pruned_channels_were_dead(resnet):
    """Stage-1 stream channels that are zero everywhere (stem and every block's last BN silence them)
    lose nothing when pruned; a perturbed writer of the stream (a coupled conv2, at a section exit) is
    re-fitted against the original sum on the kept channels and recovered exactly."""
    orig = copy.deepcopy(resnet)
    removed = [2, 5]
    for bn in (orig.bn1, orig.layer1[0].bn2, orig.layer1[1].bn2):
        bn.weight.data[removed] = 0.0
        bn.bias.data[removed] = -1.0
    keep = [i for i in range(8) if i not in removed]
    plan = plan_of(LayerDecision(name="conv1", out_channels=8, keep=tuple(keep),
                                 coupled=("layer1.0.conv2", "layer1.1.conv2")))
    p = apply_plan(orig, plan, example_input=X1)
    x = data(4, seed=9)
    torch.testing.assert_close(p(x), orig(x), atol=1e-4, rtol=1e-4)
    g = torch.Generator().manual_seed(3)
    p.layer1[1].conv2.weight.data += 0.3 * torch.randn(p.layer1[1].conv2.weight.shape, generator=g)
    report = refit_consumers(p, orig, plan, [data(16, seed=s) for s in range(2)], ridge=1e-10)
    r = report["layer1.1.conv2"]
    assert r["before"] > 1e-2 and r["after"] < 1e-4
    torch.testing.assert_close(p(x), orig(x), atol=1e-4, rtol=1e-4)


def test_refit_on_a_plain_chain():
    v = tiny_vgg()
    recalibrate_bn(v, [data(16, seed=s) for s in range(2)])
    plan = plan_of(layer("features.4", 16, range(0, 16, 3)), layer("features.8", 32, range(0, 32, 2)))
    p = apply_plan(v, plan, example_input=X1)
    report = refit_consumers(p, v, plan, [data(16, seed=s) for s in range(2)], ridge=1e-6)
    assert set(report) == {"features.8", "features.11"}
    assert all(r["after"] < r["before"] for r in report.values())


def test_recalibrate_bn_restores_corrupted_statistics(resnet):
    loader = [(data(16, seed=s), torch.zeros(16)) for s in range(3)]
    ref = recalibrate_bn(copy.deepcopy(resnet), loader)
    bad = copy.deepcopy(ref)
    for m in bad.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.data += 3.0
            m.running_var.data *= 10.0
    x = data(8, seed=7)
    assert (bad(x) - ref(x)).abs().max() > 1e-2
    out = recalibrate_bn(bad, loader)
    assert out is bad and not bad.training
    assert all(m.momentum == 0.1 for m in bad.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(bad(x), ref(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(bad(x).argmax(1), ref(x).argmax(1))


# --------------------------------------------------------------------------- training helpers


def _toy_loader(n=64, batch=16, seed=0):
    x = data(n, seed=seed)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()   # learnable from the mean brightness
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def test_finetune_train_head_evaluate():
    torch.manual_seed(0)
    m = SmallCNN(in_channels=3, widths=(4, 8, 8), num_classes=2)
    loader = _toy_loader()
    features_before = copy.deepcopy(m.features.state_dict())
    head_before = m.classifier.weight.clone()
    hist = train_head(m, loader, epochs=3, lr=0.05)
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist)
    for k, v in m.features.state_dict().items():   # extractor frozen (BN stats included)
        assert torch.equal(v, features_before[k])
    assert not torch.equal(m.classifier.weight, head_before)
    seen = []
    hist = finetune(m, loader, epochs=2, lr=0.02, augment=cifar_augment, bf16=True, progress=seen.append)
    assert [h["epoch"] for h in hist] == [1, 2] and seen == hist and not m.training
    assert [h["steps"] for h in hist] == [4, 4]                       # 64 samples / batch 16
    assert [h["steps"] for h in finetune(m, loader, epochs=2, lr=0.02, max_steps=3)] == [3, 3]
    acc = evaluate(m, loader)
    assert 0.0 <= acc <= 1.0
    with pytest.raises(ValueError, match="schedule"):
        finetune(m, loader, epochs=1, schedule="step")


def test_cifar_augment_and_preload():
    x = data(6, shape=(3, 8, 8))
    assert torch.equal(cifar_augment(x, padding=0, flip=False), x)
    g = torch.Generator().manual_seed(0)
    out = cifar_augment(x, generator=g)
    assert out.shape == x.shape
    # Every output is a crop of the padded input, possibly flipped.
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        crops = [padded[i, :, a:a + 8, b:b + 8] for a in range(9) for b in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    ds = TensorDataset(x, torch.arange(6))
    cached = preload(DataLoader(ds, batch_size=4, shuffle=True), indices=[5, 0, 2])
    assert torch.equal(cached.tensors[0], x[[5, 0, 2]]) and cached.tensors[1].tolist() == [5, 0, 2]
    cached = preload(ds, indices=[5, 0, 2, 3, 1], batch_size=2)     # three batches, the last one partial
    assert torch.equal(cached.tensors[0], x[[5, 0, 2, 3, 1]]) and cached.tensors[1].tolist() == [5, 0, 2, 3, 1]


# --------------------------------------------------------------------------- save / load / export


@pytest.fixture(scope="module")
def compressed(resnet):
    register_arch(TINY_ARCH, tiny_resnet, overwrite=True)
    plan = plan_of(layer("layer1.0.conv1", 8, (0, 2, 5)), layer("layer3.1.conv1", 32, range(0, 32, 3)),
                   dropped_blocks=("layer2.0",), head=HeadSpec(kind="mlp", in_features=32, num_classes=4, hidden=8))
    return apply_plan(resnet, plan, example_input=X1), plan


def test_save_load_round_trip(tmp_path, compressed):
    model, plan = compressed
    path = save_compressed(tmp_path / "m.pt", model, plan, arch=TINY_ARCH, num_classes=10)
    assert torch.load(path, weights_only=True)["format"] == "si_compress.compressed"
    loaded, plan2 = load_compressed(path)
    assert plan2 == plan
    x = data(3)
    assert torch.equal(loaded(x), model(x))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_compressed(tmp_path / "bad.pt")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="load_model"):
        load_compressed(tmp_path / "plain.pt")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_and_onnx_match_torch(tmp_path, compressed):
    ort = pytest.importorskip("onnxruntime")
    model, _ = compressed
    x = data(2)
    ts = torch.jit.load(str(export_torchscript(model, tmp_path / "m.ts", x)))
    x3 = data(3, seed=5)
    torch.testing.assert_close(ts(x3), model(x3), atol=1e-6, rtol=0)
    path = export_onnx(model, tmp_path / "m.onnx", x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x3.numpy()})[0]           # batch 3: the batch axis is dynamic
    np.testing.assert_allclose(out, model(x3).detach().numpy(), atol=1e-4, rtol=0)


def test_reload_when_the_base_is_narrower_than_its_named_arch(tmp_path):
    # An already-pruned base (inner widths 5/6/7...) still carries the name of its depth; the saved
    # file must rebuild *that* base, not the named arch's default widths.
    register_arch(TINY_ARCH, tiny_resnet, overwrite=True)
    base = CifarResNet(num_blocks=(2, 2, 2), width=(8, 16, 32), block_widths=((5, 6), (7, 16), (9, 32)),
                       num_classes=10).eval()
    plan = plan_of(layer("layer3.1.conv1", 32, range(0, 32, 2)))
    small = apply_plan(base, plan, example_input=X1)
    path = save_compressed(tmp_path / "m.pt", small, plan, arch=TINY_ARCH, num_classes=10, base=base)
    loaded, _ = load_compressed(path)
    x = data(3)
    assert torch.equal(loaded(x), small(x))
    assert loaded.layer1[0].conv1.out_channels == 5
    # without the base config the named arch's widths are rebuilt and the weights do not fit
    path2 = save_compressed(tmp_path / "m2.pt", small, plan, arch=TINY_ARCH, num_classes=10)
    with pytest.raises(ValueError, match="do not fit"):
        load_compressed(path2)


def test_train_head_standardises_features_and_folds_back_exactly():
    """train_head trains the first linear layer on standardised features and folds mean and spread
    back into it: with lr 0 the head computes the same function on raw features far from zero
    (the accuracy this buys is checked in test_truncate.test_execute_trains_the_new_head)."""
    torch.manual_seed(0)
    y = torch.arange(4).repeat_interleave(30)
    x = (100 + y.float() / 10)[:, None] + 0.005 * torch.randn(len(y), 16)
    loader = DataLoader(TensorDataset(x, y), batch_size=60)
    for head in (nn.Linear(16, 4), nn.Linear(16, 4, bias=False)):
        model = nn.Sequential(nn.Identity(), head)
        before = copy.deepcopy(model)
        train_head(model, loader, epochs=1, lr=0.0, momentum=0.0, weight_decay=0.0)
        with torch.no_grad():
            torch.testing.assert_close(model(x), before(x), rtol=1e-4, atol=1e-3)
    # an MLP head that flattens a (N, C, 1, 1) input itself: the fold reads the flattened features
    x4 = x[:, :, None, None]
    loader4 = DataLoader(TensorDataset(x4, y), batch_size=60)
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))
    before = copy.deepcopy(model)
    train_head(model, loader4, epochs=1, lr=0.0, momentum=0.0, weight_decay=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x4), before(x4), rtol=1e-4, atol=1e-3)
