"""Train a CIFAR-10 network on the JPEG split, resumably, recording the recipe and the accuracy.

For the SI paper's other networks (VGG-16-BN, GoogLeNet, DenseNet-40) and any registered arch:
SGD + Nesterov (momentum 0.9, weight decay 5e-4), cosine learning rate over ``--epochs``, random
crops and flips, batch 128, bf16 autocast on a GPU or a CPU with native bf16. A checkpoint
(model, optimizer, epoch, recipe) is written atomically after every epoch and ``--seconds`` stops
the run at an epoch boundary once the budget is spent; run the same command again to continue.
The final state dict (``<arch>.pth``, loadable with ``--arch <arch>``) and ``record.json`` (recipe,
per-epoch loss / train accuracy / test accuracy, seconds, device) go to ``--out`` (default
runs/train/<arch>/, outside the repository).

  python benchmarks/train_cifar.py --arch densenet40 --epochs 300 --seconds 3600
  python benchmarks/train_cifar.py --arch googlenet_cifar_quarter --epochs 30     # a CPU-sized variant
  python benchmarks/train_cifar.py --arch vgg16_bn --data-npz runs/adapter/data.npz --device cuda

Data: the ../shared JPEG tree (default), or a ``bench_adapter.py --pack`` file (for a GPU machine
that ../shared does not reach).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _harness import SHARED, machine_info, write_json_atomic  # noqa: E402


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def data(args):
    """(train x, train y, test x, test y) float tensors, normalised as si_compress normalises."""
    import torch

    if args.data_npz:
        from bench_adapter import tensors

        return tensors(Path(args.data_npz))
    from si_compress.compress import preload
    from si_compress.data import balanced_indices, load_dataset

    root = SHARED / "data" / "cifar10-jpeg"
    out = []
    for split, n in (("train", args.train_images), ("test", args.test_images)):
        info = load_dataset(str(root), split=split)
        idx = None if not n or n >= len(info) else balanced_indices(info.labels, n, seed=args.seed)
        ds = preload(info.dataset, idx)
        out += [ds.tensors[0], ds.tensors[1].to(torch.int64)]
    return tuple(out)


def evaluate(model, x, y, device, batch=500) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch].to(device)).argmax(1).cpu() == y[i:i + batch]).sum())
    return correct / len(x)


def _save(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    from si_compress.compress import bf16_supported, cifar_augment
    from si_compress.features.cost import count_ops
    from si_compress.models import build_model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out or ROOT / "runs" / "train" / args.arch)
    ckpt_path, record_path = out / "checkpoint.pt", out / "record.json"
    torch.manual_seed(args.seed)
    model = build_model(args.arch, 10)
    macs, params = count_ops(model.eval(), torch.zeros(1, 3, 32, 32))
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.wd)
    recipe = dict(arch=args.arch, epochs=args.epochs, lr=args.lr, weight_decay=args.wd, batch=args.batch,
                  momentum=0.9, nesterov=True, schedule="cosine per step", augment="4-px crop + flip",
                  train_images=args.train_images or 50_000, test_images=args.test_images or 10_000, seed=args.seed)
    record = dict(recipe=recipe, history=[], macs=macs, params=params)
    start = 0
    if ckpt_path.exists() and not args.fresh:
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ck["recipe"] != recipe:
            raise SystemExit(f"{ckpt_path} was trained with another recipe ({ck['recipe']}); use --fresh or --out")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = ck["epoch"]
        record = json.loads(record_path.read_text()) if record_path.exists() else record
        log(f"resuming {args.arch} after epoch {start}")
    xtr, ytr, xte, yte = data(args)
    steps_per_epoch = math.ceil(len(xtr) / args.batch)
    total = args.epochs * steps_per_epoch
    use_bf16 = device == "cuda" or bf16_supported()
    gen = torch.Generator().manual_seed(args.seed)
    t_run = time.perf_counter()
    for epoch in range(start, args.epochs):
        if time.perf_counter() - t_run >= args.seconds:
            log(f"time budget of {args.seconds:.0f} s spent after epoch {epoch}; run again to continue")
            break
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        loss_sum = correct = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * step / total))
            idx = perm[i * args.batch:(i + 1) * args.batch]
            x = cifar_augment(xtr[idx], generator=gen).to(device)
            y = ytr[idx].to(device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += float((logits.argmax(1) == y).sum())
        test_acc = evaluate(model, xte, yte, device)
        h = dict(epoch=epoch + 1, loss=loss_sum / len(xtr), train_acc=correct / len(xtr), test_acc=test_acc,
                 seconds=time.perf_counter() - t0)
        record["history"].append(h)
        record.update(device=device, bf16=use_bf16, machine=machine_info(), test_acc=test_acc,
                      epochs_done=epoch + 1, seconds=sum(r["seconds"] for r in record["history"]))
        _save(dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch + 1, recipe=recipe), ckpt_path)
        write_json_atomic(record_path, record)
        log(f"{args.arch} epoch {epoch + 1}/{args.epochs}: loss {h['loss']:.3f}, train {h['train_acc']:.4f}, "
            f"test {test_acc:.4f} ({h['seconds']:.0f} s)")
    if record.get("epochs_done") == args.epochs:
        _save({k: v.cpu() for k, v in model.state_dict().items()}, out / f"{args.arch}.pth")
        log(f"done: {out / (args.arch + '.pth')}, test accuracy {record['test_acc']:.4f}")
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, help="a registered arch, e.g. vgg16_bn, googlenet_cifar, densenet40")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seconds", type=float, default=float("inf"), help="stop at an epoch boundary after this long")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-images", type=int, default=0, help="class-balanced subset (0: all 50,000)")
    p.add_argument("--test-images", type=int, default=0, help="class-balanced subset (0: all 10,000)")
    p.add_argument("--data-npz", default=None, help="images from bench_adapter.py --pack instead of ../shared")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch < 1 or not args.lr > 0:
        p.error("--epochs and --batch must be >= 1 and --lr > 0")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
