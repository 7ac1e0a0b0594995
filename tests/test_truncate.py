"""Truncating a plain chain after its SI peak: the pure rule, and plan -> execute on a tiny VGG."""
import pytest
import torch
from torch import nn

from si_compress.compress import apply_plan
from si_compress.models import VGG, CifarResNet
from si_compress.pipeline import CompressConfig, count_tp, execute, si_plan
from si_compress.plan import CompressionPlan
from si_compress.planning import TruncationDecision, choose_truncation

# --------------------------------------------------------------------------- the rule


def curve(*pairs, head=None):
    """Records (name, si, cumulative macs) with MACs growing by 100 per layer."""
    recs = [dict(name=n, si=s, macs=100 * (i + 1)) for i, (n, s) in enumerate(pairs)]
    if head is not None:
        recs.append(dict(name="classifier:input", si=head, macs=100 * len(pairs) + 1))
    return recs


CHAIN = ("features.2", "features.5", "features.9", "features.12", "features.16")


def test_cut_is_the_first_layer_within_tol_of_the_peak():
    recs = curve(*zip(CHAIN, (0.50, 0.70, 0.800, 0.805, 0.79)), head=0.78)
    d = choose_truncation(recs, tol=0.01, total_macs=1000)
    assert isinstance(d, TruncationDecision)
    assert d.truncate_after == "features.9" and d.layer == "features.9"
    assert d.peak_layer == "features.12" and d.max_si == pytest.approx(0.805)
    assert d.si_at_cut == pytest.approx(0.80)
    assert d.macs_at_cut == 300 and d.total_macs == 1000 and d.macs_saved == 700
    assert d.candidates == CHAIN and "features.9" in d.reason
    # tol 0: exactly the maximum
    assert choose_truncation(recs, tol=0.0).truncate_after == "features.12"
    # the default total is the largest cumulative MACs of the records
    assert choose_truncation(recs, tol=0.0).macs_saved == 501 - 400
    # a wide tolerance cuts earlier
    assert choose_truncation(recs, tol=0.2).truncate_after == "features.5"
    # explicit chain restricts the candidates (records need not all be candidates)
    assert choose_truncation(recs, chain=["features.12", "features.16"], tol=0.01).truncate_after == "features.12"
    assert TruncationDecision(**{**d.to_dict(), "candidates": tuple(d.to_dict()["candidates"])}) == d


def test_no_cut_when_si_peaks_at_the_end():
    rising = curve(*zip(CHAIN, (0.5, 0.6, 0.7, 0.8, 0.9)), head=0.9)
    d = choose_truncation(rising, tol=0.01)
    assert d.truncate_after is None and d.layer == "features.16" and d.macs_saved == 0
    # the peak lies only in the head input: nothing in the chain comes within tol
    d = choose_truncation(curve(*zip(CHAIN, (0.5, 0.6, 0.7, 0.8, 0.85)), head=0.95), tol=0.01)
    assert d.truncate_after is None and d.peak_layer == "classifier:input"
    # a residual net: the adapter's chain is empty, so nothing is a candidate
    d = choose_truncation(curve(("layer1.0", 0.9), ("layer1.1", 0.9)), chain=[])
    assert d.truncate_after is None and d.candidates == ()
    # by default every module record is a candidate, whatever its name
    d = choose_truncation(curve(("block1", 0.5), ("block2", 0.9), ("block3", 0.9)))
    assert d.truncate_after == "block2" and d.candidates == ("block1", "block2", "block3")


def test_rule_validates_its_inputs():
    recs = curve(*zip(CHAIN, (0.5, 0.9, 0.7, 0.6, 0.5)))
    with pytest.raises(ValueError, match="tol"):
        choose_truncation(recs, tol=1.0)
    with pytest.raises(ValueError, match="no SI record"):
        choose_truncation(recs, chain=["features.99"])
    with pytest.raises(ValueError, match="order"):
        choose_truncation(recs, chain=["features.5", "features.2"])
    with pytest.raises(ValueError, match="at least one"):
        choose_truncation([])


# --------------------------------------------------------------------------- pipeline on a tiny VGG

CFG = (8, "M", 16, "M", 16, 16)  # features: conv0 bn1 relu2 M3 conv4 bn5 relu6 M7 conv8 bn9 relu10 conv11 bn12 relu13
N_CLASSES = 4


def _bn(bn: nn.BatchNorm2d, bias):
    bn.weight.data.fill_(1.0)
    bn.bias.data = torch.as_tensor(bias, dtype=torch.float32).expand(bn.num_features).clone()
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)


