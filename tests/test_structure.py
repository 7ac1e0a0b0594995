import torch

from si_compress.baselines import tp_magnitude_plan
from si_compress.compress import apply_plan
from si_compress.features import module_macs
from si_compress.models import build_model, cifar_resnet
from si_compress.pipeline import count_tp
from si_compress.structure import collect_filter_groups, prunable_structure


def test_resnet_structure_macs_are_exact():
    model = cifar_resnet(20, width=(8, 16, 32)).eval()
    x = torch.zeros(1, 3, 32, 32)
    st = prunable_structure(model, x)
    assert [b.name for b in st.blocks][:2] == ["layer1.0", "layer1.1"] and len(st.blocks) == 9
    assert [b.downsample for b in st.blocks] == [False] * 3 + [True, False, False] * 2
    macs = module_macs(model, x)
    for u in st.convs:
        # removing every filter of a block's conv1 removes exactly conv1 + conv2 MACs
        assert u.macs_per_filter * u.out_channels == macs[u.conv] + macs[u.consumer]
        assert u.consumer == u.conv.replace("conv1", "conv2") and u.activation == f"{u.consumer}:input"
        assert u.block == u.conv.rsplit(".", 1)[0]
    assert st.total_macs == sum(macs.values())


def test_plain_chain_structure():
    st = prunable_structure(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8))
    assert not st.blocks
    # the last conv's channels reach the classifier through pooling: its group is observed there
    assert [u.conv for u in st.convs] == ["features.0", "features.4", "features.8"]
    assert [u.activation for u in st.convs] == ["features.4:input", "features.8:input", "classifier:input"]
    assert st.chain == ("features.2", "features.6", "features.10")


def test_filter_groups_are_pooled_maps():
    torch.manual_seed(0)
    model = cifar_resnet(20, width=(8, 16, 32)).eval()
    x = torch.randn(10, 3, 32, 32)
    y = torch.arange(10) % 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    groups, labels = collect_filter_groups(model, loader, ["layer1.0.relu1", "layer3.2.relu1"], grid=4)
    assert groups["layer1.0.relu1"].shape == (10, 8, 16) and groups["layer3.2.relu1"].shape == (10, 32, 16)
    assert labels.tolist() == y.tolist()
    with torch.no_grad():
        b = model.layer1[0]
        h = b.relu1(b.bn1(b.conv1(model.relu(model.bn1(model.conv1(x))))))
    ref = torch.nn.functional.adaptive_avg_pool2d(h, 4).flatten(2).numpy()
    assert abs(groups["layer1.0.relu1"] - ref).max() < 1e-5


def test_tp_magnitude_baseline_meets_budget():
    model = build_model("resnet20").eval()
    x = torch.zeros(1, 3, 32, 32)
    st = prunable_structure(model, x)
    plan = tp_magnitude_plan(model, st, example_input=x, target_macs=0.6, arch="resnet20", num_classes=10)
    got, _ = count_tp(apply_plan(model, plan, example_input=x), x)
    base, _ = count_tp(model, x)
    assert got <= 0.6 * base
    # kept filters are the largest-L1 ones of their layer only globally: each kept set is a valid index set
    for d in plan.layers:
        assert 1 <= len(d.keep) <= d.out_channels
