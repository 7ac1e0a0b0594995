import pytest
import torch

from si_compress.baselines import tp_magnitude_plan
from si_compress.compress import apply_plan
from si_compress.features import module_macs
from si_compress.models import build_model, cifar_resnet
from si_compress.pipeline import count_tp
from si_compress.plan import CompressionPlan, LayerDecision
from si_compress.structure import collect_filter_groups, prunable_structure


def test_resnet_structure_macs_are_exact():
    model = cifar_resnet(20, width=(8, 16, 32)).eval()
    x = torch.zeros(1, 3, 32, 32)
    st = prunable_structure(model, x)
    assert [b.name for b in st.blocks][:2] == ["layer1.0", "layer1.1"] and len(st.blocks) == 9
    assert [b.downsample for b in st.blocks] == [False] * 3 + [True, False, False] * 2
    macs = module_macs(model, x)
    inner = [u for u in st.convs if not u.coupled]
    assert len(inner) == 9
    for u in inner:
        # removing every filter of a block's conv1 removes exactly conv1 + conv2 MACs
        assert u.macs_per_filter * u.out_channels == macs[u.conv] + macs[u.consumer]
        assert u.consumer == u.conv.replace("conv1", "conv2") and u.activation == f"{u.consumer}:input"
        assert u.block == u.conv.rsplit(".", 1)[0]
    # the three residual streams: every conv writing or reading a stage's shared channels
    streams = {u.conv: u for u in st.convs if u.coupled}
    assert {k: v.coupled for k, v in streams.items()} == {
        "conv1": ("layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"),
        "layer2.0.conv2": ("layer2.1.conv2", "layer2.2.conv2"),
        "layer3.0.conv2": ("layer3.1.conv2", "layer3.2.conv2")}
    assert [v.activation for v in streams.values()] == ["layer1.2", "layer2.2", "layer3.2"]
    readers = {"conv1": ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1"],
               "layer2.0.conv2": ["layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1"],
               "layer3.0.conv2": ["layer3.1.conv1", "layer3.2.conv1", "linear"]}
    for name, u in streams.items():
        assert u.block is None
        every = [name, *u.coupled, *readers[name]]
        assert abs(u.macs_per_filter * u.out_channels - sum(macs[n] for n in every)) <= u.out_channels
        assert sorted(n for n, m in u.shares if m) == sorted(every)   # the option-A shortcut costs nothing
    assert st.total_macs == sum(macs.values())


def _random_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


