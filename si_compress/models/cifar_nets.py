"""CIFAR-10 versions of GoogLeNet and DenseNet-40, the other networks of the SI compression paper.

- ``CifarGoogLeNet`` (Szegedy et al. 2015 at 32x32 input, as commonly used on CIFAR): a 3x3 stem
  of 192 channels, inception blocks 3a-3b, 4a-4e, 5a-5b with the ImageNet channel counts, max pooling
  after 3b and 4e, global average pooling and a linear classifier. Each inception block is four
  branches (1x1; 1x1-3x3; 1x1-3x3-3x3; maxpool-1x1), each conv followed by BN and ReLU, whose
  outputs are concatenated. ``width_mult`` scales every channel count (narrow CPU variants).
- ``DenseNet`` (Huang et al. 2017): a 3x3 stem of 2k channels, three dense blocks of
  (depth - 4) / 3 layers (BN-ReLU-3x3 conv producing k channels, concatenated to the layer input),
  transitions BN-ReLU-1x1 conv-2x2 average pool, then BN-ReLU, global average pooling and a linear
  classifier. ``densenet40``: depth 40, growth k = 12, 1.06 M parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarGoogLeNet", "DenseNet", "densenet40", "googlenet_cifar"]


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Inception(nn.Module):
    """Four branches concatenated along channels: (N, cin, H, W) -> (N, n1 + n3 + n5 + pool, H, W)."""

    def __init__(self, cin: int, n1: int, n3r: int, n3: int, n5r: int, n5: int, pool: int):
        super().__init__()
        self.b1 = _ConvBN(cin, n1, 1)
        self.b2 = nn.Sequential(_ConvBN(cin, n3r, 1), _ConvBN(n3r, n3, 3))
        self.b3 = nn.Sequential(_ConvBN(cin, n5r, 1), _ConvBN(n5r, n5, 3), _ConvBN(n5, n5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _ConvBN(cin, pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


_INCEPTIONS = {  # name: (n1, n3r, n3, n5r, n5, pool)
    "a3": (64, 96, 128, 16, 32, 32), "b3": (128, 128, 192, 32, 96, 64),
    "a4": (192, 96, 208, 16, 48, 64), "b4": (160, 112, 224, 24, 64, 64), "c4": (128, 128, 256, 24, 64, 64),
    "d4": (112, 144, 288, 32, 64, 64), "e4": (256, 160, 320, 32, 128, 128),
    "a5": (256, 160, 320, 32, 128, 128), "b5": (384, 192, 384, 48, 128, 128),
}


class CifarGoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0):
        super().__init__()
        w = lambda c: max(1, int(round(c * width_mult)))  # noqa: E731
        self.width_mult = width_mult
        self.pre = _ConvBN(3, w(192), 3)
        cin = w(192)
        for name, spec in _INCEPTIONS.items():
            n1, n3r, n3, n5r, n5, pool = (w(c) for c in spec)
            setattr(self, name, Inception(cin, n1, n3r, n3, n5r, n5, pool))
            cin = n1 + n3 + n5 + pool
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        x = self.pool(self.b3(self.a3(x)))
        x = self.pool(self.e4(self.d4(self.c4(self.b4(self.a4(x))))))
        x = self.b5(self.a5(x))
        return self.linear(torch.flatten(self.avgpool(x), 1))


class DenseLayer(nn.Module):
    """BN-ReLU-3x3 conv producing ``growth`` channels, concatenated to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2))


class DenseNet(nn.Module):
    def __init__(self, depth: int = 40, growth: int = 12, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError(f"DenseNet depth must be 3n + 4; got {depth}")
        n = (depth - 4) // 3
        self.depth, self.growth = depth, growth
        c = 2 * growth
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        blocks = []
        for b in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            blocks.append(nn.Sequential(*layers))
            if b < 2:
                blocks.append(Transition(c, c))
        self.features = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv(x))
        x = F.relu(self.bn(x))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def densenet40(num_classes: int = 10) -> DenseNet:
    return DenseNet(40, 12, num_classes)


def googlenet_cifar(num_classes: int = 10, width_mult: float = 1.0) -> CifarGoogLeNet:
    return CifarGoogLeNet(num_classes, width_mult)
