import numpy as np
import pytest
import torch

from si_compress.latency import _with_width, block_latency_table, latency
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


def test_bad_step_is_refused(tiny):
    m, x0, st = tiny
    with pytest.raises(ValueError, match="step must be >= 1"):
        block_latency_table(m, st, x0, step=0)
