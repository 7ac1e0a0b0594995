import numpy as np
import pytest

from si_compress.plan import BlockDecision, CompressionPlan, HeadSpec, LayerDecision
from si_compress.planning import (
    PlannerConfig,
    Ranking,
    block_si,
    plan_compression,
    plan_uniform,
    plan_with_widths,
    rank_filters,
    size_head,
)
from si_compress.structure import BlockUnit, ConvUnit, ModelStructure


class _Rec:
    def __init__(self, name, si):
        self.name, self.si = name, si


def _structure():
    blocks = (BlockUnit("b0", 400, False, 100), BlockUnit("b1", 400, False, 100), BlockUnit("b2", 400, True, 100))
    convs = tuple(ConvUnit(f"{b.name}.conv1", f"{b.name}.conv2", f"{b.name}.relu1", 4, 50, 10, b.name) for b in blocks)
    return ModelStructure(blocks=blocks, convs=convs, chain=(), total_macs=1300, total_params=500)


def _ranking(curve, order=None):
    order = tuple(order if order is not None else range(len(curve)))
    return Ranking(method="si", order=order, curve=tuple(curve))


def test_block_gains_from_report():
    layers = [_Rec("b0:input", 0.2), _Rec("b0", 0.3), _Rec("b1", 0.3), _Rec("b2", 0.6), _Rec("linear:input", 0.7)]
    g = block_si(layers, _structure().blocks)
    assert g == {"b0": (0.2, 0.3), "b1": (0.3, 0.3), "b2": (0.3, 0.6)}


def test_threshold_mode_drops_flat_blocks_and_keeps_prefix():
    st = _structure()
    rk = {"b0.conv1": _ranking([0.5, 0.6, 0.6, 0.61], order=[3, 1, 0, 2]),
          "b1.conv1": _ranking([0.1, 0.2, 0.3, 0.4]),
          "b2.conv1": _ranking([0.9, 0.9, 0.9, 0.9])}
    gains = {"b0": (0.2, 0.3), "b1": (0.3, 0.3), "b2": (0.3, 0.6)}
    plan = plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=None, delta=0.05))
    assert plan.dropped_blocks == ("b1",)                       # gain 0 does not raise SI
    assert plan.layer("b0.conv1").keep == (1, 3)                # 0.6 >= 0.95 * 0.61 at k = 2 -> filters 3, 1
    assert plan.layer("b2.conv1").keep == (0,)                  # flat curve: one filter reaches max
    assert plan.layer("b1.conv1") is None
    assert plan.predicted["macs"] == 1300 - 400 - 2 * 50 - 3 * 50
    assert plan.predicted["params"] == 500 - 100 - 2 * 10 - 3 * 10


def test_round_to_multiple():
    st = _structure()
    rk = {u.conv: _ranking([0.5, 0.6, 0.6, 0.61]) for u in st.convs}
    gains = {b.name: (0.1, 0.5) for b in st.blocks}
    plan = plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=None, delta=0.05, round_to=4))
    assert all(len(d.keep) == 4 for d in plan.layers)


def test_budget_mode_meets_target_and_prunes_where_si_is_flat():
    st = _structure()
    rk = {"b0.conv1": _ranking([0.3, 0.3, 0.3, 0.3]),        # flat: filters cost no SI
          "b1.conv1": _ranking([0.1, 0.2, 0.3, 0.4]),        # every filter counts
          "b2.conv1": _ranking([0.1, 0.2, 0.3, 0.4])}
    gains = {b.name: (0.1, 0.3) for b in st.blocks}
    plan = plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=0.89, allow_drop=False))
    assert plan.predicted["macs"] <= 0.89 * 1300
    w = {d.name: len(d.keep) for d in plan.layers}
    assert w["b0.conv1"] == 1 and w["b1.conv1"] == 4 and w["b2.conv1"] == 4