@pytest.mark.parametrize("arch", ["cifar", "torchvision"])
def test_pruned_streams_equal_the_network_with_those_channels_silenced(arch):
    """Removing stream channels == the base network where those channels are zero everywhere: every
    writer's filter and BN silenced, and the shortcut no longer carrying them into the stage."""
    import copy

    import torchvision

    torch.manual_seed(0)
    model = cifar_resnet(20, width=(8, 16, 32)) if arch == "cifar" else torchvision.models.resnet18(num_classes=10)
    model = _random_bn(model).eval()
    x = torch.randn(3, 3, 32, 32)
    st = prunable_structure(model, x[:1])
    streams = [u for u in st.convs if u.coupled]
    assert len(streams) == (3 if arch == "cifar" else 4)
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    g = torch.Generator().manual_seed(1)
    layers, silenced = [], {}
    for u in streams:
        keep = sorted(torch.randperm(u.out_channels, generator=g)[: u.out_channels // 2 + 1].tolist())
        drop = [i for i in range(u.out_channels) if i not in keep]
        layers.append(LayerDecision(name=u.conv, out_channels=u.out_channels, keep=tuple(keep), coupled=u.coupled))
        for w in (u.conv, *u.coupled):
            silenced[w] = drop
    # a writer's BN is the module run right after it; silence both
    order = [n for n, _ in ref.named_modules()]
    for w, drop in silenced.items():
        conv = mods[w]
        conv.weight.data[drop] = 0
        bn = next(mods[n] for n in order[order.index(w) + 1:] if isinstance(mods[n], torch.nn.BatchNorm2d))
        bn.weight.data[drop] = 0
        bn.bias.data[drop] = 0
    # the first block of a stage adds its shortcut (a projection or the option-A gather) to the stream
    for u in streams:
        drop = silenced[u.conv]
        for name, m in ref.named_modules():
            short = getattr(m, "shortcut", None) or getattr(m, "downsample", None)
            if isinstance(short, torch.nn.Module) and not isinstance(short, torch.nn.Identity) and \
                    any(w.startswith(name + ".") for w in (u.conv, *u.coupled)) and \
                    getattr(m, "conv2", None) is not None and f"{name}.conv2" in (u.conv, *u.coupled):
                def zero(mod, args, out, drop=drop):
                    out = out.clone()
                    out[:, drop] = 0
                    return out
                short.register_forward_hook(zero)
    pruned = apply_plan(model, CompressionPlan(arch="r", num_classes=10, layers=tuple(layers)), example_input=x[:1])
    with torch.no_grad():
        assert (pruned(x) - ref(x)).abs().max() < 1e-4
        assert (model(x) - ref(x)).abs().max() > 1e-2     # the silencing matters
    kept = sum(p.numel() for p in pruned.parameters())
    assert kept < 0.6 * sum(p.numel() for p in model.parameters())
    if arch == "cifar":  # the option-A shortcut is parameter-free again, and the weights reload
        assert type(pruned.layer2[0].shortcut).__name__ == "ChannelGather"
        again = apply_plan(cifar_resnet(20, width=(8, 16, 32)).eval(),
                           CompressionPlan(arch="r", num_classes=10, layers=tuple(layers)), example_input=x[:1])
        again.load_state_dict(pruned.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(again(x), pruned(x))


def test_a_stream_is_pruned_only_with_all_its_writers_named():
    model = cifar_resnet(20, width=(8, 16, 32)).eval()
    x = torch.zeros(1, 3, 32, 32)
    keep = tuple(range(0, 16, 2))
    partial = LayerDecision(name="layer2.0.conv2", out_channels=16, keep=keep, coupled=("layer2.1.conv2",))
    with pytest.raises(ValueError, match="lacks layer2.2.conv2"):
        apply_plan(model, CompressionPlan(arch="r", num_classes=10, layers=(partial,)), example_input=x)
    whole = LayerDecision(name="layer2.0.conv2", out_channels=16, keep=keep, coupled=("layer2.1.conv2", "layer2.2.conv2"))
    twice = LayerDecision(name="layer2.1.conv2", out_channels=16, keep=keep, coupled=("layer2.0.conv2", "layer2.2.conv2"))
    with pytest.raises(ValueError, match="twice"):
        apply_plan(model, CompressionPlan(arch="r", num_classes=10, layers=(whole, twice)), example_input=x)
    inner = LayerDecision(name="layer2.1.conv1", out_channels=16, keep=keep, coupled=("layer2.2.conv1",))
    with pytest.raises(ValueError, match="not tied"):
        apply_plan(model, CompressionPlan(arch="r", num_classes=10, layers=(inner,)), example_input=x)


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
    assert any(d.coupled for d in plan.layers)   # torch-pruning narrows the residual streams too


@pytest.mark.parametrize("importance,global_pruning", [("magnitude", True), ("group-norm", True), ("group-norm", False)])
def test_tp_baseline_reads_back_the_filters_it_kept(importance, global_pruning):
    """The plan's keep lists are the filters torch-pruning itself kept: applying the plan to the base
    gives the very network the pruner produced (same outputs), global or local ranking."""
    import copy

    import torch_pruning as tp

    from si_compress.structure import channel_embeddings, insert_embedding_convs

    torch.manual_seed(0)
    model = _random_bn(cifar_resnet(20, width=(8, 16, 32))).eval()
    x = torch.randn(4, 3, 32, 32)
    st = prunable_structure(model, x[:1])
    plan = tp_magnitude_plan(model, st, example_input=x[:1], target_macs=0.5, arch="r", num_classes=10,
                             importance=importance, steps=20, global_pruning=global_pruning)
    # torch-pruning alone, same settings: the reference network
    work = copy.deepcopy(model)
    insert_embedding_convs(work, channel_embeddings(work, x[:1]))
    names = {n for u in st.convs for n in (u.conv, *u.coupled)}
    mods = dict(work.named_modules())
    ignored = [m for m in work.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
               and m not in [mods[n] for n in names] and not getattr(m, "_si_channel_embedding", False)]
    imp = tp.importance.MagnitudeImportance(p=1) if importance == "magnitude" else tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(work, x[:1], importance=imp, global_pruning=global_pruning, pruning_ratio=0.95,
                                  iterative_steps=20, ignored_layers=ignored)
    base_macs = tp.utils.count_ops_and_params(work, x[:1])[0]
    for _ in range(20):
        pruner.step()
        if tp.utils.count_ops_and_params(work, x[:1])[0] <= 0.5 * base_macs:
            break
    ours = apply_plan(model, plan, example_input=x[:1])
    with torch.no_grad():
        assert (ours(x) - work(x)).abs().max() < 1e-4
    kept = [len(d.keep) / d.out_channels for d in plan.layers]
    if not global_pruning:   # torch-pruning's local mode: every group loses the same fraction (to a channel)
        assert max(kept) - min(kept) <= 1 / 8 + 1e-9 and plan.settings["scope"] == "local"
    else:
        assert max(kept) - min(kept) > 1 / 8 and plan.settings["scope"] == "global"
