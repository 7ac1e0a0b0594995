import numpy as np
import pytest
import torch

from si_compress.latency import (NOISY_SPREAD, _with_width, block_latency_table, compare_models, interleaved_times,
                                 latency, speedup_table)
from si_compress.models.cifar_resnet import cifar_resnet
from si_compress.structure import prunable_structure


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = cifar_resnet(8, width=(8, 16, 32)).eval()   # one block per stage
    x0 = torch.zeros(1, 3, 16, 16)
    return m, x0, prunable_structure(m, x0)


def test_table_covers_every_block_conv_and_every_width(tiny):
    m, x0, st = tiny
    t = block_latency_table(m, st, x0, batch=2, step=4, repeats=2)
    convs = [u for u in st.convs if u.block]
    assert set(t) == {u.conv for u in convs}
    for u in convs:
        ts = np.asarray(t[u.conv])
        assert ts.shape == (u.out_channels + 1,)              # k = 0 (dropped) .. C
        assert np.all(np.diff(ts) >= 0) and np.all(ts >= 0)  # non-decreasing in k
        assert ts[-1] > 0


def test_width_variant_runs_with_the_blocks_shapes(tiny):
    m, x0, _ = tiny
    blk = m.layer2[0]                                       # downsampling block (option-A shortcut)
    x = torch.randn(2, 8, 16, 16)
    ref = blk(x)
    for k in (0, 4, 16):
        out = _with_width(blk, "conv1", k, (8, 16, 16))(x)
        assert out.shape == ref.shape
    v = _with_width(blk, "conv1", 5, (8, 16, 16))
    assert v.conv1.out_channels == 5 and v.conv2.in_channels == 5
    assert not any(isinstance(m, torch.nn.Conv2d) for m in _with_width(blk, "conv1", 0, (8, 16, 16)).modules())
    assert blk.conv1.out_channels == 16                      # the model itself is untouched


def test_latency_is_a_positive_median(tiny):
    m, _, _ = tiny
    assert latency(m, 2, (3, 16, 16), repeats=3, warmup=1) > 0


class FakeClock:
    """A timer whose time moves only when a fake model runs: each call takes the next of its durations."""

    def __init__(self):
        self.now = 0.0
        self.log = []

    def __call__(self):
        return self.now

    def model(self, name, durations):
        clock, it = self, iter(durations)

        class Fake(torch.nn.Module):
            def forward(self, x):
                clock.log.append(name)
                clock.now += next(it)
                return x

        return Fake()