def crafted_vgg(x: torch.Tensor) -> VGG:
    """SI is low at features.2 (7 huge-noise filters), 1 at features.6 and .10, lower again at .13.

    Image channel 0 carries the class (a symmetric offset); conv0 filter 0 averages it, filters 1-7
    amplify the noise of channels 1-2; conv4 copies filter 0 only; conv8/conv11 compute |x - mu|
    (mu: the mean over the images ``x``, as max-pooling shifts it), which merges classes {0, 3} and
    {1, 2} (except near the borders, where zero padding breaks the symmetry). The first layer at
    the SI peak is features.6: the chain is cut there.
    """
    torch.manual_seed(0)
    m = VGG(cfg=CFG, num_classes=N_CLASSES).eval()
    f = m.features
    with torch.no_grad():
        f[0].weight.zero_()
        f[0].weight[0, 0] = 1.0 / 9
        f[0].weight[1:, 1:] = 30 * torch.randn(7, 2, 3, 3)  # noise channels only
        _bn(f[1], [10.0] + [0.0] * 7)
        f[4].weight.zero_()
        f[4].weight[:, 0, 1, 1] = 1.0
        _bn(f[5], 0.0)
        mu = float(f[:8](x)[:, 0].mean())
        f[8].weight.zero_()
        f[8].weight[:8, 0, 1, 1] = 1.0
        f[8].weight[8:, 0, 1, 1] = -1.0
        _bn(f[9], [-mu] * 8 + [mu] * 8)
        f[11].weight.zero_()
        f[11].weight[:, :, 1, 1] = 1.0
        _bn(f[12], 0.0)
    return m


def crafted_data(n_per_class=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N_CLASSES).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 3, 32, 32, generator=g)
    x[:, 0] += torch.tensor([-3.0, -1.0, 1.0, 3.0])[y][:, None, None]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=60), x


@pytest.fixture(scope="module")
def tiny():
    loader, x = crafted_data()
    return crafted_vgg(x), loader, x[:1]


def test_plan_truncates_at_the_si_peak_and_prunes_only_before_it(tiny):
    model, loader, x0 = tiny
    plan, ev = si_plan(model, loader, arch="tiny_vgg", num_classes=N_CLASSES, example_input=x0,
                       config=CompressConfig(target_macs=0.4, round_to=1, ranking="si", objective="macs"))
    si = {r.name: r.si for r in ev.report.layers}
    assert si["features.2"] < 0.6 and si["features.6"] == si["features.10"] == 1.0 > si["features.13"]
    assert plan.truncate_after == "features.6" and ev.truncation.truncate_after == "features.6"
    t = plan.settings["truncation"]
    assert t["applied"] and t["layer"] == "features.6"
    assert 0 < t["macs_at_cut"] < t["total_macs"] and t["macs_saved"] == t["total_macs"] - t["macs_at_cut"]
    assert t["head_input_dim"] == 16 and t["head_input_si"] > 0.9
    # only convs before the cut are ranked and planned (conv4 now feeds the new head)
    assert {d.name for d in plan.layers} <= {"features.0", "features.4"} and "features.0" in ev.rankings
    assert "features.8" not in ev.rankings
    d = plan.layers[0]
    assert 0 in d.keep and len(d.keep) < 8 and d.ranking[0] == 0
    assert plan.head.kind == "linear" and plan.head.in_features == 16
    base_tp, _ = count_tp(model, x0)
    small = apply_plan(model, plan, example_input=x0)
    assert count_tp(small, x0)[0] <= 0.4 * base_tp == pytest.approx(0.4 * plan.predicted["base_macs"])
    assert plan.predicted["base_macs"] > plan.predicted["macs"]
    # physically shorter, forward works
    assert [n for n, _ in small.features.named_children()] == [str(i) for i in range(7)]
    assert small.get_submodule("features.0").out_channels == len(d.keep)
    assert small.classifier.in_features == small.get_submodule("features.4").out_channels
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, N_CLASSES)
    # the plan's JSON round-trips and re-applies to the same skeleton
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan
    small2 = apply_plan(model, again, example_input=x0)
    assert [tuple(p.shape) for p in small2.parameters()] == [tuple(p.shape) for p in small.parameters()]
    torch.testing.assert_close(small2(x0), small(x0))