def test_budget_mode_drops_the_lowest_gain_block():
    st = _structure()
    rk = {u.conv: _ranking([0.1, 0.2, 0.3, 0.4]) for u in st.convs}
    gains = {"b0": (0.1, 0.5), "b1": (0.5, 0.501), "b2": (0.501, 0.9)}
    plan = plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=0.7))
    assert plan.dropped_blocks == ("b1",)
    assert plan.predicted["macs"] <= 0.7 * 1300


def test_uniform_and_same_width_baselines():
    st = _structure()
    rk = {u.conv: _ranking([0.1, 0.2, 0.3, 0.4], order=[2, 0, 3, 1]) for u in st.convs}
    uni = plan_uniform(arch="t", num_classes=3, structure=st, rankings=rk, target_macs=0.7)
    assert len({len(d.keep) for d in uni.layers}) == 1
    assert uni.predicted["macs"] <= 0.7 * 1300
    l1 = {u.conv: Ranking("l1", order=(3, 2, 1, 0)) for u in st.convs}
    same = plan_with_widths(uni, l1)
    assert [len(d.keep) for d in same.layers] == [len(d.keep) for d in uni.layers]
    assert same.layers[0].keep == tuple(sorted((3, 2, 1, 0)[:len(uni.layers[0].keep)]))


def test_head_sizing_from_csi():
    h = size_head(0.8, 0.85, in_features=64, num_classes=10)
    assert h.kind == "linear"
    h = size_head(0.8, 0.6, in_features=64, num_classes=10, hidden_csi={16: 0.7, 32: 0.81, 64: 0.9})
    assert h.kind == "mlp" and h.hidden == 32
    h = size_head(0.8, 0.6, in_features=64, num_classes=10, hidden_csi={16: 0.7, 32: 0.75})
    assert h.kind == "mlp" and h.hidden == 32