def test_interleaved_median_and_spread_are_the_known_values():
    clock = FakeClock()
    a = clock.model("a", [9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0])   # two warm-up calls, then 1..5
    b = clock.model("b", [2.0] * 7)
    res = interleaved_times({"a": lambda: a(0), "b": lambda: b(0)}, repeats=5, warmup=2, timer=clock)
    assert res["a"]["times_s"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert res["a"]["median_s"] == 3.0 and res["a"]["spread"] == pytest.approx((4.0 - 2.0) / 3.0)
    assert res["b"] == {"median_s": 2.0, "spread": 0.0, "times_s": [2.0] * 5, "calls_per_sample": 1}
    assert clock.log == ["a", "b"] * 7                         # interleaved, warm-up included


def test_fast_calls_are_timed_in_blocks_after_an_untimed_call():
    """A 10 ms call (min sample 50 ms) is timed 5 at a time after one settling call; a sample is the
    block's mean, and the settling call's time (here made huge) never enters it."""
    clock = FakeClock()
    # a: two warm-ups of 10 ms, then rounds of [settle 1 s, 5 x 10 ms]; b: 0.2 s calls, one per sample
    a = clock.model("a", [0.01, 0.01] + ([1.0] + [0.01] * 5) * 3)
    b = clock.model("b", [0.2] * 5)
    res = interleaved_times({"a": lambda: a(0), "b": lambda: b(0)}, repeats=3, warmup=2, min_sample_s=0.05,
                            timer=clock)
    assert res["a"]["calls_per_sample"] == 5 and res["b"]["calls_per_sample"] == 1
    assert res["a"]["times_s"] == pytest.approx([0.01] * 3) and res["b"]["times_s"] == pytest.approx([0.2] * 3)
    assert clock.log == ["a", "b"] * 2 + (["a"] * 6 + ["b"]) * 3   # interleaved rounds, blocks inside
    # the block length follows the fastest warm-up call; 0 turns blocks off
    clock = FakeClock()
    c = clock.model("c", [0.03, 0.02] + [0.02] * 12)
    res = interleaved_times({"c": lambda: c(0)}, repeats=3, warmup=2, min_sample_s=0.05, timer=clock)
    assert res["c"]["calls_per_sample"] == 3 and res["c"]["median_s"] == pytest.approx(0.02)
    clock = FakeClock()
    d = clock.model("d", [0.01] * 5)
    assert interleaved_times({"d": lambda: d(0)}, repeats=3, warmup=2, min_sample_s=0.0,
                             timer=clock)["d"]["calls_per_sample"] == 1


def test_quiet_timing_is_not_noisy_and_not_retried():
    clock = FakeClock()
    models = {"base": clock.model("base", [0.2] * 9), "compressed": clock.model("compressed", [0.1] * 9)}
    t = speedup_table(models["base"], models["compressed"], (1,), batches=(4,), repeats=7, warmup=2, timer=clock)
    r = t["batch4"]
    assert r["speedup"] == pytest.approx(2.0) and r["base_s"] == pytest.approx(0.2)
    assert not r["noisy"] and not r["retried"]
    assert r["base_spread"] == pytest.approx(0.0, abs=1e-9) and r["compressed_spread"] == pytest.approx(0.0, abs=1e-9)


def test_noisy_timing_is_retried_once_and_flagged():
    clock = FakeClock()
    swing = [0.1, 0.3] * 20                                    # spread 200%: a busy machine
    res = compare_models({"m": clock.model("m", swing)}, 2, (1,), repeats=6, warmup=1, timer=clock)
    assert res["retried"] and res["noisy"] and res["models"]["m"]["spread"] > NOISY_SPREAD
    assert len(clock.log) == 2 * (6 + 1)                       # one retry, not more


def test_a_retry_that_comes_out_quiet_is_not_flagged():
    clock = FakeClock()
    durations = [0.1, 0.5, 0.1, 0.5, 0.1, 0.5, 0.1] + [0.2] * 7
    res = compare_models({"m": clock.model("m", durations)}, 2, (1,), repeats=6, warmup=1, timer=clock)
    assert res["retried"] and not res["noisy"] and res["models"]["m"]["median_s"] == pytest.approx(0.2)


def test_threads_are_pinned_stated_and_restored(tiny):
    m, _, _ = tiny
    before = torch.get_num_threads()
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return m(x)

    res = compare_models({"m": Spy()}, 2, (3, 16, 16), threads=1, repeats=2, warmup=1)
    assert res["threads"] == 1 and set(seen) == {1}
    assert torch.get_num_threads() == before


def test_bad_step_is_refused(tiny):
    m, x0, st = tiny
    with pytest.raises(ValueError, match="step must be >= 1"):
        block_latency_table(m, st, x0, step=0)


class _Bottleneck(torch.nn.Module):
    def __init__(self, c, mid):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Conv2d(c, mid, 1), torch.nn.Conv2d(mid, mid, 3, padding=1),
                                  torch.nn.Conv2d(mid, c, 1))

    def forward(self, x):
        return torch.relu(x + self.c(torch.relu(self.b(torch.relu(self.a(x))))))


class _TwoGroupNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.block = _Bottleneck(8, 24)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.block(torch.relu(self.stem(x))).mean((2, 3)))


