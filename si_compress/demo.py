"""The README's main job, offline on any machine: train a small CNN on scikit-learn's bundled
8x8 digits (seconds, only when no checkpoint is saved yet), then run si-analyze on it.

    python -m si_compress.demo --out runs/demo
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def train_digits_cnn(path: Path, *, epochs: int = 15, seed: int = 0) -> float:
    """Train SmallCNN on the digits train split; save {'state_dict', 'arch'}; return test accuracy."""
    import torch

    from ._io import atomic_path
    from .data import load_dataset, make_loader
    from .models import build_model

    torch.manual_seed(seed)
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    model = build_model("digits_cnn", train.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * 20)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train.dataset, batch_size=64, shuffle=True, generator=gen)
    model.train()
    for _ in range(epochs):
        for step, (x, y) in enumerate(loader):
            if step >= 20:
                break
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in make_loader(test, batch_size=512):
            correct += int((model(x).argmax(1) == y).sum())
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "arch": "digits_cnn"}, tmp)
    return correct / len(test)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="si_compress.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--retrain", action="store_true", help="train again even if a checkpoint exists")
    args = p.parse_args(argv)
    out = Path(args.out)
    ckpt = out / "digits_cnn.pt"
    if args.retrain or not ckpt.exists():
        t0 = time.perf_counter()
        acc = train_digits_cnn(ckpt)
        print(f"trained digits_cnn in {time.perf_counter() - t0:.1f} s: test accuracy {100 * acc:.2f}% -> {ckpt}")
    from .cli.analyze import main as analyze_main

    return analyze_main([str(ckpt), "--arch", "digits_cnn", "--data", "digits", "--samples", "0",
                         "--out", str(out / "analysis")])


if __name__ == "__main__":
    sys.exit(main())
