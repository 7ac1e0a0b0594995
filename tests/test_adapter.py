"""The model adapter on any CNN: torchvision networks, our CIFAR nets and a user's own class.

For each: the recorded layers hold every section output and the classifier input; a plan that keeps
everything is the identity; a 0.5 MACs budget gives a physically smaller model within 3% of the
target (one count: torch-pruning's) that keeps its output shape, reloads with weights_only=True and
exports to ONNX matching torch in onnxruntime.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from _archs import UserNet, settle_bn, torchvision_model, trained_digits_usernet
from si_compress.compress import apply_plan, export_onnx, load_compressed, save_compressed
from si_compress.models import build_model
from si_compress.pipeline import CompressConfig, count_tp, si_plan
from si_compress.plan import CompressionPlan
from si_compress.structure import describe, drop_section

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "googlenet", "vgg16_bn", "efficientnet_b0"]
OURS = ["resnet20", "vgg16_bn_quarter", "digits_cnn", "user"]
# Removable sections the adapter must find in each: residual branches, plus concatenation branches
# (densenet121: 58 dense layers; googlenet: 9 inceptions x 4 branches; user: the two concatenated branches).
SECTIONS = {"resnet18": 8, "resnet50": 16, "mobilenet_v2": 10, "efficientnet_b0": 9, "densenet121": 58,
            "googlenet": 36, "vgg16_bn": 0, "resnet20": 9, "vgg16_bn_quarter": 0, "digits_cnn": 0, "user": 5}


def make(name):
    torch.manual_seed(0)
    if name in TORCHVISION:
        m, x = torchvision_model(name), torch.randn(24, 3, 32, 32)
    elif name == "user":
        m, x = UserNet(), torch.randn(24, 3, 32, 32)
    elif name == "digits_cnn":
        m, x = build_model(name), torch.randn(24, 1, 8, 8)
    else:
        m, x = build_model(name), torch.randn(24, 3, 32, 32)
    return settle_bn(m, x), x


@pytest.fixture(scope="module", params=TORCHVISION + OURS)
def arch(request):
    m, x = make(request.param)
    return request.param, m, x, describe(m, x[:1])


def test_records_every_section_and_the_classifier_input(arch):
    name, m, x, st = arch
    assert len(st.blocks) == SECTIONS[name]
    assert all(b.name in st.layers for b in st.blocks if b.kind == "residual")
    assert all(b.parent in st.layers for b in st.blocks if b.kind == "concat")
    assert st.layers[-1] == st.head_input and st.head_input.endswith(":input")
    assert len(st.layers) >= 3
    assert st.convs, "every model here has channel groups the planner may resize"
    # every recorded layer runs once and yields a tensor of the batch
    from si_compress.features import FeatureRecorder

    with FeatureRecorder(m, list(st.layers)) as rec, torch.no_grad():
        m(x[:2])
        maps = rec.take()
    assert all(v.shape[0] == 2 for v in maps.values())


def test_keep_everything_plan_is_the_identity(arch):
    name, m, x, _ = arch
    same = apply_plan(m, CompressionPlan(arch=name, num_classes=10), example_input=x[:1])
    with torch.no_grad():
        assert torch.allclose(same(x[:4]), m(x[:4]), atol=1e-5, rtol=0)


def test_every_section_drops_to_its_shortcut(arch):
    name, m, x, st = arch
    for b in [b for b in st.blocks if b.kind == "residual"][:3]:
        sec = m.get_submodule(b.name)
        dropped = drop_section(sec)
        xin = {}
        h = sec.register_forward_pre_hook(lambda mod, a: xin.setdefault("x", a[0]))
        with torch.no_grad():
            ref = m(x[:2])
        h.remove()
        with torch.no_grad():
            out = dropped(xin["x"])
        assert out.shape == sec(xin["x"]).shape
        assert not any(n in dict(dropped.named_modules()) for n in (s[len(b.name) + 1:] for s in b.branch))
        assert ref.shape == (2, 10)


@pytest.fixture(scope="module")
def compressed(arch, tmp_path_factory):
    name, m, x, st = arch
    y = torch.arange(len(x)) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=12)
    # digits_cnn (16/32/64 filters on 8x8 maps): one step of 8, even 4, filters is over 3% of its MACs
    cfg = CompressConfig(target_macs=0.5, objective="macs", order=1, grid=2, round_to=1 if name == "digits_cnn" else 8)
    plan, _ = si_plan(m, loader, arch=name, num_classes=10, example_input=x[:1], config=cfg)
    small = apply_plan(m, plan, example_input=x[:1])
    return name, m, x, plan, small, tmp_path_factory.mktemp(name.replace(":", "_"))


def test_half_the_macs_within_3_percent(compressed):
    name, m, x, plan, small, _ = compressed
    base, base_params = count_tp(m, x[:1])
    macs, params = count_tp(small, x[:1])
    assert 0.97 * 0.5 <= macs / base <= 0.5, f"{name}: {macs / base:.3f} of the MACs"
    assert params < base_params
    assert plan.predicted["macs"] == macs and plan.predicted["base_macs"] == base  # one count
    with torch.no_grad():
        assert small(x[:3]).shape == (3, 10)


def test_compressed_model_reloads_with_weights_only(compressed):
    name, m, x, plan, small, tmp = compressed
    arch = name if name not in TORCHVISION else f"torchvision:{name}"
    if name == "user":
        pytest.skip("covered by the user-class CLI test (needs --arch file.py:Class)")
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else None
    plan = CompressionPlan.from_dict({**plan.to_dict(), "arch": arch})
    save_compressed(tmp / "model.pt", small, plan, arch=arch, num_classes=10, base=m, input_shape=tuple(x.shape[1:]),
                    arch_kwargs=kwargs)
    back, _ = load_compressed(tmp / "model.pt")
    with torch.no_grad():
        assert torch.allclose(back(x[:3]), small(x[:3]), atol=1e-5, rtol=0)


def test_onnx_export_matches_torch(compressed):
    ort = pytest.importorskip("onnxruntime")
    name, m, x, plan, small, tmp = compressed
    export_onnx(small, tmp / "model.onnx", x[:1])
    sess = ort.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x[:3].numpy()})[0]
    with torch.no_grad():
        ref = small(x[:3]).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_compensation_raises_the_accuracy_of_a_briefly_trained_user_model():
    """UserNet trained for a few seconds on the bundled digits; at half the MACs the least-squares
    re-fit of every consumer (no labels, no training) must recover accuracy the pruning lost."""
    from si_compress.compress import evaluate
    from si_compress.pipeline import execute

    m, train, test = trained_digits_usernet()
    calib = DataLoader(torch.utils.data.Subset(train.dataset, range(400)), batch_size=100)
    test_loader = DataLoader(test.dataset, batch_size=256)
    assert evaluate(m, test_loader) > 0.85
    cfg = CompressConfig(target_macs=0.5, objective="macs", round_to=4, order=1, compensation="refit")
    x0 = next(iter(calib))[0][:1]
    plan, _ = si_plan(m, calib, arch="user", num_classes=10, example_input=x0, config=cfg)
    small, metrics = execute(m, plan, example_input=x0, calib_loader=calib, test_loader=test_loader, config=cfg)
    assert metrics["acc_compensated"] > metrics["acc_pruned"] + 0.02, metrics
    assert metrics["refit"] and all(r["after"] <= r["before"] for r in metrics["refit"].values() if "after" in r)


def test_a_dropped_section_trains_when_its_activation_was_in_place():
    """torchvision's BasicBlock ends in ReLU(inplace=True); dropped, that ReLU would read the block's
    input itself and overwrite a tensor autograd still needs. The dropped section must train."""
    m = torchvision_model("resnet18")
    plan = CompressionPlan(arch="r18", num_classes=10, dropped_blocks=("layer1.1", "layer4.1"))
    x = torch.randn(2, 3, 32, 32)
    small = apply_plan(m, plan, example_input=x[:1]).train()
    small(x).sum().backward()          # raised "modified by an inplace operation" before the fix
    assert all(p.grad is not None for p in small.layer1[0].parameters())
    assert m.layer1[1].relu.inplace    # the user's model is untouched


class _Untraceable(torch.nn.Module):
    """A residual block whose forward branches on the data: torch.fx cannot trace it."""

    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if float(y.detach().mean()) > 1e9:   # data-dependent control flow
            y = y * 0
        return torch.relu(x + y)


def test_unsupported_constructs_are_named_with_the_fix():
    from si_compress.structure import UnsupportedModel

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), _Untraceable(8),
                              torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    st = describe(net, torch.zeros(1, 3, 16, 16))
    assert "2" in st.layers and not st.blocks                 # analysed, but cannot be dropped
    assert any(n.startswith("2 (_Untraceable)") and "torch.fx cannot trace" in n and "traceable" in n for n in st.notes)
    assert [u.conv for u in st.convs] == ["3"]                # its inner conv feeds the addition: left whole
    assert any("residual" in g.reason for g in st.skipped)
    with pytest.raises(ValueError, match="not a removable section"):
        apply_plan(net, CompressionPlan(arch="n", num_classes=10, dropped_blocks=("2",)), example_input=torch.zeros(1, 3, 16, 16))
    no_head = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(UnsupportedModel, match="no nn.Linear classifier.*nn.Linear"):
        describe(no_head, torch.zeros(1, 3, 8, 8))


def _silence(branch: torch.nn.Module) -> None:
    """Make a branch output exact zeros: its last conv (and the BN after it) give 0 before the ReLU."""
    convs = [m for m in branch.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in branch.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        convs[-1].weight.zero_()
        if convs[-1].bias is not None:
            convs[-1].bias.zero_()
        if bns:
            bns[-1].weight.zero_()
            bns[-1].bias.zero_()


@pytest.mark.parametrize("name,drop", [("user", ("cat.a",)), ("googlenet", ("inception3a.branch2", "inception4b.branch4"))])
def test_dropping_a_concat_branch_equals_silencing_it(name, drop):
    """A branch whose outputs are zero contributes nothing downstream: removing it (and its channels
    from every consumer) must give the same logits. Its MACs saving is what describe() predicted."""
    import copy

    m, x = make(name)
    st = describe(m, x[:1])
    blocks = {b.name: b for b in st.blocks}
    assert all(blocks[d].kind == "concat" for d in drop)
    silent = copy.deepcopy(m)
    for d in drop:
        _silence(silent.get_submodule(d))
    small = apply_plan(silent, CompressionPlan(arch=name, num_classes=10, dropped_blocks=drop), example_input=x[:1])
    for d in drop:
        with pytest.raises(AttributeError):
            small.get_submodule(d)
    with torch.no_grad():
        torch.testing.assert_close(small(x[:4]), silent(x[:4]), atol=1e-5, rtol=1e-5)
    saved = count_tp(m, x[:1])[0] - count_tp(small, x[:1])[0]
    predicted = sum(blocks[d].macs for d in drop)
    # the adapter counts conv/linear MACs; torch-pruning's count adds the branch's BN and ReLU work
    assert 0.99 * predicted <= saved <= 1.05 * predicted, (saved, predicted)


def test_dense_layers_drop_and_the_model_reloads(tmp_path):
    m, x = make("densenet121")
    st = describe(m, x[:1])
    layers = [b for b in st.blocks if b.parent == "features.denseblock2"]
    assert len(layers) == 12 and not any(b.needs_one for b in layers)    # the block input always stays
    # each dense layer's channels sit at their offset in the block's output
    assert [b.channels[0] for b in layers[:3]] == [128, 160, 192] and all(len(b.channels) == 32 for b in layers)
    # its two groups (inner width, output channels) belong to the section
    assert {u.conv for u in st.convs if u.block == layers[0].name} == {f"{layers[0].name}.conv1", f"{layers[0].name}.conv2"}
    plan = CompressionPlan(arch="torchvision:densenet121", num_classes=10,
                           dropped_blocks=(layers[0].name, layers[5].name, "features.denseblock3.denselayer24"))
    small = apply_plan(m, plan, example_input=x[:1])
    assert small.get_submodule("features.transition2.conv").in_channels == 512 - 64
    assert small.get_submodule("features.transition3.norm").num_features == 1024 - 32
    save_compressed(tmp_path / "model.pt", small, plan, arch="torchvision:densenet121", num_classes=10, base=m,
                    input_shape=(3, 32, 32))
    back, _ = load_compressed(tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(back(x[:3]), small(x[:3]), atol=1e-5, rtol=0)


def test_one_branch_of_each_concatenation_stays():
    from si_compress.planning import PlannerConfig, Ranking, plan_compression
    from si_compress.structure import BlockUnit, ConvUnit, ModelStructure

    blocks = tuple(BlockUnit(f"cat.{c}", 400, False, 100, kind="concat", parent="cat", channels=tuple(range(4 * i, 4 * i + 4)),
                             needs_one=True) for i, c in enumerate("ab"))
    convs = tuple(ConvUnit(b.name, "head", "head:input", 4, 100, 25, b.name) for b in blocks)
    st = ModelStructure(blocks=blocks, convs=convs, chain=(), total_macs=900, total_params=300)
    rk = {u.conv: Ranking(method="si", order=(0, 1, 2, 3), curve=(0.1, 0.2, 0.3, 0.4)) for u in convs}
    gains = {"cat.a": (0.5, 0.5), "cat.b": (0.5, 0.49)}     # neither raises SI
    plan = plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=None))
    assert plan.dropped_blocks == ("cat.a",)
    plan = plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=0.2))
    assert len(plan.dropped_blocks) == 1
    with pytest.raises(ValueError, match="empty"):
        m, x = make("user")
        apply_plan(m, CompressionPlan(arch="u", num_classes=10, dropped_blocks=("cat.a", "cat.b")), example_input=x[:1])


class _Unit(torch.nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.nn.functional.relu(self.bn(self.conv(x)))


class _UserChain(torch.nn.Module):
    """A plain chain of the user's own blocks, no ``features`` Sequential, functional pooling."""

    def __init__(self):
        super().__init__()
        self.block1, self.block2, self.block3 = _Unit(3, 8), _Unit(8, 16), _Unit(16, 32)
        self.out = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(self.block1(x), 2)
        x = self.block3(self.block2(x))
        return self.out(x.mean((2, 3)))


def test_any_plain_chain_is_truncated_after_its_layer(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    m = settle_bn(_UserChain(), x)
    st = describe(m, x[:1])
    assert st.chain == ("block1", "block2", "block3") and not st.blocks
    plan = CompressionPlan(arch="u", num_classes=10, truncate_after="block2")
    small = apply_plan(m, plan, example_input=x[:1])
    assert "block3" not in dict(small.named_modules()) and small.out.in_features == 16
    with torch.no_grad():
        feats = m.block2(torch.nn.functional.max_pool2d(m.block1(x), 2)).mean((2, 3))
        torch.testing.assert_close(small(x), small.out(feats))
    # a state dict of the truncated model loads into the same truncation of a fresh base
    again = apply_plan(_UserChain(), plan, example_input=x[:1])
    again.load_state_dict(small.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x))
