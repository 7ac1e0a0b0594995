"""CIFAR VGG with BatchNorm (Simonyan & Zisserman 2015, CIFAR variant used in pruning papers).

Input (N, 3, 32, 32) -> logits (N, num_classes). ``features`` is a Sequential of
conv3x3(bias=False) -> BatchNorm -> ReLU triplets and 2x2 max-pools ('M' in ``cfg``); then global
average pooling, flatten and a single ``classifier`` Linear(last width -> num_classes), as in the
network-slimming VGG. ``cfg`` is overridable so narrower (pruned) VGGs can be rebuilt.
ReLUs are non-inplace so hooks on a BatchNorm keep their output intact.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["VGG", "VGG16_CFG", "vgg16_bn_cifar"]

#: VGG-16 configuration: output channels of each conv, 'M' for a 2x2 max-pool.
VGG16_CFG: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _check_cfg(cfg) -> tuple:
    try:
        items = tuple(cfg)
    except TypeError:
        raise TypeError(f"cfg must be a sequence of positive ints and 'M'; got {cfg!r}") from None
    out = []
    for v in items:
        if v == "M":
            out.append("M")
        elif isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1:
            out.append(int(v))
        else:
            raise ValueError(f"cfg entries must be positive ints or 'M'; got {v!r} in {list(items)!r}")
    if not any(v != "M" for v in out):
        raise ValueError(f"cfg needs at least one conv layer (a positive int); got {list(items)!r}")
    return tuple(out)


class VGG(nn.Module):
    """VGG-BN from ``cfg``. (N, in_channels, H, W) -> (N, num_classes); ``VGG(**model.config())`` rebuilds it."""

    def __init__(self, *, cfg: Sequence = VGG16_CFG, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        cfg = _check_cfg(cfg)
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        layers: list[nn.Module] = []
        c = self.in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(c, self.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def config(self) -> dict:
        """Constructor keyword arguments that rebuild this architecture (JSON-serialisable)."""
        return {"cfg": list(self.cfg), "num_classes": self.num_classes, "in_channels": self.in_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def vgg16_bn_cifar(num_classes: int = 10, *, cfg: Sequence | None = None, width_mult: float = 1.0) -> VGG:
    """VGG-16-BN for 32x32 inputs. ``cfg`` overrides the layer list; ``width_mult`` scales every
    conv width (rounded, at least 1), e.g. 0.5 gives a half-width network."""
    if isinstance(width_mult, bool) or not isinstance(width_mult, numbers.Real) or not width_mult > 0:
        raise ValueError(f"width_mult must be a positive number; got {width_mult!r}")
    base = _check_cfg(VGG16_CFG if cfg is None else cfg)
    scaled = [v if v == "M" else max(1, int(round(v * float(width_mult)))) for v in base]
    return VGG(cfg=scaled, num_classes=num_classes)