def test_every_group_of_a_multi_group_section_is_timed_at_a_bounded_number_of_widths():
    m = _TwoGroupNet().eval()
    x0 = torch.zeros(1, 3, 8, 8)
    st = prunable_structure(m, x0)
    inner = [u.conv for u in st.convs if u.block == "block"]
    assert inner == ["block.a", "block.b"]
    calls = []
    import si_compress.latency as lat

    orig = lat._with_width
    try:
        lat._with_width = lambda sec, conv, k, shape: calls.append((conv, k)) or orig(sec, conv, k, shape)
        t = block_latency_table(m, st, x0, batch=2, step=1, repeats=1, points=5)
    finally:
        lat._with_width = orig
    assert set(t) == set(inner) and all(len(t[c]) == 25 for c in inner)
    for c in inner:   # k = 0, the full width and 3 widths in between
        assert sorted(k for n, k in calls if n == c.split(".")[-1]) == [0, 1, 12, 23, 24]
    with pytest.raises(ValueError, match="points"):
        block_latency_table(m, st, x0, points=2)


def test_tables_of_several_batches_count_each_batch_as_a_fraction_of_its_own_time():
    from si_compress.latency import combine_latency_tables

    # batch 1 (microseconds): conv a's section is the slow one; batch 128 (milliseconds): conv b's is
    b1 = {"a": (0.0, 30e-6, 60e-6), "b": (0.0, 10e-6, 20e-6)}
    b128 = {"a": (0.0, 1e-3, 2e-3), "b": (0.0, 3e-3, 6e-3), "only128": (0.0, 1.0)}
    t = combine_latency_tables({1: b1, 128: b128})
    assert set(t) == {"a", "b"}                            # a conv timed at one batch only is left out
    # fractions of each batch's full-width total (80 us; 8 ms), then the mean of the two batches
    assert np.allclose(t["a"], [0.0, (30 / 80 + 1 / 8) / 2, (60 / 80 + 2 / 8) / 2])
    assert np.allclose(t["b"], [0.0, (10 / 80 + 3 / 8) / 2, (20 / 80 + 6 / 8) / 2])
    assert np.isclose(t["a"][-1] + t["b"][-1], 1.0)        # the batch-1 table weighs as much as the batch-128 one
    one = combine_latency_tables({128: {"a": b128["a"], "b": b128["b"]}})
    assert np.allclose(one["b"], np.asarray(b128["b"]) / 8e-3)
    with pytest.raises(ValueError, match="different lengths"):
        combine_latency_tables({1: {"a": (0.0, 1.0)}, 2: {"a": (0.0, 1.0, 2.0)}})
    with pytest.raises(ValueError, match="no table"):
        combine_latency_tables({})


def test_the_plan_is_timed_at_the_batch_sizes_asked_for(monkeypatch):
    import si_compress.latency as L
    from si_compress.models import cifar_resnet
    from si_compress.pipeline import CompressConfig, si_plan

    torch.manual_seed(0)
    model = cifar_resnet(8, width=(8, 16, 16)).eval()
    x = torch.randn(40, 3, 16, 16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(40) % 4), batch_size=20)
    timed = []   # the real timing, with the batch sizes it was asked for noted

    def spy(*a, batch, **kw):
        timed.append(batch)
        return block_latency_table(*a, batch=batch, **kw)
    monkeypatch.setattr(L, "block_latency_table", spy)
    plan, _ = si_plan(model, loader, arch="r", num_classes=4, example_input=x[:1],
                      config=CompressConfig(target_macs=0.6, objective="latency", latency_batches=(4, 1),
                                            round_to=4))
    src = plan.source
    assert timed == [1, 4] and src["latency_batch"] == [1, 4]
    assert set(src["latency_seconds"]) == {"1", "4"}
    convs = set(src["latency_seconds"]["1"])
    assert convs and convs == set(src["latency_seconds"]["4"])
    one, _ = si_plan(model, loader, arch="r", num_classes=4, example_input=x[:1],
                     config=CompressConfig(target_macs=0.6, objective="latency", round_to=4))
    assert one.source["latency_batch"] == 128 and set(one.source["latency_seconds"]) == {"128"}
    assert timed[2:] == [128]
    for bad in ((), (0,), (1.5,), 0):
        with pytest.raises(ValueError, match="latency_batches"):
            CompressConfig(latency_batches=bad)
    assert CompressConfig(latency_batches=8).latency_batches == (8,)