def test_a_size_budget_after_truncation_is_a_fraction_of_the_whole_model(tiny):
    """The cut removes the tail's parameters: what the planner may keep before the cut is target_params x the
    whole model, not a deeper cut (once read as 1 - (1 - t) x whole / kept: every group down to its narrowest)."""
    model, loader, x0 = tiny
    base_tp, base_p = count_tp(model, x0)
    plan, _ = si_plan(model, loader, arch="tiny_vgg", num_classes=N_CLASSES, example_input=x0,
                      config=CompressConfig(target_macs=0.4, target_params=0.2, round_to=1, ranking="si",
                                            objective="macs"))
    assert plan.truncate_after == "features.6" and "budget_unmet" not in plan.settings
    got_macs, got_p = count_tp(apply_plan(model, plan, example_input=x0), x0)
    assert got_macs <= 0.4 * base_tp and 0.12 * base_p <= got_p <= 0.2 * base_p, got_p / base_p
    assert max(len(d.keep) for d in plan.layers) > 1


def test_truncation_alone_meets_a_loose_budget(tiny):
    model, loader, x0 = tiny
    plan, ev = si_plan(model, loader, arch="tiny_vgg", num_classes=N_CLASSES, example_input=x0,
                       config=CompressConfig(target_macs=0.8, round_to=1, ranking="si", objective="macs"))
    # the cut alone keeps 64% of the MACs, well below the 80% asked for: a budget is a promise about
    # MACs, so the cut is not applied (recorded with the reason) and filters are pruned instead
    assert plan.truncate_after is None
    t = plan.settings["truncation"]
    assert t["applied"] is False and "below the budget" in t["why_not"]
    # (one filter of this tiny net is 8% of its MACs: the budget is met to within one filter)
    assert 0.72 <= plan.predicted["macs"] / plan.predicted["base_macs"] <= 0.8
    # truncation can be switched off: then nothing is cut and convs after features.6 are planned
    plan2, ev2 = si_plan(model, loader, arch="tiny_vgg", num_classes=N_CLASSES, example_input=x0,
                         config=CompressConfig(target_macs=0.8, round_to=1, ranking="si", objective="macs", truncate=False))
    assert plan2.truncate_after is None and ev2.truncation is None and "truncation" not in plan2.settings
    assert "features.8" in {d.name for d in plan2.layers}


def test_execute_trains_the_new_head(tiny):
    model, loader, x0 = tiny
    plan, _ = si_plan(model, loader, arch="tiny_vgg", num_classes=N_CLASSES, example_input=x0,
                      config=CompressConfig(target_macs=0.4, round_to=1, ranking="si", objective="macs"))
    cfg = CompressConfig(target_macs=0.4, round_to=1, ranking="si", objective="macs", head_epochs=30, lr=0.1)
    small, m = execute(model, plan, example_input=x0, calib_loader=loader, test_loader=loader, config=cfg)
    # compensation fits the new head to the original logits (least squares), then SGD trains it
    assert m["refit"]["head"]["after"] < m["refit"]["head"]["before"]
    assert m["head_data"] == "calibration sample" and "acc_head" in m
    assert m["acc_head"] > max(m["acc_compensated"], 1.0 / N_CLASSES + 0.1)
    assert len(list(small.features.children())) == 7 and small(x0).shape == (1, N_CLASSES)


def test_residual_nets_are_never_truncated():
    torch.manual_seed(0)
    model = CifarResNet(num_blocks=(1, 1, 1), width=(4, 8, 8), num_classes=N_CLASSES).eval()
    loader, x = crafted_data(n_per_class=8)
    x0 = x[:1]
    plan, ev = si_plan(model, loader, arch="tiny_resnet", num_classes=N_CLASSES, example_input=x0,
                       config=CompressConfig(target_macs=0.7, round_to=1, ranking="si", objective="macs"))
    assert plan.truncate_after is None and ev.truncation is None and "truncation" not in plan.settings


def test_refit_head_recovers_the_original_logits_exactly():
    from si_compress.compress import refit_head

    torch.manual_seed(0)
    base = VGG(cfg=CFG, num_classes=N_CLASSES).eval()
    with torch.no_grad():
        base.classifier.weight.normal_()
        base.classifier.bias.normal_()
    # cutting after the last module keeps every layer; scramble the head, then refit it
    cut = apply_plan(base, CompressionPlan(arch="t", num_classes=N_CLASSES, truncate_after="features.13"),
                     example_input=torch.zeros(1, 3, 32, 32))
    with torch.no_grad():
        cut.classifier.weight.normal_()
        cut.classifier.bias.zero_()
    x = torch.randn(64, 3, 32, 32)
    rep = refit_head(cut, base, torch.utils.data.DataLoader(x, batch_size=32), ridge=0.0)
    assert rep["rows"] == 64 and rep["before"] > 0.1 and rep["after"] < 1e-8
    torch.testing.assert_close(cut(x), base(x), atol=1e-4, rtol=1e-4)
