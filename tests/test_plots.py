"""The figures say what the decision used: SI gain bars, labelled axes, dropped sections named."""
from types import SimpleNamespace

import numpy as np
import pytest

from si_compress import plots
from si_compress.plan import BlockDecision, CompressionPlan, LayerDecision


def _report():
    si = [0.3, 0.5, 0.45, 0.8]
    layers = [SimpleNamespace(name=n, si=v, csi=v, high_order_si=v, soft_si=v, cross_si=None, macs=1000 * (i + 1),
                              per_class_si=[v, v]) for i, (n, v) in enumerate(zip(["relu", "layer1.0", "layer1.1",
                                                                                  "linear:input"], si))]
    return SimpleNamespace(layers=layers, settings={"order": 3}, model={"name": "net.pt", "arch": "resnet20"},
                           data={"name": "/x/cifar", "split": "test"}, n_samples=100, class_names=("a", "b"))


def test_si_layers_bars_are_the_si_gain_of_each_layer():
    fig, ax = plots.si_layers_figure(_report())
    bars = [a for a in fig.axes if a is not ax][0].patches
    assert [b.get_height() for b in bars] == pytest.approx([0.0, 0.2, -0.05, 0.35])
    assert "net.pt" in ax.get_title()
    fig2, ax2 = plots.si_per_class_figure(_report())
    assert "net.pt" in ax2.get_title()


def test_kept_filters_names_axes_dropped_sections_and_model():
    plan = CompressionPlan(arch="resnet20", num_classes=10,
                           layers=(LayerDecision(name="layer1.0.conv1", out_channels=16, keep=tuple(range(8))),),
                           blocks=(BlockDecision(name="layer1.1", si_in=0.5, si_out=0.45, macs=10, dropped=True),),
                           dropped_blocks=("layer1.1",), predicted={"base_macs": 100, "macs": 60})
    fig, ax = plots.kept_filters_figure(plan, model_name="r20.th")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "dropped sections: layer1.1" in labels and "kept filters" in labels
    assert ax.get_xlabel() and ax.get_ylabel() == "output filters (channels)"
    assert ax.get_title().startswith("r20.th (resnet20)") and "40.0% fewer MACs" in ax.get_title()
    assert np.array([b.get_height() for b in ax.patches[:2]]).tolist() == [16, 0]
