"""CIFAR ResNets (He et al. 2016, section 4.2) with the parameter-free "option A" shortcut.

Input (N, 3, 32, 32) -> logits (N, num_classes). Depth = 6n + 2 with n BasicBlocks per stage.
Parameter and buffer names match the widely used public CIFAR-10 checkpoints
(``conv1``, ``bn1``, ``layer1..3.<i>.{conv1,bn1,conv2,bn2}``, ``linear``), so those files load
with ``load_state_dict(strict=True)`` once a DataParallel ``module.`` prefix is stripped.

Every ReLU is its own non-inplace module (``relu`` in the stem, ``relu1``/``relu2`` in blocks) so
forward hooks can record post-activation features, and an inplace ReLU cannot overwrite a
BatchNorm output that a hook already holds. Per-stage widths and per-block inner widths are
constructor arguments so a pruned network can be rebuilt from ``model.config()``.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ShortcutA", "BasicBlock", "CifarResNet", "cifar_resnet", "CIFAR_RESNET_DEPTHS"]

#: Depths of the standard CIFAR ResNets registered by name (``resnet20`` ... ``resnet110``).
CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)
_DEFAULT_WIDTHS = (16, 32, 64)


class ShortcutA(nn.Module):
    """Option-A shortcut: spatial subsampling ``x[:, :, ::s, ::s]`` and zero channel padding.

    (N, in_planes, H, W) -> (N, out_planes, ceil(H/s), ceil(W/s)). For the standard network
    (out = 2 * in) this pads ``out_planes // 4`` zero channels on each side, exactly like the
    reference ``LambdaLayer``; an odd difference puts the extra channel after. No parameters.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(
                f"option-A shortcut can only add channels (zero padding); got {in_planes} -> {out_planes}"
            )
        self.in_planes = int(in_planes)
        self.out_planes = int(out_planes)
        self.stride = int(stride)
        extra = self.out_planes - self.in_planes
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad's tuple runs from the last dim backwards: (W_left, W_right, H_top, H_bottom, C_front, C_back).
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv1(3x3, stride) -> bn1 -> relu1 -> conv2(3x3) -> bn2, + shortcut, -> relu2.

    (N, in_planes, H, W) -> (N, planes, H/stride, W/stride). ``mid_planes`` (default ``planes``) is
    conv1's output count, the only width inside a block that filter pruning may change freely.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, mid_planes: int | None = None) -> None:
        super().__init__()
        mid = planes if mid_planes is None else int(mid_planes)
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(mid, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def _check_positive_ints(values, name: str, length: int | None = None) -> tuple[int, ...]:
    try:
        vals = tuple(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of positive integers; got {values!r}") from None
    if length is not None and len(vals) != length:
        raise ValueError(f"{name} must have {length} entries; got {len(vals)} ({vals!r})")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must contain positive integers; got {vals!r}")
    return tuple(int(v) for v in vals)


class CifarResNet(nn.Module):
    """Three-stage CIFAR ResNet. (N, in_channels, H, W) float -> (N, num_classes) logits.

    ``num_blocks``: blocks per stage (n, n, n for depth 6n+2). ``width``: output channels of the
    stem and of each stage. ``block_widths``: per stage, per block conv1 output channels
    (defaults to the stage width). ``CifarResNet(**model.config())`` rebuilds the same shapes.
    """

    def __init__(
        self,
        *,
        num_blocks: Sequence[int] = (3, 3, 3),
        num_classes: int = 10,
        width: Sequence[int] = _DEFAULT_WIDTHS,
        block_widths: Sequence[Sequence[int]] | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        num_blocks = _check_positive_ints(num_blocks, "num_blocks", 3)
        width = _check_positive_ints(width, "width", 3)
        (num_classes,) = _check_positive_ints((num_classes,), "num_classes")
        (in_channels,) = _check_positive_ints((in_channels,), "in_channels")
        if block_widths is None:
            block_widths = tuple((w,) * n for w, n in zip(width, num_blocks))
        else:
            if len(block_widths) != 3:
                raise ValueError(f"block_widths needs one sequence per stage (3); got {len(block_widths)}")
            block_widths = tuple(
                _check_positive_ints(bw, f"block_widths[{i}]", n)
                for i, (bw, n) in enumerate(zip(block_widths, num_blocks))
            )
        for i in range(1, 3):
            if width[i] < width[i - 1]:
                raise ValueError(
                    f"width must not shrink between stages with option-A (zero-padding) shortcuts; got {width}"
                )
        self.num_blocks = num_blocks
        self.width = width
        self.block_widths = block_widths
        self.num_classes = num_classes
        self.in_channels = in_channels

        self.conv1 = nn.Conv2d(in_channels, width[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width[0])
        self.relu = nn.ReLU(inplace=False)
        in_planes = width[0]
        for stage, (planes, mids) in enumerate(zip(width, block_widths)):
            blocks = []
            for b, mid in enumerate(mids):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, mid_planes=mid))
                in_planes = planes
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        # Adaptive pooling equals the reference avg_pool2d over the 8x8 map for 32x32 inputs and
        # still works for other input sizes.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(width[2], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @property
    def depth(self) -> int:
        """Number of weighted layers: 2 per block plus the stem conv and the linear head."""
        return 2 * sum(self.num_blocks) + 2

    def config(self) -> dict:
        """Constructor keyword arguments that rebuild this architecture (JSON-serialisable)."""
        return {
            "num_blocks": list(self.num_blocks),
            "num_classes": self.num_classes,
            "width": list(self.width),
            "block_widths": [list(bw) for bw in self.block_widths],
            "in_channels": self.in_channels,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.avgpool(out)))


def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    *,
    width: Sequence[int] = _DEFAULT_WIDTHS,
    block_widths: Sequence[Sequence[int]] | None = None,
    in_channels: int = 3,
) -> CifarResNet:
    """CIFAR ResNet of ``depth`` = 6n + 2 (20, 32, 44, 56, 110, ...): n blocks per stage."""
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110); got {depth!r}")
    n = (int(depth) - 2) // 6
    return CifarResNet(
        num_blocks=(n, n, n), num_classes=num_classes, width=width, block_widths=block_widths,
        in_channels=in_channels,
    )
