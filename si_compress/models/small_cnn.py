"""A small plain CNN (conv-bn-relu stages) for the 8x8 digits demo and for quick tests."""
from __future__ import annotations

import torch.nn as nn


class SmallCNN(nn.Module):
    """Input (B, in_channels, H, W) -> logits (B, num_classes).

    ``features``: three conv3x3-BN-ReLU stages, a 2x2 max-pool after the first two;
    then global average pooling and one ``classifier`` Linear.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        self.widths = tuple(widths)
        self.in_channels = in_channels

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))
