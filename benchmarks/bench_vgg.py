"""Plain VGG: train a narrow CIFAR VGG-16-BN on the JPEG train split, cut it after its SI peak, prune.

  1. trains VGG-16-BN with every width scaled by --width (default 0.5: ``vgg16_bn_half``, 79 M
     MACs) on the 50,000 JPEG train images: SGD + Nesterov, cosine per step, cifar_augment,
     batch 128; on a GPU when one is present, else on the CPU with bfloat16 autocast when a probe
     of a few steps shows it is faster. Stops after --epochs or --minutes of training (the
     number of epochs is fitted to --minutes after the first epoch, so the cosine ends at 0).
     Saves --ckpt (default runs/vgg/vgg.pt: {"state_dict", "arch", "config", "train"}), which
     si-analyze / si-compress reload with weights_only=True and recognise by its shapes;
  2. SI / CSI per layer on a class-balanced train sample (--si-samples) and the SI peak;
  3. the SI plan: truncate after the peak (first layer within --tol of the max SI) + filter
     pruning of the convs before the cut to --target-macs of the base MACs (torch-pruning
     count), and for comparison the same budget by filter pruning alone (--no-compare: skip);
  4. each plan executed: top-1 on the whole JPEG test split cut/pruned, after compensation
     (least-squares refit of the convs, least-squares fit of the new head to the base logits;
     no training), after training the head (--head-epochs on frozen features), after
     --finetune-epochs of fine-tuning; params / MACs; CPU latency vs the base at batch 1 and 128
     measured in the same run.
Writes benchmarks/results/vgg.json; --table prints the README table from it.

  python benchmarks/bench_vgg.py                 # ~35-40 min on 2 cores (25 min of training)
  python benchmarks/bench_vgg.py --reuse         # analyse / compress runs/vgg/vgg.pt again, no training
  python benchmarks/bench_vgg.py --quick --threads 1   # smoke run (~2-3 min), writes runs/vgg/quick/
  python benchmarks/bench_vgg.py --table
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _harness import SHARED, machine_info, write_json_atomic  # noqa: E402

ARCH_OF_WIDTH = {1.0: "vgg16_bn", 0.5: "vgg16_bn_half", 0.25: "vgg16_bn_quarter"}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ----------------------------------------------------------------------------------- training
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device, bf16: bool):
    import contextlib

    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def probe_bf16(model, x, y, device, steps: int = 3) -> dict:
    """Seconds per forward+backward of one batch in float32 and under bf16 autocast (median)."""
    import statistics

    import torch
    import torch.nn.functional as F

    out = {}
    model.train()
    for name, bf in (("fp32", False), ("bf16", True)):
        times = []
        for i in range(steps + 1):
            _sync(device)
            t = time.perf_counter()
            with _autocast(device, bf):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            _sync(device)
            if i:
                times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
        out[f"{name}_step_s"] = statistics.median(times)
    # BN running statistics moved during the probe: reset them (training starts from fresh stats).
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    return out


def train(args, model, xs, ys, device) -> dict:
    """SGD + Nesterov, cosine per step to 0, cifar_augment; fits the epoch count to --minutes."""
    import torch
    import torch.nn.functional as F

    from si_compress.compress import bf16_supported, cifar_augment

    n = xs.shape[0]
    bs = args.batch_size
    steps_per_epoch = math.ceil(n / bs)
    model.to(device)
    info = {"device": str(device), "train_images": int(n), "batch_size": bs, "lr": args.lr,
            "weight_decay": args.weight_decay, "seed": args.seed, "max_epochs": args.epochs,
            "minutes_budget": args.minutes}
    can_bf16 = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (device.type == "cpu" and bf16_supported())
    if args.bf16 == "auto" and can_bf16:
        probe = probe_bf16(model, xs[:bs].to(device), ys[:bs].to(device), device)
        use_bf16 = probe["bf16_step_s"] < probe["fp32_step_s"]
        info["bf16_probe"] = probe
        log(f"bf16 probe: fp32 {probe['fp32_step_s'] * 1e3:.0f} ms/step, bf16 {probe['bf16_step_s'] * 1e3:.0f} "
            f"ms/step -> {'bf16' if use_bf16 else 'fp32'}")
    else:
        use_bf16 = args.bf16 == "on" and can_bf16
    info["bf16"] = bool(use_bf16)
    budget = args.minutes * 60.0
    planned = max(1, args.epochs)
    total = {"steps": planned * steps_per_epoch}
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total["steps"]) / max(total["steps"], 1))))
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    step = 0
    stopped = None
    t_start = time.perf_counter()
    epoch = 0
    while epoch < planned and stopped is None:
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        loss_sum = correct = seen = 0.0
        for i in range(0, n, bs):
            if time.perf_counter() - t_start > budget and args.hard_stop:
                stopped = f"wall-time budget of {args.minutes} min reached in epoch {epoch + 1}"
                break
            idx = perm[i:i + bs]
            x = cifar_augment(xs[idx], generator=gen).to(device, non_blocking=True)
            y = ys[idx].to(device, non_blocking=True)
            with _autocast(device, use_bf16):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += float((logits.argmax(1) == y).sum())
            seen += len(y)
        _sync(device)
        rec = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1),
               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0, "steps": step}
        history.append(rec)
        epoch += 1
        if epoch == 1 and stopped is None:
            # Fit the schedule to the budget from the measured first epoch.
            fit = int(budget // max(rec["seconds"], 1e-9))
            planned = max(1, min(args.epochs, fit))
            total["steps"] = planned * steps_per_epoch
            info["first_epoch_s"] = rec["seconds"]
        log(f"epoch {epoch}/{planned}: loss {rec['loss']:.3f}, train acc {rec['acc']:.3f}, "
            f"{rec['seconds']:.0f} s (lr {rec['lr']:.4f})")
    info.update(epochs_planned=planned, epochs_done=epoch, steps=step, history=history,
                seconds=time.perf_counter() - t_start, stopped_early=stopped)
    model.cpu().eval()
    return info


# ----------------------------------------------------------------------------------- run
def run(args) -> dict:
    import torch

    from si_compress.compress import bf16_supported, cifar_augment, evaluate, preload
    from si_compress.data import balanced_indices, load_dataset
    from si_compress.models import load_model, vgg16_bn_cifar
    from si_compress.latency import speedup_table
    from si_compress.pipeline import CompressConfig, count_tp, execute, si_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    payload = {"benchmark": "vgg", "quick": bool(args.quick),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "machine": {**machine_info(), "torch_threads": torch.get_num_threads()}}
    run_start = time.perf_counter()
    data = Path(args.data)
    train_info = load_dataset(data, split="train")
    test_info = load_dataset(data, split="test")
    t0 = time.perf_counter()
    train_idx = None if not args.train_samples else balanced_indices(train_info.labels, args.train_samples,
                                                                      seed=args.seed)
    test_idx = None if not args.eval_samples else balanced_indices(test_info.labels, args.eval_samples,
                                                                   seed=args.seed)
    train_ds = preload(train_info.dataset, train_idx)
    test_ds = preload(test_info.dataset, test_idx)
    si_idx = balanced_indices(train_info.labels, args.si_samples, seed=args.seed)
    sample = preload(train_info.dataset, si_idx)
    payload["data"] = {"path": str(data), "train_images": len(train_ds), "test_images": len(test_ds),
                       "si_samples": len(sample), "decode_seconds": time.perf_counter() - t0,
                       "description": train_info.description}
    log(f"data: {len(train_ds)} train, {len(test_ds)} test, {len(sample)} SI sample decoded in "
        f"{payload['data']['decode_seconds']:.0f} s")
    DL = torch.utils.data.DataLoader
    sample_loader = DL(sample, batch_size=250)
    test_loader = DL(test_ds, batch_size=500)
    x0 = sample[0][0][None]

    # 1. train (or reuse) the base network
    ckpt = Path(args.ckpt)
    arch = ARCH_OF_WIDTH.get(args.width)
    if args.reuse:
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
        payload["train"] = dict(obj.get("train", {}), reused=str(ckpt))
        log(f"reusing {ckpt}")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        model = vgg16_bn_cifar(train_info.num_classes, width_mult=args.width)
        log(f"training VGG-16-BN x{args.width} ({arch or 'vgg'}, {count_tp(model.eval(), x0)[0] / 1e6:.1f} M MACs) "
            f"on {device} for at most {args.epochs} epochs / {args.minutes} min")
        info = train(args, model, train_ds.tensors[0], train_ds.tensors[1], device)
        info["test_acc"] = evaluate(model, test_loader)
        log(f"trained {info['epochs_done']} epochs in {info['seconds'] / 60:.1f} min: "
            f"{100 * info['test_acc']:.2f}% top-1 on {len(test_ds)} test images")
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "arch": arch or "vgg", "config": model.config(),
                    "train": {k: v for k, v in info.items() if k != "history"}}, ckpt)
        payload["train"] = info
    payload["checkpoint"] = str(ckpt)
    loaded = load_model(ckpt)  # weights_only=True; the arch is inferred from the shapes
    base = loaded.model
    payload["arch"] = loaded.arch

    base_macs, base_params = count_tp(base, x0)
    base_acc = evaluate(base, test_loader)
    payload["base"] = dict(acc=base_acc, macs=base_macs, params=base_params)
    log(f"base {loaded.arch}: {100 * base_acc:.2f}% top-1, {base_macs / 1e6:.2f} M MACs, {base_params / 1e6:.3f} M params")
    write_json_atomic(args.out, payload)

    # 2-3. SI analysis, the SI peak, plans
    ft_bf16 = args.ft_bf16 == "on"
    if args.ft_bf16 == "auto" and bf16_supported():
        import copy

        probe = probe_bf16(copy.deepcopy(base), train_ds.tensors[0][:128], train_ds.tensors[1][:128],
                           torch.device("cpu"))
        ft_bf16 = probe["bf16_step_s"] < probe["fp32_step_s"]
        payload["finetune_bf16_probe"] = probe
    payload["finetune_bf16"] = bool(ft_bf16)
    # The paper's method: cut at the SI peak whatever it saves (the budget then only limits pruning).
    cfg = CompressConfig(target_macs=args.target_macs, truncate_below_budget=True, compensation=args.compensation,
                         finetune_epochs=args.finetune_epochs, finetune_steps=args.finetune_steps,
                         head_epochs=args.head_epochs, lr=args.ft_lr, bf16=ft_bf16, seed=args.seed,
                         truncate_tol=args.tol)
    t0 = time.perf_counter()
    plan, ev = si_plan(base, sample_loader, arch=loaded.arch, num_classes=loaded.num_classes, example_input=x0,
                       config=cfg)
    payload["plan_seconds"] = time.perf_counter() - t0
    rep = ev.report
    payload["layers"] = [dict(name=r.name, si=r.si, csi=r.csi, high_order_si=r.high_order_si, soft_si=r.soft_si,
                              dim=r.dim, shape=list(r.shape), reduction=r.reduction, macs=r.macs, params=r.params)
                         for r in rep.layers]
    payload["report"] = rep.to_dict()
    payload["truncation"] = plan.settings.get("truncation")
    payload["plan"] = plan.to_dict()
    log(f"SI plan in {payload['plan_seconds']:.0f} s\n" + "\n".join(
        f"  {r.name:<18} SI {r.si:.4f}  CSI {r.csi:.4f}  {r.macs / 1e6:7.2f} M MACs" for r in rep.layers))
    log((ev.truncation.reason if ev.truncation else "no truncation") + "\n" + plan.summary())
    plans = {"si-truncate": plan}
    if not args.no_compare:
        from dataclasses import replace

        plans["si-prune-only"], _ = si_plan(base, sample_loader, arch=loaded.arch, num_classes=loaded.num_classes,
                                            example_input=x0, config=replace(cfg, truncate=False))

    # 4. execute, measure
    train_loader = DL(train_ds, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    results = {}
    for name, p in plans.items():
        t0 = time.perf_counter()
        model, m = execute(base, p, example_input=x0, calib_loader=sample_loader, test_loader=test_loader,
                           train_loader=train_loader, config=cfg, augment=cifar_augment,
                           progress=lambda h, n=name: log(f"  {n} fine-tune epoch {h.get('epoch')}: {h}"))
        m["truncate_after"] = p.truncate_after
        m["layers_kept"] = len(list(model.features.children())) if hasattr(model, "features") else None
        m["widths"] = {d.name: [len(d.keep), d.out_channels] for d in p.layers}
        m["macs_reduction"] = 1 - m["macs"] / base_macs
        m["params_reduction"] = 1 - m["params"] / base_params
        m["latency"] = lat = speedup_table(base, model, tuple(x0.shape[1:]), repeats=args.latency_repeats)
        m["seconds_total"] = time.perf_counter() - t0
        results[name] = m
        log(f"{name}: MACs -{100 * m['macs_reduction']:.1f}%, params -{100 * m['params_reduction']:.1f}%, top-1 "
            f"cut/pruned {m['acc_pruned']:.4f}, compensated {m['acc_compensated']:.4f}, head {m.get('acc_head')}, "
            f"fine-tuned {m.get('acc_finetuned')}; latency x{lat['batch1']['speedup']:.2f} (b1), "
            f"x{lat['batch128']['speedup']:.2f} (b128)")
        payload["results"] = results
        write_json_atomic(args.out, payload)
    payload["seconds"] = time.perf_counter() - run_start
    write_json_atomic(args.out, payload)
    return payload


# ----------------------------------------------------------------------------------- table
def _pct(v):
    return "" if v is None else f"{100 * v:.2f}%"


def table(path: Path) -> str:
    import json

    d = json.loads(path.read_text())
    tr, b, s = d.get("train", {}), d["base"], d["settings"]
    dev = tr.get("device", "?")
    how = f"{tr.get('epochs_done', '?')} epochs in {tr.get('seconds', 0) / 60:.1f} min on {dev}" + \
        (" (bf16 autocast)" if tr.get("bf16") else "")
    quick = " **QUICK smoke run: not a result.**" if d.get("quick") else ""
    lines = [f"VGG-16-BN x{s['width']} (`{d['arch']}`), trained from scratch {how} on "
             f"{d['data']['train_images']:,} JPEG train images (SGD + Nesterov, cosine, lr {tr.get('lr', s['lr'])}, "
             f"seed {s['seed']}): {_pct(b['acc'])} top-1 on {d['data']['test_images']:,} test JPEGs, "
             f"{b['macs'] / 1e6:.1f} M MACs, {b['params'] / 1e6:.3f} M params.{quick}", ""]
    t = d.get("truncation") or {}
    if t:
        cut = t["truncate_after"] or "none (SI peaks at the end)"
        lines.append(f"SI per layer on {d['data']['si_samples']:,} class-balanced train images: max SI "
                     f"{t['max_si']:.4f} at `{t['peak_layer']}`; cut after `{cut}` (first layer with SI >= max - "
                     f"{t['tol']}: {t['si_at_cut']:.4f}), {100 * t['macs_saved'] / max(t['total_macs'], 1):.1f}% of "
                     f"the MACs after it." + (f" SI / CSI of the truncated net's pooled head input: "
                                              f"{t['head_input_si']:.4f} / {t['head_input_csi']:.4f}."
                                              if "head_input_si" in t else ""))
        lines.append("")
    lines += ["| layer | SI | CSI | MACs up to here |", "|---|---:|---:|---:|"]
    cut = t.get("truncate_after") if t else None
    for r in d["layers"]:
        mark = " **(cut)**" if r["name"] == cut else ""
        lines.append(f"| `{r['name']}`{mark} | {r['si']:.4f} | {r['csi']:.4f} | {r['macs'] / 1e6:.2f} M |")
    ft = s.get("finetune_steps")
    ftl = f"fine-tuned ({ft} steps)" if ft else f"fine-tuned ({s['finetune_epochs']} ep)"
    lines += ["", f"Target: {s['target_macs']} x the base MACs (torch-pruning count). Compensation: "
                  f"{s['compensation']} (convs re-fitted by least squares; a new head fitted to the base logits), "
                  f"no training; head: {s['head_epochs']} epochs on frozen features.", "",
              f"| plan | cut after | MACs | params | top-1 cut/pruned | compensated (no training) | head trained | "
              f"{ftl} | latency b1 / b128 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in d.get("results", {}).items():
        lat = m.get("latency", {})
        lat_s = f"{lat['batch1']['speedup']:.2f}x / {lat['batch128']['speedup']:.2f}x" if lat else ""
        lines.append(f"| {name} | {m.get('truncate_after') or '-'} | -{100 * m['macs_reduction']:.1f}% | "
                     f"-{100 * m['params_reduction']:.1f}% | {_pct(m['acc_pruned'])} | {_pct(m['acc_compensated'])} | "
                     f"{_pct(m.get('acc_head'))} | {_pct(m.get('acc_finetuned'))} | {lat_s} |")
    m = d.get("machine", {})
    lines += ["", f"Latency: CPU, ratio base / compressed measured in the same run ({m.get('torch_threads', '?')} "
                  f"threads, {m.get('cpu_model', '')}). Command: `python benchmarks/bench_vgg.py`."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10-jpeg"))
    p.add_argument("--width", type=float, default=0.5, help="VGG-16 width multiplier (0.5: vgg16_bn_half)")
    p.add_argument("--epochs", type=int, default=30, help="most training epochs (fewer if --minutes runs out)")
    p.add_argument("--minutes", type=float, default=25.0, help="training wall-time budget")
    p.add_argument("--no-hard-stop", dest="hard_stop", action="store_false",
                   help="finish the planned epochs even past --minutes")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="training autocast: auto = bf16 when a probe shows it faster")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--train-samples", type=int, default=0, help="class-balanced train subset (0: all 50,000)")
    p.add_argument("--eval-samples", type=int, default=0, help="class-balanced test subset (0: all 10,000)")
    p.add_argument("--si-samples", type=int, default=2000)
    p.add_argument("--tol", type=float, default=0.01, help="SI tolerance of the peak (absolute)")
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--compensation", default="refit", choices=("refit", "refit+bn", "bn", "none"))
    p.add_argument("--head-epochs", type=int, default=5)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-steps", type=int, default=None, help="stop fine-tuning after this many steps")
    p.add_argument("--ft-lr", type=float, default=0.01, help="head training / fine-tuning learning rate")
    p.add_argument("--ft-bf16", choices=("auto", "on", "off"), default="auto",
                   help="CPU fine-tuning autocast: auto = bf16 when a probe shows it faster")
    p.add_argument("--no-compare", action="store_true", help="skip the filter-pruning-only plan")
    p.add_argument("--latency-repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", type=Path, default=None, help="base checkpoint (default runs/vgg/vgg.pt)")
    p.add_argument("--reuse", action="store_true", help="do not train: analyse and compress --ckpt")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2000 train / 500 test images, 1 epoch, 20 fine-tuning steps, runs/vgg/quick/")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.train_samples = args.train_samples or 2000
        args.eval_samples = args.eval_samples or 500
        args.si_samples = min(args.si_samples, 500)
        args.epochs = 1
        args.finetune_steps = args.finetune_steps or 20
        args.latency_repeats = min(args.latency_repeats, 3)
    default_dir = ROOT / "runs" / "vgg" / ("quick" if args.quick else "")
    args.ckpt = args.ckpt or default_dir / "vgg.pt"
    args.out = args.out or (default_dir / "vgg.json" if args.quick else HERE / "results" / "vgg.json")
    if args.table:
        print(table(args.out))
        return 0
    if args.width not in ARCH_OF_WIDTH:
        print(f"note: width {args.width} has no registered arch name; the checkpoint loads as 'vgg' "
              "(rebuilt from its shapes)", file=sys.stderr)
    run(args)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
