"""Quantization claims on the JPEG CIFAR-10 ResNets, measured in one run.

(a) int8 PTQ of ResNet-56-jpeg (x86 FX kernels): fp32 vs int8 top-1 on the full 10k JPEG test split,
    latency at batch 1 and 128 (interleaved medians, same run), size on disk (fp32 state dict vs
    packed int8 weights and the int8 TorchScript file).
(b) pot4 (4-bit power-of-two weights, 8-bit activations) on ResNet-20-jpeg: PTQ, then QAT (at
    most 2 epochs; steps per epoch capped so QAT fits --qat-minutes), top-1 on the full test split;
    the shift-add kernel against the integer-multiply reference on one real layer (bit-exact?),
    and the converted shift-add model's top-1 on --shiftadd-samples test images.
(c) unstructured percentile pruning x bits on ResNet-20: sparsity {0, 50, 70, 90}% x {int8 x86,
    int4 fake-quant}, post-training (no fine-tuning) top-1 on --grid-samples test images and size.
(d) SI pruning + int8 on ResNet-56: a model.pt written by si-compress (--pruned), quantized to int8:
    size, batch-128 speed-up and top-1 against the fp32 base.
(e) percentile pruning with fine-tuning on ResNet-20: (1) the (c) grid again after --prune-ft-steps
    SGD steps with the masks held; (2) the dynamic-threshold search (raise the percentile while the
    fine-tuned accuracy holds within --prune-tolerance, bisect back when it drops), then int8 and
    int4 of the model it accepts, with sizes on disk (packed low-bit weights + sparse format).
Calibration images: a class-balanced sample of the train split. Writes benchmarks/results/quant.json;
--table prints markdown tables from it.

  python benchmarks/bench_quant.py --pruned runs/si56/model.pt 2>&1 | tee quant.log   # ~40 min on 2 cores
  python benchmarks/bench_quant.py --table
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _harness import SHARED, machine_info, write_json_atomic  # noqa: E402

RESULT = HERE / "results" / "quant.json"
SECTIONS = ("a", "b", "c", "d", "e")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def _latency(models: dict, shape, repeats: int) -> dict:
    from si_compress.latency import compare_models

    out = {}
    for b in (1, 128):
        r = compare_models(models, b, shape, repeats=repeats, warmup=2)
        out[f"batch{b}"] = {name: v["median_s"] for name, v in r["models"].items()}
        out[f"batch{b}"]["noisy"] = r["noisy"]
    return out


def section_a(ctx, args) -> dict:
    import torch

    from si_compress.compress import evaluate
    from si_compress.compress.int8 import save_int8
    from si_compress.quantize import QuantConfig, quantize_model
    from si_compress.storage import fp32_state_dict_bytes, save_packed

    base = ctx["r56"]
    log("(a) fp32 ResNet-56 accuracy on", len(ctx["test"].dataset))
    acc_fp32 = ctx.setdefault("r56_acc", evaluate(base, ctx["test"]))
    cfg = QuantConfig(mode="int8", calibration=args.int8_calibration, calibration_samples=args.calib_samples)
    res = quantize_model(base, cfg, ctx["calib"])
    ctx["r56_int8"] = res.model
    acc_int8 = evaluate(res.model, ctx["test"])
    log(f"(a) fp32 {acc_fp32:.4f} int8 {acc_int8:.4f} (calibration {res.details['seconds_calibrate']:.1f} s)")
    lat = _latency({"fp32": base, "int8": res.model}, (3, 32, 32), args.latency_repeats)
    tmp = Path(ctx["tmp"])
    fp32_bytes = fp32_state_dict_bytes(base, tmp / "r56_fp32.pt")
    rep = save_packed(tmp / "r56_int8.siqp", res.model)
    ts_bytes = save_int8(res.model, tmp / "r56_int8.ts", torch.zeros(1, 3, 32, 32)).stat().st_size
    out = {"model": "resnet56-cifar10-jpeg", "test_images": len(ctx["test"].dataset),
           "calibration": cfg.calibration, "calibration_samples": res.details["calibration_samples"],
           "reduce_range": cfg.reduce_range, "seconds_calibrate": res.details["seconds_calibrate"],
           "acc_fp32": acc_fp32, "acc_int8": acc_int8, "acc_drop_points": 100 * (acc_fp32 - acc_int8),
           "latency_s": lat, "speedup": {k: v["fp32"] / v["int8"] for k, v in lat.items()},
           "size_bytes": {"fp32_state_dict": fp32_bytes, "int8_packed": rep.size_bytes, "int8_torchscript": ts_bytes},
           "int8_stored_bits_per_weight": rep.bits_per_weight,
           "size_reduction_packed": 1 - rep.size_bytes / fp32_bytes}
    log(f"(a) speed-up b1 {out['speedup']['batch1']:.2f}x b128 {out['speedup']['batch128']:.2f}x; size "
        f"{fp32_bytes} -> {rep.size_bytes} B packed, {ts_bytes} B TorchScript")
    return out


def _shiftadd_check(model, x) -> dict:
    """Bit-exactness of the shift kernel vs the multiply kernel on the first ShiftAddConv2d."""
    import numpy as np
    import torch

    from si_compress.nn import ShiftAddConv2d, conv2d_mul, conv2d_shift

    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, ShiftAddConv2d))
    seen = {}
    h = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    q = layer.quantize_input(seen["x"]).numpy()
    pw = layer.pow2_weight()
    geo = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    t0 = time.perf_counter()
    a_shift = conv2d_shift(q, pw.shifts, pw.signs, **geo)
    t_shift = time.perf_counter() - t0
    t0 = time.perf_counter()
    a_mul = conv2d_mul(q, pw.integer_weight(), **geo)
    t_mul = time.perf_counter() - t0
    return {"layer": name, "input_shape": list(q.shape), "weight_shape": list(pw.signs.shape),
            "bit_exact": bool(np.array_equal(a_shift, a_mul)), "max_abs_diff": int(np.abs(a_shift - a_mul).max()),
            "seconds_shift": t_shift, "seconds_mul": t_mul}


def section_b(ctx, args) -> dict:
    import torch
    from torch.utils.data import DataLoader, Subset

    from si_compress.compress import cifar_augment, evaluate
    from si_compress.nn import convert_to_shiftadd
    from si_compress.quantize import QuantConfig, quantize_model, run_qat

    base = ctx["r20"]
    log("(b) fp32 ResNet-20 accuracy")
    acc_fp32 = ctx.setdefault("r20_acc", evaluate(base, ctx["test"]))
    cfg = QuantConfig(mode="pot4", calibration=args.act_calibration, calibration_samples=args.calib_samples,
                      weight_method="minmax", lr=args.qat_lr, bf16=False)
    res = quantize_model(base, cfg, ctx["calib"])
    acc_ptq = evaluate(res.model, ctx["test"])
    log(f"(b) fp32 {acc_fp32:.4f} pot4 PTQ {acc_ptq:.4f}")
    train = ctx["train_loader"]()
    # time a few QAT steps on a throwaway copy to size the run to the budget
    probe = copy.deepcopy(res.model)
    n_probe = 4
    t0 = time.perf_counter()
    run_qat(probe, train, epochs=1, lr=args.qat_lr, max_steps=n_probe, augment=cifar_augment)
    step_s = (time.perf_counter() - t0) / n_probe
    del probe
    steps_per_epoch = min(len(train), max(1, int(args.qat_minutes * 60 / (2 * step_s))))
    log(f"(b) QAT {step_s:.2f} s/step -> 2 epochs x {steps_per_epoch} of {len(train)} steps")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    hist = run_qat(res.model, train, epochs=2, lr=args.qat_lr, max_steps=steps_per_epoch, augment=cifar_augment,
                   progress=lambda r: log("(b) QAT epoch", r))
    qat_s = time.perf_counter() - t0
    acc_qat = evaluate(res.model, ctx["test"])
    log(f"(b) pot4 QAT {acc_qat:.4f} ({qat_s:.0f} s)")
    # shift-add conversion of the QAT model, checked on a test subset
    sa = convert_to_shiftadd(res.model, bits=4, act_bits=8, variant="pot", weight_method="minmax").eval()
    sub = Subset(ctx["test"].dataset, range(0, len(ctx["test"].dataset),
                                            max(1, len(ctx["test"].dataset) // args.shiftadd_samples)))
    sub_loader = DataLoader(sub, batch_size=100)
    check = _shiftadd_check(sa, next(iter(sub_loader))[0][:16])
    t0 = time.perf_counter()
    acc_sa = evaluate(sa, sub_loader)
    sa_s = time.perf_counter() - t0
    acc_fq_sub = evaluate(res.model, sub_loader)
    acc_fp32_sub = evaluate(base, sub_loader)
    log(f"(b) shift-add on {len(sub)}: {acc_sa:.4f} (fake-quant {acc_fq_sub:.4f}, fp32 {acc_fp32_sub:.4f}); "
        f"kernel bit-exact {check['bit_exact']}")
    return {"model": "resnet20-cifar10-jpeg", "test_images": len(ctx["test"].dataset), "weights": "pot 4-bit",
            "act_bits": 8, "first_last_bits": cfg.first_last_bits, "calibration": cfg.calibration,
            "weight_method": cfg.weight_method, "acc_fp32": acc_fp32, "acc_ptq": acc_ptq, "acc_qat": acc_qat,
            "qat_drop_points": 100 * (acc_fp32 - acc_qat),
            "qat": {"epochs": 2, "steps_per_epoch": steps_per_epoch, "full_epoch_steps": len(train),
                    "batch_size": train.batch_size, "lr": args.qat_lr, "schedule": "cosine, SGD nesterov m=0.9",
                    "augment": "cifar_augment", "bf16": False, "seconds": qat_s, "probe_step_s": step_s,
                    "history": hist},
            "shiftadd": {"samples": len(sub), "acc_shiftadd": acc_sa, "acc_fakequant_same_images": acc_fq_sub,
                         "acc_fp32_same_images": acc_fp32_sub, "seconds_eval": sa_s, "kernel_check": check}}


def _r20_grid_setup(ctx, args):
    """ResNet-20 and its evaluation subset for the pruning x bits grids (c) and (e):
    (base, test indices, loader, tmp dir, fp32 state-dict bytes, fp32 top-1)."""
    from torch.utils.data import DataLoader, Subset

    from si_compress.compress import evaluate
    from si_compress.storage import fp32_state_dict_bytes

    base = ctx["r20"]
    idx = ctx["balanced_test"](args.grid_samples)
    loader = DataLoader(Subset(ctx["test"].dataset, idx), batch_size=500)
    tmp = Path(ctx["tmp"])
    return base, idx, loader, tmp, fp32_state_dict_bytes(base, tmp / "r20_fp32.pt"), evaluate(base, loader)


def section_c(ctx, args) -> dict:
    from si_compress.compress import evaluate
    from si_compress.quantize import QuantConfig, percentile_prune, quantize_model
    from si_compress.storage import save_packed

    base, idx, loader, tmp, fp32_bytes, acc_base = _r20_grid_setup(ctx, args)
    rows = []
    for sparsity in (0, 50, 70, 90):
        pruned = copy.deepcopy(base)
        pr = percentile_prune(pruned, sparsity, hold=False) if sparsity else None
        acc_pruned = evaluate(pruned, loader)
        for bits, mode in ((8, "int8"), (4, "int4")):
            res = quantize_model(pruned, QuantConfig(mode=mode, calibration=args.int8_calibration if bits == 8
                                                     else args.act_calibration,
                                                     calibration_samples=args.calib_samples), ctx["calib"])
            acc = evaluate(res.model, loader)
            rep = save_packed(tmp / f"grid_{sparsity}_{bits}.siqp", res.model)
            rows.append({"sparsity_pct": sparsity, "bits": bits, "kind": res.kind,
                         "weight_sparsity": pr.sparsity if pr else 0.0, "stored_sparsity": rep.sparsity,
                         "acc_fp32_pruned": acc_pruned, "acc_quant": acc, "size_bytes": rep.size_bytes,
                         "stored_bits_per_weight": rep.bits_per_weight, "size_vs_fp32": rep.size_bytes / fp32_bytes,
                         "sparse_formats": sorted({lay.sparse for lay in rep.layers})})
            log(f"(c) sparsity {sparsity}% {mode}: acc {acc:.4f} (fp32 pruned {acc_pruned:.4f}) "
                f"size {rep.size_bytes} B "
                f"{rep.bits_per_weight:.2f} bits/weight")
    return {"model": "resnet20-cifar10-jpeg", "test_images": len(idx), "acc_fp32": acc_base,
            "fp32_state_dict_bytes": fp32_bytes, "pruning": "global magnitude, no fine-tuning",
            "rows": rows}


def section_e(ctx, args) -> dict:
    from si_compress.compress import cifar_augment, evaluate, finetune
    from si_compress.quantize import (QuantConfig, dynamic_percentile_search, holding_masks, percentile_prune,
                                      quantize_model)
    from si_compress.storage import save_packed

    base, idx, loader, tmp, fp32_bytes, acc_base = _r20_grid_setup(ctx, args)
    train = ctx["train_loader"]()

    def ft(model):
        return finetune(model, train, epochs=1, lr=args.prune_ft_lr, max_steps=args.prune_ft_steps,
                        augment=cifar_augment, bf16=True)

    def quantized(model, tag):
        out = {}
        for bits, mode in ((8, "int8"), (4, "int4")):
            res = quantize_model(model, QuantConfig(mode=mode, calibration=args.int8_calibration if bits == 8
                                                    else args.act_calibration,
                                                    calibration_samples=args.calib_samples), ctx["calib"])
            rep = save_packed(tmp / f"e_{tag}_{bits}.siqp", res.model)
            out[bits] = {"kind": res.kind, "acc_quant": evaluate(res.model, loader), "size_bytes": rep.size_bytes,
                         "stored_bits_per_weight": rep.bits_per_weight, "stored_sparsity": rep.sparsity,
                         "size_vs_fp32": rep.size_bytes / fp32_bytes}
        return out

    rows = []
    for sparsity in (50, 70, 90):
        t = time.perf_counter()
        m = copy.deepcopy(base)
        pr = percentile_prune(m, sparsity, hold=False)
        acc_pruned = evaluate(m, loader)
        with holding_masks(m, pr):
            ft(m)
        acc_ft = evaluate(m, loader)
        q = quantized(m, f"grid{sparsity}")
        for bits in (8, 4):
            rows.append({"sparsity_pct": sparsity, "bits": bits, "weight_sparsity": pr.sparsity,
                         "acc_fp32_pruned": acc_pruned, "acc_fp32_finetuned": acc_ft, **q[bits]})
        log(f"(e) sparsity {sparsity}%: pruned {acc_pruned:.4f} -> fine-tuned {acc_ft:.4f}; int8 "
            f"{q[8]['acc_quant']:.4f} {q[8]['size_bytes']} B, int4 {q[4]['acc_quant']:.4f} {q[4]['size_bytes']} B "
            f"({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    search = dynamic_percentile_search(base, eval_fn=lambda m: evaluate(m, loader), finetune_fn=ft,
                                       start=50.0, step=10.0, tolerance=args.prune_tolerance, min_step=2.5,
                                       max_trials=args.prune_trials, baseline=acc_base,
                                       progress=lambda r: log(f"(e) search {r}"))
    q = quantized(search.model, "search")
    dyn = {"percentile": search.percentile, "sparsity": search.sparsity, "acc_fp32": search.accuracy,
           "history": list(search.history), "seconds": time.perf_counter() - t,
           "int8": q[8], "int4": q[4]}
    log(f"(e) search accepted {search.percentile}% ({search.sparsity:.3f} sparse) at {search.accuracy:.4f}; "
        f"int8 {q[8]['acc_quant']:.4f} {q[8]['size_bytes']} B; int4 {q[4]['acc_quant']:.4f} {q[4]['size_bytes']} B")
    return {"model": "resnet20-cifar10-jpeg", "test_images": len(idx), "acc_fp32": acc_base,
            "fp32_state_dict_bytes": fp32_bytes, "pruning": "global magnitude, masks held while fine-tuning",
            "finetune": {"steps": args.prune_ft_steps, "batch_size": 128, "lr": args.prune_ft_lr,
                         "schedule": "cosine, SGD nesterov m=0.9", "augment": "cifar_augment", "bf16": True},
            "tolerance": args.prune_tolerance, "rows": rows, "dynamic": dyn}


def section_d(ctx, args) -> dict:
    from si_compress.compress import evaluate, load_compressed
    from si_compress.pipeline import count_tp
    from si_compress.quantize import QuantConfig, quantize_model
    from si_compress.storage import fp32_state_dict_bytes, save_packed

    import torch

    if not args.pruned:
        return {"skipped": "pass --pruned PATH (a model.pt written by si-compress)"}
    if not Path(args.pruned).is_file():
        return {"skipped": f"--pruned {args.pruned} does not exist"}
    pruned, plan = load_compressed(args.pruned)
    base = ctx["r56"]
    x0 = torch.zeros(1, 3, 32, 32)
    acc_base = ctx.setdefault("r56_acc", evaluate(base, ctx["test"]))
    acc_pruned = evaluate(pruned, ctx["test"])
    res = quantize_model(pruned, QuantConfig(mode="int8", calibration=args.int8_calibration,
                                             calibration_samples=args.calib_samples), ctx["calib"])
    acc_q = evaluate(res.model, ctx["test"])
    tmp = Path(ctx["tmp"])
    base_bytes = fp32_state_dict_bytes(base, tmp / "base_fp32.pt")
    pruned_bytes = fp32_state_dict_bytes(pruned, tmp / "pruned_fp32.pt")
    rep = save_packed(tmp / "pruned_int8.siqp", res.model)
    lat = _latency({"base_fp32": base, "pruned_fp32": pruned, "pruned_int8": res.model}, (3, 32, 32),
                   args.latency_repeats)
    base_macs, base_params = count_tp(base, x0)
    macs, params = count_tp(pruned, x0)
    out = {"pruned_path": str(Path(args.pruned).resolve()), "plan_arch": plan.arch,
           "macs": {"base": base_macs, "pruned": macs}, "params": {"base": base_params, "pruned": params},
           "acc_base_fp32": acc_base, "acc_pruned_fp32": acc_pruned, "acc_pruned_int8": acc_q,
           "drop_vs_base_points": 100 * (acc_base - acc_q), "drop_vs_pruned_points": 100 * (acc_pruned - acc_q),
           "size_bytes": {"base_fp32_state_dict": base_bytes, "pruned_fp32_state_dict": pruned_bytes,
                          "pruned_int8_packed": rep.size_bytes},
           "size_reduction_vs_base": 1 - rep.size_bytes / base_bytes, "latency_s": lat,
           "speedup_vs_base": {k: v["base_fp32"] / v["pruned_int8"] for k, v in lat.items()}}
    log(f"(d) base {acc_base:.4f} pruned {acc_pruned:.4f} pruned+int8 {acc_q:.4f}; size {base_bytes} -> "
        f"{rep.size_bytes} B ({100 * out['size_reduction_vs_base']:.1f}% smaller); speed-up b128 "
        f"{out['speedup_vs_base']['batch128']:.2f}x")
    return out


def run(args) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from si_compress.compress import preload
    from si_compress.data import balanced_indices, load_dataset
    from si_compress.models import load_model

    torch.manual_seed(args.seed)
    data = SHARED / "data" / "cifar10-jpeg"
    t0 = time.perf_counter()
    test = load_dataset(data, split="test")
    train = load_dataset(data, split="train")
    test_idx = None if not args.test_samples else balanced_indices(test.labels, args.test_samples, seed=args.seed)
    test_set = preload(test.dataset, test_idx)
    log(f"preloaded {len(test_set)} test images in {time.perf_counter() - t0:.0f} s")
    calib = DataLoader(preload(train.dataset, balanced_indices(train.labels, args.calib_samples, seed=args.seed + 1)),
                       batch_size=128)
    cache = {}

    def train_loader():
        if "train" not in cache:
            t = time.perf_counter()
            idx = None if not args.train_samples else balanced_indices(train.labels, args.train_samples, seed=args.seed)
            cache["train"] = preload(train.dataset, idx)
            log(f"preloaded {len(cache['train'])} train images in {time.perf_counter() - t:.0f} s")
        return DataLoader(cache["train"], batch_size=128, shuffle=True,
                          generator=torch.Generator().manual_seed(args.seed))

    with tempfile.TemporaryDirectory() as tmp:
        ctx = {"test": DataLoader(test_set, batch_size=500), "calib": calib, "tmp": tmp,
               "train_loader": train_loader,
               # positions in the preloaded test set
               "balanced_test": lambda n: balanced_indices(test.labels if test_idx is None else test.labels[test_idx],
                                                           n, seed=args.seed).tolist(),
               "r56": load_model(SHARED / "models" / "resnet56-cifar10-jpeg.th").model,
               "r20": load_model(SHARED / "models" / "resnet20-cifar10-jpeg.th").model}
        result = json.loads(Path(args.out).read_text()) if args.update and Path(args.out).is_file() else {}
        result.update({"machine": machine_info(), "threads": torch.get_num_threads(),
                       "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "calibration_split": "train (class-balanced sample)"})
        funcs = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e}
        for s in args.sections:
            t = time.perf_counter()
            result[s] = funcs[s](ctx, args)
            result[s]["seconds_section"] = time.perf_counter() - t
            write_json_atomic(args.out, result)  # partial results survive a later failure
    return result


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def table(path: Path, sections=SECTIONS) -> str:
    """Markdown tables of the ``sections`` present in the JSON (a section still to run says so)."""
    r = json.loads(Path(path).read_text())
    r = {k: v for k, v in r.items() if k not in SECTIONS or k in sections}
    lines = []
    if "a" in r:
        a = r["a"]
        lines += ["### (a) int8 PTQ, ResNet-56-jpeg, full JPEG test split", "",
                  "| model | top-1 | batch 1 latency | batch 128 latency | size on disk |", "|---|---|---|---|---|",
                  f"| fp32 | {_pct(a['acc_fp32'])} | {1e3 * a['latency_s']['batch1']['fp32']:.1f} ms | "
                  f"{1e3 * a['latency_s']['batch128']['fp32']:.0f} ms | "
                  f"{a['size_bytes']['fp32_state_dict'] / 1024:.0f} KiB |",
                  f"| int8 x86 (FX) | {_pct(a['acc_int8'])} | {1e3 * a['latency_s']['batch1']['int8']:.1f} ms "
                  f"({a['speedup']['batch1']:.2f}x) | {1e3 * a['latency_s']['batch128']['int8']:.0f} ms "
                  f"({a['speedup']['batch128']:.2f}x) | {a['size_bytes']['int8_packed'] / 1024:.0f} KiB packed, "
                  f"{a['size_bytes']['int8_torchscript'] / 1024:.0f} KiB TorchScript |", ""]
    if "b" in r:
        b = r["b"]
        q = b["qat"]
        sa = b["shiftadd"]
        lines += ["### (b) 4-bit power-of-two weights, 8-bit activations, ResNet-20-jpeg", "",
                  "| stage | top-1 |", "|---|---|",
                  f"| fp32 | {_pct(b['acc_fp32'])} |", f"| pot4 PTQ | {_pct(b['acc_ptq'])} |",
                  f"| pot4 QAT (2 epochs x {q['steps_per_epoch']}/{q['full_epoch_steps']} steps, "
                  f"{q['seconds'] / 60:.1f} min) "
                  f"| {_pct(b['acc_qat'])} |",
                  f"| shift-add kernels ({sa['samples']} images; fake-quant {_pct(sa['acc_fakequant_same_images'])}) "
                  f"| {_pct(sa['acc_shiftadd'])} |", "",
                  f"Shift kernel vs multiply reference on `{sa['kernel_check']['layer']}` "
                  f"({sa['kernel_check']['input_shape']}): bit-exact = {sa['kernel_check']['bit_exact']}.", ""]
    if "c" in r:
        c = r["c"]
        lines += [f"### (c) percentile pruning x bits, ResNet-20-jpeg, {c['test_images']} test images, no fine-tuning",
                  "", f"fp32: {_pct(c['acc_fp32'])}, {c['fp32_state_dict_bytes'] / 1024:.0f} KiB.", "",
                  "| sparsity | bits | top-1 fp32 pruned | top-1 quantized | size | bits/weight |",
                  "|---|---|---|---|---|---|"]
        for row in c["rows"]:
            lines.append(f"| {row['sparsity_pct']}% | {row['bits']} | {_pct(row['acc_fp32_pruned'])} | "
                         f"{_pct(row['acc_quant'])} | {row['size_bytes'] / 1024:.0f} KiB | "
                         f"{row['stored_bits_per_weight']:.2f} |")
        lines.append("")
    if "e" in r and "skipped" not in r["e"]:
        e = r["e"]
        f = e["finetune"]
        lines += [f"### (e) percentile pruning x bits after fine-tuning, ResNet-20-jpeg, {e['test_images']} test images",
                  "", f"fp32: {_pct(e['acc_fp32'])}, {e['fp32_state_dict_bytes'] / 1024:.0f} KiB. Each sparsity: global "
                  f"magnitude pruning, then {f['steps']} SGD steps of batch {f['batch_size']} "
                  f"({f['steps'] * f['batch_size'] / 50000:.2f} epoch, lr {f['lr']}, cosine) with the masks held, then "
                  "int8 (x86 kernels) / int4 (fake-quant), stored as packed weights + sparse index.", "",
                  "| sparsity | bits | top-1 pruned | top-1 fine-tuned | top-1 quantized | size | bits/weight |",
                  "|---|---|---|---|---|---|---|"]
        for row in e["rows"]:
            lines.append(f"| {row['sparsity_pct']}% | {row['bits']} | {_pct(row['acc_fp32_pruned'])} | "
                         f"{_pct(row['acc_fp32_finetuned'])} | {_pct(row['acc_quant'])} | "
                         f"{row['size_bytes'] / 1024:.0f} KiB | {row['stored_bits_per_weight']:.2f} |")
        dyn = e["dynamic"]
        trials = ", ".join(f"{h['percentile']:g}% {'ok' if h['accepted'] else 'dropped'} ({_pct(h['accuracy'])})"
                           for h in dyn["history"])
        lines += ["", f"Dynamic threshold (tolerance {100 * e['tolerance']:.1f} pt): trials {trials}; accepted "
                      f"{dyn['percentile']:g}% ({100 * dyn['sparsity']:.1f}% of weights zero) at "
                      f"{_pct(dyn['acc_fp32'])}; then int8 {_pct(dyn['int8']['acc_quant'])}, "
                      f"{dyn['int8']['size_bytes'] / 1024:.0f} KiB; int4 {_pct(dyn['int4']['acc_quant'])}, "
                      f"{dyn['int4']['size_bytes'] / 1024:.0f} KiB (fp32 {e['fp32_state_dict_bytes'] / 1024:.0f} KiB).",
                  ""]
    if "d" in r and "skipped" not in r["d"]:
        d = r["d"]
        lines += ["### (d) SI pruning + int8, ResNet-56-jpeg, full JPEG test split", "",
                  "| model | top-1 | size | batch 128 latency | MACs |", "|---|---|---|---|---|",
                  f"| base fp32 | {_pct(d['acc_base_fp32'])} | "
                  f"{d['size_bytes']['base_fp32_state_dict'] / 1024:.0f} KiB | "
                  f"{1e3 * d['latency_s']['batch128']['base_fp32']:.0f} ms | {d['macs']['base'] / 1e6:.1f} M |",
                  f"| SI-pruned fp32 | {_pct(d['acc_pruned_fp32'])} | "
                  f"{d['size_bytes']['pruned_fp32_state_dict'] / 1024:.0f} KiB | "
                  f"{1e3 * d['latency_s']['batch128']['pruned_fp32']:.0f} ms | {d['macs']['pruned'] / 1e6:.1f} M |",
                  f"| SI-pruned int8 | {_pct(d['acc_pruned_int8'])} | "
                  f"{d['size_bytes']['pruned_int8_packed'] / 1024:.0f} KiB "
                  f"({100 * d['size_reduction_vs_base']:.1f}% smaller) | "
                  f"{1e3 * d['latency_s']['batch128']['pruned_int8']:.0f} ms "
                  f"({d['speedup_vs_base']['batch128']:.2f}x) | - |",
                  ""]
    for s in sections:
        if s not in r or "skipped" in r[s]:
            why = f" ({r[s]['skipped']})" if s in r else ""
            cmd = f"python benchmarks/bench_quant.py --sections {s} --update" + \
                (" --pruned runs/compress/si_resnet56.pt" if s == "d" else "")
            lines += [f"_({s}) not measured yet{why}: run `{cmd}`._", ""]
    m = r.get("machine", {})
    lines.append(f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} CPUs, "
                 f"torch {m.get('versions', {}).get('torch')}, "
                 f"{r.get('threads')} threads.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--pruned", default=None, help="model.pt written by si-compress (section d)")
    p.add_argument("--prune-ft-steps", type=int, default=150, help="(e) SGD steps of batch 128 per fine-tuning")
    p.add_argument("--prune-ft-lr", type=float, default=0.01)
    p.add_argument("--prune-tolerance", type=float, default=0.01, help="(e) accuracy the search may lose (0.01 = 1 pt)")
    p.add_argument("--prune-trials", type=int, default=6)
    p.add_argument("--test-samples", type=int, default=0, help="0: the full test split (smoke runs: fewer)")
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--int8-calibration", default="mse", choices=("minmax", "percentile", "mse"))
    p.add_argument("--act-calibration", default="mse", choices=("minmax", "percentile", "mse"))
    p.add_argument("--train-samples", type=int, default=0, help="0: the full train split (smoke runs: fewer)")
    p.add_argument("--qat-minutes", type=float, default=15.0, help="time budget of the 2 QAT epochs")
    p.add_argument("--qat-lr", type=float, default=2e-3)
    p.add_argument("--shiftadd-samples", type=int, default=500)
    p.add_argument("--grid-samples", type=int, default=2000)
    p.add_argument("--latency-repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULT)
    p.add_argument("--table", action="store_true")
    p.add_argument("--update", action="store_true", help="keep the other sections already in --out")
    args = p.parse_args(argv)
    if args.table:  # --sections picks which tables to print
        print(table(args.out, args.sections))
        return 0
    run(args)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