def test_rankers(rng):
    n = 120
    y = np.repeat([0, 1, 2], n // 3)
    G = rng.standard_normal((n, 5, 4))
    G[:, 3] += y[:, None] * 10.0
    r = rank_filters("si", G=G, y=y)
    assert r.order[0] == 3 and len(r.curve) == 5 and r.curve[0] == 1.0
    g = rank_filters("si-greedy", G=G, y=y)
    assert g.order[0] == 3
    w = np.zeros((5, 2, 3, 3))
    w[1] = 1.0
    w[4] = 0.5
    assert rank_filters("l1", weight=w, curve=False).order[:2] == (1, 4)
    r1 = rank_filters("random", G=G, y=y, seed=1, curve=False)
    assert sorted(r1.order) == list(range(5))
    with pytest.raises(ValueError, match="ranking must be one of"):
        rank_filters("magic", G=G, y=y)


def test_plan_json_round_trip_and_validation():
    p = CompressionPlan(arch="resnet20", num_classes=10,
                        layers=(LayerDecision("layer1.0.conv1", 16, (0, 3), ranking=(3, 0, 1), curve=(0.5, 0.6)),),
                        blocks=(BlockDecision("layer1.0", 0.2, 0.3, 100, False),),
                        dropped_blocks=("layer2.1",), head=HeadSpec("mlp", 64, 10, hidden=32),
                        predicted={"macs": 5}, settings={"delta": 0.02})
    q = CompressionPlan.from_json(p.to_json())
    assert q == p
    assert "layer2.1" in p.summary()
    with pytest.raises(ValueError, match="sorted unique"):
        LayerDecision("c", 4, (2, 1))
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        LayerDecision("c", 4, (1, 4))
    with pytest.raises(ValueError, match="at least one filter"):
        LayerDecision("c", 4, ())
    with pytest.raises(ValueError, match="not an si_compress compression plan"):
        CompressionPlan.from_dict({"arch": "x"})
    with pytest.raises(ValueError, match="not valid JSON"):
        CompressionPlan.from_json("{")
    with pytest.raises(ValueError, match="target_macs"):
        PlannerConfig(target_macs=1.5)


def _two_block_case():
    # two identical blocks (4 filters, 50 MACs each, 400 MACs per block) with the same SI curves
    # and gains: under a MACs objective they tie; a latency table tells them apart.
    blocks = (BlockUnit("b0", 200, False, 100), BlockUnit("b1", 200, False, 100))
    convs = tuple(ConvUnit(f"{b.name}.conv1", f"{b.name}.conv2", f"{b.name}.relu1", 4, 50, 10, b.name) for b in blocks)
    st = ModelStructure(blocks=blocks, convs=convs, chain=(), total_macs=400, total_params=200)
    rk = {c.conv: _ranking([0.5, 0.6, 0.7, 0.8]) for c in convs}
    gains = {"b0": (0.2, 0.3), "b1": (0.3, 0.4)}
    return st, rk, gains


def test_latency_objective_prefers_the_move_that_saves_measured_time():
    st, rk, gains = _two_block_case()
    # b0 is slow whatever its width (its full-width output dominates): filters there save no time,
    # dropping it saves a lot; b1's time scales with its filters.
    lat = {"b0.conv1": (0.0, 9.0, 9.0, 9.0, 10.0), "b1.conv1": (0.0, 1.0, 2.0, 3.0, 4.0)}
    cfg = dict(target_macs=0.75, allow_drop=True, round_to=1)
    by_macs = plan_compression(arch="t", num_classes=2, structure=st, rankings=rk, gains=gains,
                               config=PlannerConfig(**cfg), latency=lat)
    by_time = plan_compression(arch="t", num_classes=2, structure=st, rankings=rk, gains=gains,
                               config=PlannerConfig(objective="latency", **cfg), latency=lat)
    assert by_macs.settings["objective"] == "macs" and by_time.settings["objective"] == "latency"
    assert by_macs.dropped_blocks == ()                          # filters are cheaper per MAC than a drop
    assert by_time.dropped_blocks == ("b0",)                     # per second saved, dropping b0 wins
    # a partial table: the timed group ranks by seconds, the other by its MACs, on one scale
    part = plan_compression(arch="t", num_classes=2, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(objective="latency", **cfg), latency={"b0.conv1": lat["b0.conv1"]})
    assert part.settings["objective"] == "latency" and part.settings["latency_units"] == 1
    # b0's filters save no measured time, so they stay; b1 (untimed) gives its filters by MACs
    assert part.dropped_blocks == () and len(part.layer("b0.conv1").keep) == 4 and len(part.layer("b1.conv1").keep) == 2
    # a table for no unit of the plan falls back to MACs (recorded in the plan)
    none = plan_compression(arch="t", num_classes=2, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(objective="both", **cfg), latency={"x.conv": (0.0, 1.0)})
    assert none.settings["objective"] == "macs" and "latency_units" not in none.settings


def test_round_to_is_also_the_floor_below_which_a_block_is_dropped():
    st, rk, gains = _two_block_case()
    plan = plan_compression(arch="t", num_classes=2, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=0.5, round_to=2))
    assert PlannerConfig(round_to=8).min_keep == 8 and PlannerConfig(round_to=8, min_keep=1).min_keep == 1
    for d in plan.layers:
        assert len(d.keep) % 2 == 0 and len(d.keep) >= 2
    assert plan.predicted["macs"] <= 200


def test_bad_objective_is_refused():
    with pytest.raises(ValueError, match="objective must be"):
        PlannerConfig(objective="speed")


