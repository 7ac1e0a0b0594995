"""Any CNN in: each architecture trained briefly on the JPEG CIFAR-10 split, analysed and compressed.

Per architecture (torchvision networks at 32x32 input, our CIFAR nets, a user's own class from
tests/_archs.py): train from scratch for a stated wall-clock budget (SGD, cosine, flips and crops;
bf16 autocast where the CPU has it; the GPU when one is present), then through the same pipeline
as si-compress: SI analysis of every section output (wall time), the SI plan at --target-macs,
accuracy pruned / compensated (least-squares re-fit, no training) / after --finetune-steps of SGD,
MACs and params cut (torch-pruning's count), and CPU latency at batch 1 and 128 of the base and
the compressed model in the same run (median of repeats, ratio).

  python benchmarks/bench_adapter.py --pack runs/adapter/data.npz   # the images, as uint8 arrays
  python benchmarks/bench_adapter.py --data-npz runs/adapter/data.npz --train-seconds 120
  python benchmarks/bench_adapter.py --table

On a GPU machine: `--train-only --save-dir DIR` trains and saves bf16 state dicts in shards of at
most 15 MiB (a device run returns small files); `--ckpt-dir DIR` then starts from them here (the
row says where and how long each model was trained).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _harness import SHARED, machine_info, write_json_atomic  # noqa: E402

ARCHS = ("user", "resnet20", "vgg16_bn_quarter", "resnet18", "resnet50", "mobilenet_v2", "densenet121",
         "googlenet", "vgg16_bn", "efficientnet_b0")
TORCHVISION = {"resnet18", "resnet50", "mobilenet_v2", "densenet121", "googlenet", "vgg16_bn", "efficientnet_b0"}
OUT = HERE / "results" / "adapter.json"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def build(name):
    from _archs import UserNet, torchvision_model

    from si_compress.models import build_model

    if name == "user":
        return UserNet()
    if name in TORCHVISION:
        return torchvision_model(name)
    return build_model(name)


def train(model, loader, seconds, lr, device):
    """SGD with momentum, cosine over the time budget, flips + crops; returns steps and seconds."""
    import math

    import torch
    import torch.nn.functional as F

    from si_compress.compress import bf16_supported, cifar_augment

    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    use_bf16 = device == "cuda" or bf16_supported()
    t0, steps = time.perf_counter(), 0
    while True:
        for x, y in loader:
            el = time.perf_counter() - t0
            if el >= seconds:
                model.eval().cpu()
                return steps, el
            for g in opt.param_groups:
                g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * el / seconds))
            x, y = cifar_augment(x).to(device), y.to(device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1


def save_shards(state: dict, record: dict, save_dir: Path, arch: str, limit: int = 15 * 2**20) -> list[Path]:
    """bf16 copies of the float tensors, split into files of at most ``limit`` bytes."""
    import torch

    save_dir.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        v = v.detach().cpu()
        v = v.to(torch.bfloat16) if v.is_floating_point() else v
        n = v.numel() * v.element_size()
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += n
    shards.append(cur)
    paths = []
    for i, sh in enumerate(shards):
        path = save_dir / f"{arch}.{i}.pt"
        torch.save({"state": sh, "record": record, "shard": i, "shards": len(shards)}, path)
        paths.append(path)
    return paths


def load_shards(ckpt_dir: Path, arch: str):
    """(float32 state dict, training record) from ``save_shards`` files, or None."""
    import torch

    files = sorted(ckpt_dir.glob(f"{arch}.*.pt"))
    if not files:
        return None
    state, record = {}, None
    for f in files:
        d = torch.load(f, map_location="cpu", weights_only=True)
        state.update({k: v.float() if v.is_floating_point() else v for k, v in d["state"].items()})
        record = d["record"]
        if d["shards"] != len(files):
            raise ValueError(f"{ckpt_dir}: {arch} has {len(files)} of {d['shards']} shards")
    return state, record


def pack(args):
    """The first --train-images (class-balanced) train and --eval-samples test JPEGs as uint8 arrays."""
    import numpy as np

    from si_compress.data import balanced_indices, load_dataset

    data = SHARED / "data" / "cifar10-jpeg"
    out = {}
    for split, n in (("train", args.train_images), ("test", args.eval_samples)):
        info = load_dataset(str(data), split=split, normalize="none")
        idx = balanced_indices(info.labels, n, seed=args.seed)
        xs = np.stack([np.asarray(info.dataset[int(i)][0]) for i in idx])
        out[f"x_{split}"] = np.round(xs * 255).astype(np.uint8)
        out[f"y_{split}"] = np.asarray(info.labels)[idx].astype(np.int64)
        log(f"packed {split}: {xs.shape}")
    Path(args.pack).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.pack, **out)


def tensors(npz: Path):
    """Normalised float tensors (train x, y, test x, y) from a ``pack`` file (ImageNet mean/std, as
    si_compress normalises an ImageFolder tree)."""
    import numpy as np
    import torch

    from si_compress.data import IMAGENET_MEAN, IMAGENET_STD

    d = np.load(npz)
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def f(x):
        return (torch.from_numpy(x).float() / 255 - m) / s
    return f(d["x_train"]), torch.from_numpy(d["y_train"]), f(d["x_test"]), torch.from_numpy(d["y_test"])


def run_arch(name, args, train_loader, sample_loader, test_loader, full_train_loader):
    import torch

    from si_compress.analysis import analyze
    from si_compress.compress import evaluate
    from si_compress.latency import speedup_table
    from si_compress.pipeline import CompressConfig, count_tp, execute, si_plan
    from si_compress.structure import describe

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(name)
    got = load_shards(Path(args.ckpt_dir), name) if args.ckpt_dir else None
    if got is not None:
        state, rec = got
        model.load_state_dict(state)
        model.eval()
        steps, secs, device = rec["steps"], rec["seconds"], rec["device"]
        train_gpu = rec.get("gpu")
    else:
        steps, secs = train(model, train_loader, args.train_seconds, args.lr, device)
        train_gpu = torch.cuda.get_device_name() if device == "cuda" else None
    x0 = next(iter(sample_loader))[0][:1]
    base_acc = evaluate(model, test_loader)
    log(f"{name}: trained {steps} steps in {secs:.0f} s on {device}, top-1 {100 * base_acc:.2f}%")
    t0 = time.perf_counter()
    st = describe(model, x0)
    rep = analyze(model, sample_loader, layers=list(st.layers), order=1, max_dim=1024, example_input=x0)
    t_analyze = time.perf_counter() - t0
    cfg = CompressConfig(target_macs=args.target_macs, objective=args.objective, finetune_epochs=1 if args.finetune_steps else 0,
                         finetune_steps=args.finetune_steps or None, lr=args.finetune_lr, bf16=True)
    t0 = time.perf_counter()
    plan, _ = si_plan(model, sample_loader, arch=name, num_classes=10, example_input=x0, config=cfg)
    t_plan = time.perf_counter() - t0
    t0 = time.perf_counter()
    small, m = execute(model, plan, example_input=x0, calib_loader=sample_loader, test_loader=test_loader,
                       train_loader=full_train_loader, config=cfg)
    t_exec = time.perf_counter() - t0
    base_macs, base_params = count_tp(model, x0)
    shape = tuple(x0.shape[1:])
    lat = speedup_table(model, small, shape, repeats=args.latency_repeats)
    row = dict(arch=name, train_steps=steps, train_seconds=secs, train_device=device, train_gpu=train_gpu,
               layers=len(st.layers),
               sections=len(st.blocks), groups=len(st.convs), groups_left_whole=len(st.skipped),
               dropped=list(plan.dropped_blocks), base_acc=base_acc, acc_pruned=m["acc_pruned"],
               acc_compensated=m["acc_compensated"], acc_finetuned=m.get("acc_finetuned"),
               finetune_steps=args.finetune_steps, base_macs=base_macs, macs=m["macs"], base_params=base_params,
               params=m["params"], macs_fraction=m["macs"] / base_macs, params_fraction=m["params"] / base_params,
               seconds_analyze=t_analyze, seconds_plan=t_plan, seconds_compensate=m["seconds_compensate"],
               seconds_execute=t_exec, latency=lat, latency_protocol=[args.latency_rounds, args.latency_repeats],
               final_si=rep.layers[-1].si)
    log(f"{name}: MACs x{row['macs_fraction']:.3f}, params x{row['params_fraction']:.3f}; top-1 base {100 * base_acc:.2f}% "
        f"pruned {100 * m['acc_pruned']:.2f}% compensated {100 * m['acc_compensated']:.2f}%"
        + (f" fine-tuned {100 * m['acc_finetuned']:.2f}%" if m.get("acc_finetuned") is not None else "")
        + f"; speed-up b1 {lat['batch1']['speedup']:.2f}x b128 {lat['batch128']['speedup']:.2f}x")
    return row


def run(args):
    import torch

    xtr, ytr, xte, yte = tensors(Path(args.data_npz))
    tr, te = torch.utils.data.TensorDataset(xtr, ytr), torch.utils.data.TensorDataset(xte, yte)
    log(f"{len(tr)} train / {len(te)} test images from {args.data_npz}")
    DL = torch.utils.data.DataLoader
    if args.train_only:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        loader = DL(tr, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(args.seed), drop_last=True)
        for name in args.archs:
            torch.manual_seed(args.seed)
            model = build(name)
            steps, secs = train(model, loader, args.train_seconds, args.lr, device)
            with torch.no_grad():
                acc = float(sum((model(x).argmax(1) == y).sum() for x, y in DL(te, batch_size=500)) / len(te))
            rec = dict(arch=name, steps=steps, seconds=secs, device=device, test_acc_fp32=acc,
                       gpu=torch.cuda.get_device_name() if device == "cuda" else None)
            files = save_shards(model.state_dict(), rec, Path(args.save_dir), name)
            log(f"{name}: {steps} steps in {secs:.0f} s on {device}, top-1 {100 * acc:.2f}% -> {len(files)} file(s)")
        return None
    g = torch.Generator().manual_seed(args.seed)
    train_loader = DL(tr, batch_size=128, shuffle=True, generator=g, drop_last=True)
    si_idx = torch.randperm(len(tr), generator=torch.Generator().manual_seed(1))[: args.si_samples]
    sample_loader = DL(torch.utils.data.Subset(tr, si_idx.tolist()), batch_size=250)
    test_loader = DL(te, batch_size=500)
    torch.set_num_threads(args.threads)
    out = json.loads(OUT.read_text()) if OUT.exists() and not args.fresh else {}
    rows = {r["arch"]: r for r in out.get("rows", [])}
    for r in rows.values():  # rows measured before per-row protocols: the protocol of their run
        if "latency" in r and "latency_protocol" not in r:
            r["latency_protocol"] = [out["settings"]["latency_rounds"], out["settings"]["latency_repeats"]]
    for name in args.archs:
        try:
            rows[name] = run_arch(name, args, train_loader, sample_loader, test_loader, train_loader)
        except Exception as exc:  # record and go on: one architecture must not hide the others
            log(f"{name}: FAILED {type(exc).__name__}: {exc}")
            rows[name] = dict(arch=name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        result = dict(settings={k: v for k, v in vars(args).items() if k not in ("table",)},
                      machine=machine_info(), timestamp=time.strftime("%Y-%m-%d %H:%M:%S"),
                      rows=[rows[a] for a in ARCHS if a in rows])
        write_json_atomic(OUT, result)
    return result


def table(path=OUT) -> str:
    if not path.exists():
        return "_Not measured yet: run `python benchmarks/bench_adapter.py`._"
    d = json.loads(path.read_text())
    s = d["settings"]
    s = dict(s, latency_rounds=3, latency_repeats=5) if "latency_rounds" not in s else s
    from collections import Counter

    protos = Counter(tuple(r.get("latency_protocol", (s["latency_rounds"], s["latency_repeats"])))
                     for r in d["rows"] if "latency" in r)
    default = list(protos.most_common(1)[0][0]) if protos else [s["latency_rounds"], s["latency_repeats"]]
    lines = [f"Each model trained from scratch on {s['train_images']} JPEG train images for the time in its row "
             f"(briefly trained: accuracies are far from converged); SI on {s['si_samples']} of them; accuracy on "
             f"{s['eval_samples']} test images; target {s['target_macs']:.0%} of MACs (torch-pruning's count); "
             f"fine-tune {s['finetune_steps']} SGD steps; latency: median of {default[0]} alternating rounds "
             f"x {default[1]} calls, {s['threads']} threads, ratio base / compressed in the same run.", "",
             "| model | trained | sections / groups | base | pruned | compensated | fine-tuned | MACs | params | analysis | compression | speed-up b1 | speed-up b128 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    marked = False

    def speed(r, b):
        nonlocal marked
        lt = r["latency"][f"batch{b}"]
        rounds = lt.get("speedup_rounds") or [lt["speedup"]]
        mark = ""
        if r.get("latency_protocol", default) != default:
            marked, mark = True, "†"
        return f"{lt['speedup']:.2f}x ({min(rounds):.2f}-{max(rounds):.2f}){mark}"

    for r in d["rows"]:
        if "error" in r:
            lines.append(f"| {r['arch']} | failed: {r['error']} |" + " |" * 11)
            continue
        ft = f"{100 * r['acc_finetuned']:.2f}%" if r.get("acc_finetuned") is not None else "-"
        lines.append(
            f"| {r['arch']} | {r['train_seconds']:.0f} s {r['train_device'].replace('cuda', 'GPU').replace('cpu', 'CPU')} "
            f"({r['train_steps']} steps) | {r['sections']} / {r['groups']} | {100 * r['base_acc']:.2f}% | {100 * r['acc_pruned']:.2f}% | "
            f"{100 * r['acc_compensated']:.2f}% | {ft} | -{100 * (1 - r['macs_fraction']):.1f}% | "
            f"-{100 * (1 - r['params_fraction']):.1f}% | {r['seconds_analyze']:.0f} s | "
            f"{r['seconds_plan'] + r['seconds_execute']:.0f} s | {speed(r, 1)} | {speed(r, 128)} |")
    lines.append("")
    lines.append("Speed-up: median over rounds of base / compressed time (in brackets the lowest and highest round); "
                 "at batch 1 these models run in 3-40 ms and the rounds spread widely on this shared 2-core machine.")
    if marked:
        rows = [r for r in d["rows"] if r.get("latency_protocol", default) != default]
        lines.append("† re-measured with " + "; ".join(f"{r['arch']}: {r['latency_protocol'][0]} rounds x "
                                                      f"{r['latency_protocol'][1]} calls" for r in rows) + ".")
    lines.append("")
    mc = d["machine"]
    gpu = sorted({r.get("train_gpu") for r in d["rows"] if r.get("train_gpu")})
    lines.append(f"Machine: {mc.get('cpu_model', '?')}, {mc.get('cpus_usable', '?')} CPUs (analysis, compression, "
                 f"latency){'; training on ' + ', '.join(gpu) if gpu else ''}; last run {d['timestamp']}. Commands: "
                 "`python benchmarks/bench_adapter.py --pack runs/adapter/data.npz`, on the GPU `--train-only` "
                 "(every arch but vgg16_bn, whose 134 M parameters do not fit the files a device run returns: trained "
                 f"here on the CPU), then `python benchmarks/bench_adapter.py --ckpt-dir runs/adapter/ckpt "
                 f"--train-seconds {s['train_seconds']:.0f} --si-samples {s['si_samples']} --eval-samples {s['eval_samples']} "
                 f"--finetune-steps {s['finetune_steps']}`.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--train-seconds", type=float, default=120)
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--si-samples", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--objective", default="macs", choices=("macs", "latency", "both"))
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--latency-rounds", type=int, default=3)
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="start a new JSON instead of updating rows")
    p.add_argument("--pack", help="write the class-balanced images to this .npz and stop")
    p.add_argument("--data-npz", default=str(ROOT / "runs" / "adapter" / "data.npz"))
    p.add_argument("--train-only", action="store_true", help="train and save --save-dir shards (e.g. on a GPU)")
    p.add_argument("--save-dir", default=str(ROOT / "runs" / "adapter" / "ckpt"))
    p.add_argument("--ckpt-dir", default=None, help="start from models saved by --train-only")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    if args.table:
        print(table())
        return 0
    if args.pack:
        if not (SHARED / "data" / "cifar10-jpeg").exists():
            print(f"bench_adapter: {SHARED}/data/cifar10-jpeg not found; set SI_COMPRESS_SHARED", file=sys.stderr)
            return 2
        pack(args)
        return 0
    if not Path(args.data_npz).exists():
        print(f"bench_adapter: {args.data_npz} not found; make it with --pack", file=sys.stderr)
        return 2
    if run(args) is not None:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
