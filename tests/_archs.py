"""Models for the adapter tests: torchvision networks at small input sizes and a user's own class
with the constructs the adapter must handle (projection shortcuts, a depthwise-separable residual,
a concatenation of branches, functional and shared ReLUs, an MLP head)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.proj = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))          # functional ReLU
        y = self.b2(self.c2(y))
        return F.relu(y + (x if self.proj is None else self.proj(x)))


class DWResidual(nn.Module):
    """Depthwise-separable residual: x + pw(relu(bn(dw(x))))."""

    def __init__(self, c, expand=2):
        super().__init__()
        self.pw1 = nn.Conv2d(c, c * expand, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c * expand)
        self.dw = nn.Conv2d(c * expand, c * expand, 3, 1, 1, groups=c * expand, bias=False)
        self.bn2 = nn.BatchNorm2d(c * expand)
        self.pw2 = nn.Conv2d(c * expand, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn1(self.pw1(x)))
        h = F.relu(self.bn2(self.dw(h)))
        return x + self.bn3(self.pw2(h))


class Branches(nn.Module):
    """Two branches concatenated along channels."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, 16, 1)
        self.b = nn.Sequential(nn.Conv2d(c, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))

    def forward(self, x):
        return torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)


class UserNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.act = nn.ReLU()                     # shared: used twice in forward
        self.b1 = ResBlock(16, 16, 1)
        self.b2 = ResBlock(16, 32, 2)            # projection shortcut
        self.dw = DWResidual(32)
        self.cat = Branches(32)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, num_classes))   # MLP head

    def forward(self, x):
        x = self.act(self.stem(x))
        x = self.b2(self.b1(x))
        x = self.act(self.dw(x))
        x = self.cat(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def torchvision_model(name: str, num_classes: int = 10) -> nn.Module:
    import torchvision

    kw = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)


def settle_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BatchNorm non-trivial running statistics (random init has mean 0, var 1)."""
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def trained_digits_usernet(epochs: int = 6):
    """UserNet (1 input channel) trained for a few seconds on the bundled digits (SGD, seeded);
    returns (model in eval mode, train DatasetInfo, test DatasetInfo)."""
    from torch.utils.data import DataLoader

    from si_compress.data import load_dataset

    torch.manual_seed(0)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    m = UserNet(in_channels=1)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(train.dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    m.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    return m.eval(), train, test