def test_filters_are_given_back_after_a_drop_lands_below_the_budget():
    # b2's filters separate nothing (flat curve): they go first; then dropping b0 (no SI gain) is the
    # cheapest move but lands far below the budget; b2's filters then come back while it still holds.
    blocks = tuple(BlockUnit(f"b{i}", 200, False, 100) for i in range(3))
    convs = tuple(ConvUnit(f"{b.name}.conv1", f"{b.name}.conv2", f"{b.name}.relu1", 4, 50, 10, b.name) for b in blocks)
    st = ModelStructure(blocks=blocks, convs=convs, chain=(), total_macs=600, total_params=300)
    rk = {"b0.conv1": _ranking([0.1, 0.4, 0.7, 1.0]), "b1.conv1": _ranking([0.5, 0.6, 0.7, 0.8]),
          "b2.conv1": _ranking([0.5, 0.5, 0.5, 0.5])}
    gains = {"b0": (0.3, 0.3), "b1": (0.3, 0.4), "b2": (0.4, 0.5)}
    plan = plan_compression(arch="t", num_classes=2, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=0.6, round_to=1))
    assert plan.dropped_blocks == ("b0",)
    assert plan.predicted["macs"] == 350            # 250 right after the drop; two b2 filters given back
    assert {d.name: len(d.keep) for d in plan.layers} == {"b1.conv1": 4, "b2.conv1": 3}


def test_threshold_drops_need_a_confidently_flat_gain():
    """A block whose gain is <= 0 on a small sample is kept unless its 95% upper bound is <= 0 too."""
    from si_compress.planning.planner import gain_se

    st = _structure()
    rk = {u.conv: _ranking([0.5, 0.6, 0.6, 0.61]) for u in st.convs}
    gains = {"b0": (0.2, 0.3), "b1": (0.80, 0.79), "b2": (0.9, 0.6)}
    assert gain_se(0.8, 0.79, 100) == pytest.approx(np.sqrt(0.8 * 0.2 / 100 + 0.79 * 0.21 / 100))

    def plan(n):
        return plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                                config=PlannerConfig(target_macs=None, gain_samples=n))
    assert plan(None).dropped_blocks == ("b1", "b2")      # no sample size: the point estimate decides
    small = plan(100)                                      # b1: -0.01 +- 0.11 is noise; b2: -0.3 +- 0.12 is not
    assert small.dropped_blocks == ("b2",)
    assert "not confidently" in next(b.reason for b in small.blocks if b.name == "b1")
    assert plan(10 ** 7).dropped_blocks == ("b1", "b2")    # a huge sample: -0.01 is a real loss


def _stream_structure():
    # two blocks with inner convs, and a stream written by a stem and by both blocks' conv2
    blocks = (BlockUnit("b0", 400, False, 100, branch=("b0.conv1", "b0.conv2")),
              BlockUnit("b1", 400, False, 100, branch=("b1.conv1", "b1.conv2")))
    convs = tuple(ConvUnit(f"{b.name}.conv1", f"{b.name}.conv2", f"{b.name}.conv2:input", 4, 50, 10, b.name)
                  for b in blocks)
    stream = ConvUnit("stem", "b0.conv1", "b1", 4, 60, 12, None, coupled=("b0.conv2", "b1.conv2"),
                      shares=(("stem", 10), ("b0.conv1", 12), ("b0.conv2", 13), ("b1.conv1", 12), ("b1.conv2", 13)))
    return ModelStructure(blocks=blocks, convs=convs + (stream,), chain=(), total_macs=1100, total_params=400)


def test_a_stream_costs_less_once_its_sections_are_dropped():
    st = _stream_structure()
    rk = {u.conv: _ranking([0.2, 0.5, 0.79, 0.8]) for u in st.convs}
    gains = {"b0": (0.05, 0.95), "b1": (0.95, 0.95)}     # b1 adds nothing
    plan = plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=0.56))
    assert "b1" in plan.dropped_blocks and "b0" not in plan.dropped_blocks
    d = plan.layer("stem")
    assert d is not None and len(d.keep) < 4 and d.coupled == ("b0.conv2",)   # b1.conv2 went with b1
    # a stream channel saves only the shares of the writers and readers still there
    inner = sum((4 - len(x.keep)) * 50 for x in plan.layers if x.name == "b0.conv1")
    assert plan.predicted["macs"] == 1100 - 400 - inner - (4 - len(d.keep)) * (60 - 12 - 13)
    assert plan.predicted["macs"] <= 0.56 * 1100


