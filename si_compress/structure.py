"""What can be removed from a model, and what it costs: plain data for the pure planner.

``prunable_structure(model, example_input)`` finds
- residual blocks (modules with a ``shortcut`` and ``conv1``/``conv2``: CIFAR BasicBlocks) and
  their MACs per image; a block can be dropped (replaced by its shortcut);
- prunable convs: a conv whose output filters feed only one following conv through BN/ReLU
  (a block's ``conv1`` -> ``conv2``; consecutive convs of a plain ``features`` chain), with the
  activation module whose output holds those filters (where filter SI is measured) and the MACs
  saved per removed filter (the conv's own share plus its consumer's share);
- for a plain chain, the layers after which it could be truncated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .features.cost import module_macs


@dataclass(frozen=True)
class BlockUnit:
    name: str
    macs: int          # MACs per image of the block's convs
    downsample: bool   # the shortcut changes shape (option-A): dropping keeps that shortcut
    params: int


@dataclass(frozen=True)
class ConvUnit:
    conv: str              # module name of the conv whose output filters may be removed
    consumer: str          # the conv (or linear) that reads them
    activation: str        # module whose output holds the filters' activations
    out_channels: int
    macs_per_filter: int   # MACs per image saved by removing one filter (conv + consumer)
    params_per_filter: int  # parameters removed with one filter (its weights, BN pair, consumer slice)
    block: str | None      # enclosing residual block, if any


@dataclass(frozen=True)
class ModelStructure:
    blocks: tuple[BlockUnit, ...]
    convs: tuple[ConvUnit, ...]
    chain: tuple[str, ...]       # plain nets: activation modules in order (truncation points)
    total_macs: int
    total_params: int

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _is_block(m: nn.Module) -> bool:
    return hasattr(m, "shortcut") and isinstance(getattr(m, "conv1", None), nn.Conv2d) \
        and isinstance(getattr(m, "conv2", None), nn.Conv2d)


def _filter_params(conv: nn.Conv2d, bn, consumer: nn.Conv2d) -> int:
    own = conv.weight[0].numel() + (1 if conv.bias is not None else 0)
    bn_p = 2 if bn is not None and bn.affine else 0
    return int(own + bn_p + consumer.weight[:, 0].numel())


def prunable_structure(model: nn.Module, example_input) -> ModelStructure:
    macs = module_macs(model, example_input)
    named = dict(model.named_modules())
    blocks, convs, chain = [], [], []
    for name, m in named.items():
        if name and _is_block(m):
            block_macs = sum(v for k, v in macs.items() if k.startswith(name + "."))
            blocks.append(BlockUnit(name=name, macs=int(block_macs),
                                    downsample=not isinstance(m.shortcut, nn.Identity),
                                    params=sum(p.numel() for p in m.parameters())))
            c1, c2 = m.conv1, m.conv2
            per = macs.get(f"{name}.conv1", 0) // c1.out_channels + macs.get(f"{name}.conv2", 0) // c1.out_channels
            act = f"{name}.relu1" if isinstance(getattr(m, "relu1", None), nn.Module) else f"{name}.bn1"
            convs.append(ConvUnit(conv=f"{name}.conv1", consumer=f"{name}.conv2", activation=act,
                                  out_channels=c1.out_channels, macs_per_filter=int(per),
                                  params_per_filter=_filter_params(c1, getattr(m, "bn1", None), c2), block=name))
    feats = getattr(model, "features", None)
    if not blocks and isinstance(feats, nn.Sequential):
        items = list(feats.named_children())
        conv_pos = [i for i, (_, mod) in enumerate(items) if isinstance(mod, nn.Conv2d)]
        for i, (n_, mod) in enumerate(items):
            if isinstance(mod, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU)):
                chain.append(f"features.{n_}")
        for a, b in zip(conv_pos, conv_pos[1:]):
            conv_name, cons_name = f"features.{items[a][0]}", f"features.{items[b][0]}"
            act = next((f"features.{items[j][0]}" for j in range(a + 1, b)
                        if isinstance(items[j][1], (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU))), None)
            if act is None:
                continue
            c = items[a][1].out_channels
            per = macs.get(conv_name, 0) // c + macs.get(cons_name, 0) // c
            bn = next((items[j][1] for j in range(a + 1, b) if isinstance(items[j][1], nn.BatchNorm2d)), None)
            convs.append(ConvUnit(conv=conv_name, consumer=cons_name, activation=act, out_channels=c,
                                  macs_per_filter=int(per),
                                  params_per_filter=_filter_params(items[a][1], bn, items[b][1]), block=None))
    total_params = sum(p.numel() for p in model.parameters())
    return ModelStructure(blocks=tuple(blocks), convs=tuple(convs), chain=tuple(chain),
                          total_macs=int(sum(macs.values())), total_params=int(total_params))


def collect_filter_groups(model: nn.Module, loader, activations, *, grid: int = 4):
    """Per-filter pooled activations in one pass: name -> (n, C, k*k) float32 with k = min(grid, H, W),
    and labels (n,) int64.

    Each filter's map is average-pooled to k x k so a filter is one group of features for
    single-filter SI, prefix SI and greedy selection.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .features import FeatureRecorder

    names = list(activations)

    def pool(name, t):
        k = min(grid, t.shape[-2], t.shape[-1])
        return F.adaptive_avg_pool2d(t, k).flatten(2)

    n = len(loader.sampler) if hasattr(loader, "sampler") else len(loader.dataset)
    out: dict[str, np.ndarray] = {}
    labels = np.empty(n, np.int64)
    done = 0
    was = model.training
    model.eval()
    try:
        with FeatureRecorder(model, names, transform=pool) as rec, torch.inference_mode():
            for x, y in loader:
                model(x)
                maps = rec.take()
                b = x.shape[0]
                for name in names:
                    m = maps[name]
                    if not torch.isfinite(m).all():
                        raise ValueError(f"layer {name!r} has NaN/Inf activations; check the model and data")
                    if name not in out:
                        out[name] = np.empty((n,) + tuple(m.shape[1:]), np.float32)
                    out[name][done:done + b] = m.numpy()
                labels[done:done + b] = y.numpy()
                done += b
    finally:
        model.train(was)
    return out, labels