def test_a_stream_is_named_by_a_writer_that_survives():
    st = _stream_structure()
    rk = {u.conv: _ranking([0.5, 0.6, 0.7, 0.8]) for u in st.convs}
    import dataclasses

    stream = dataclasses.replace(st.convs[-1], conv="b0.conv2", coupled=("b1.conv2",),
                                 shares=tuple(s for s in st.convs[-1].shares if s[0] != "stem"))
    st = dataclasses.replace(st, convs=st.convs[:-1] + (stream,))
    rk["b0.conv2"] = rk.pop("stem")
    gains = {"b0": (0.5, 0.5), "b1": (0.2, 0.5)}
    plan = plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=0.5))
    assert "b0" in plan.dropped_blocks
    streams = [d for d in plan.layers if d.name in ("b0.conv2", "b1.conv2")]
    assert all(d.name == "b1.conv2" and d.coupled == () for d in streams)


def test_a_budget_that_needs_nothing_drops_nothing():
    """With a MACs budget, a section whose measured gain is <= 0 competes with other moves; at a
    budget of the whole model no move is needed and nothing is dropped or narrowed."""
    st = _structure()
    rk = {u.conv: _ranking([0.5, 0.6, 0.6, 0.61]) for u in st.convs}
    gains = {"b0": (0.3, 0.2), "b1": (0.3, 0.3), "b2": (0.3, 0.6)}
    plan = plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=1.0, gain_samples=100))
    assert plan.dropped_blocks == () and all(len(d.keep) == d.out_channels for d in plan.layers)
    half = plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                            config=PlannerConfig(target_macs=0.75))
    assert half.dropped_blocks == ("b0",)          # the budget needs a move: the negative-gain block goes first


def test_a_parameter_budget_cuts_where_the_parameters_are():
    """Two sections of equal MACs per filter; the late one holds 10x the parameters per filter and more
    separation. A MACs budget alone narrows the early one; adding a parameter budget makes the planner
    go on, per parameter saved, into the late one until both budgets hold, and give back only what
    keeps both."""
    blocks = (BlockUnit("b0", 400, False, 20), BlockUnit("b1", 400, False, 200))
    convs = (ConvUnit("b0.conv1", "b0.conv2", "b0.relu1", 4, 50, 5, "b0"),
             ConvUnit("b1.conv1", "b1.conv2", "b1.relu1", 4, 50, 50, "b1"))
    st = ModelStructure(blocks=blocks, convs=convs, chain=(), total_macs=1000, total_params=300)
    rk = {u.conv: _ranking([0.5, 0.6, 0.7, 0.8]) for u in convs}
    gains = {"b0": (0.3, 0.35), "b1": (0.35, 0.75)}

    def widths(macs=0.85, allow_drop=False, **kw):
        p = plan_compression(arch="t", num_classes=3, structure=st, rankings=rk, gains=gains,
                             config=PlannerConfig(target_macs=macs, allow_drop=allow_drop, **kw))
        return {d.name: len(d.keep) for d in p.layers}, p.predicted, p.dropped_blocks
    w, pred, _ = widths()
    assert w == {"b0.conv1": 1, "b1.conv1": 4} and pred["params"] == 285
    w, pred, _ = widths(target_params=0.6)
    assert w == {"b0.conv1": 4, "b1.conv1": 1}          # b0's filters were given back: both budgets still hold
    assert pred["macs"] <= 850 and pred["params"] == 150 <= 0.6 * 300
    # once the MACs fit, moves are priced per parameter: dropping the small early section (cheap per
    # MAC, but 20 parameters) loses to narrowing the late one
    w, pred, dropped = widths(macs=0.9, allow_drop=True, target_params=0.6)
    assert dropped == () and w == {"b0.conv1": 4, "b1.conv1": 1} and pred["params"] == 150
    with pytest.raises(ValueError, match="needs target_macs"):
        PlannerConfig(target_macs=None, target_params=0.5)
    with pytest.raises(ValueError, match="fraction of parameters"):
        PlannerConfig(target_params=1.5)
