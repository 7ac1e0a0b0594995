"""Quantization claims on the JPEG CIFAR-10 ResNets, measured in one run.

(a) int8 PTQ of ResNet-56-jpeg with both engines: onnxruntime (QDQ, per-channel; the default) and
    the deprecated torch.ao FX path. Top-1 on the full 10k JPEG test split of torch fp32, onnxruntime
    fp32, onnxruntime int8 and torch.ao int8; latency of all four at batch 1 and 128 in one
    interleaved run; sizes on disk (ONNX files, TorchScript, packed weights).
(b) pot4 (4-bit power-of-two weights, 8-bit activations) on ResNet-20-jpeg: PTQ, then QAT (at
    most 2 epochs; steps per epoch capped so QAT fits --qat-minutes), top-1 on the full test split;
    the shift-add kernel against the integer-multiply reference on one real layer (bit-exact?),
    and the converted shift-add model's top-1 and evaluation time on the test split (the Numba
    shift-add kernels; --shiftadd-samples 0 = all 10,000 images).
(c) unstructured percentile pruning x bits on ResNet-20: sparsity {0, 50, 70, 90}% x {int8 x86,
    int4 fake-quant}, post-training (no fine-tuning) top-1 on --grid-samples test images and size.
(d) SI pruning + int8 on ResNet-56: a model.pt written by si-compress (--pruned), quantized to int8
    with both engines as in (a):
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


def _int8_engines(model, ctx, args, tag: str, extra: dict | None = None) -> dict:
    """int8 of ``model`` with both engines, timed in one interleaved run: torch fp32 eager, onnxruntime
    fp32 (the exported graph), onnxruntime int8 (QDQ, per-channel) and torch.ao int8 (deprecated FX
    path, for comparison), plus ``extra`` models in the same rounds. Accuracy of each quantized /
    exported model on the test loader; sizes on disk."""
    import torch

    from si_compress.compress import evaluate
    from si_compress.quant.engine_torch import save_int8
    from si_compress.quant.api import QuantConfig, quantize_model
    from si_compress.quant.storage import save_packed

    tmp = Path(ctx["tmp"])
    ort = quantize_model(model, QuantConfig(mode="int8", calibration=args.int8_calibration,
                                            calibration_samples=args.calib_samples), ctx["calib"])
    fx = quantize_model(model, QuantConfig(mode="int8", int8_engine="torch", calibration=args.torch_int8_calibration,
                                           calibration_samples=args.calib_samples), ctx["calib"])
    models = {"fp32": model, "onnx_fp32": ort.reference, "onnx_int8": ort.model, "torch_ao_int8": fx.model}
    acc = {k: evaluate(m, ctx["test"]) for k, m in models.items() if k != "fp32"}
    lat = _latency({**models, **(extra or {})}, (3, 32, 32), args.latency_repeats)
    sizes = {"int8_onnx": ort.model.save(tmp / f"{tag}.int8.onnx").stat().st_size,
             "fp32_onnx": ort.reference.save(tmp / f"{tag}.fp32.onnx").stat().st_size,
             "torch_ao_int8_torchscript": save_int8(fx.model, tmp / f"{tag}_int8.ts",
                                                    torch.zeros(1, 3, 32, 32)).stat().st_size,
             "int8_packed": save_packed(tmp / f"{tag}_int8.siqp", fx.model).size_bytes}
    speedup = {b: {k: v["fp32"] / v[k] for k in v if k not in ("fp32", "noisy")} for b, v in lat.items()}
    return {"acc": acc, "latency_s": lat, "speedup_vs_torch_fp32": speedup,
            "onnx_int8_vs_onnx_fp32": {b: v["onnx_fp32"] / v["onnx_int8"] for b, v in lat.items()},
            "onnx_int8_vs_torch_ao_int8": {b: v["torch_ao_int8"] / v["onnx_int8"] for b, v in lat.items()},
            "size_bytes": sizes, "onnxruntime": {k: v for k, v in ort.details.items()},
            "torch_ao": {"calibration": fx.details["calibration"], "reduce_range": fx.details["reduce_range"]}}


def section_a(ctx, args) -> dict:
    from si_compress.compress import evaluate
    from si_compress.quant.storage import fp32_state_dict_bytes

    base = ctx["r56"]
    log("(a) fp32 ResNet-56 accuracy on", len(ctx["test"].dataset))
    acc_fp32 = ctx.setdefault("r56_acc", evaluate(base, ctx["test"]))
    r = _int8_engines(base, ctx, args, "r56")
    fp32_bytes = fp32_state_dict_bytes(base, Path(ctx["tmp"]) / "r56_fp32.pt")
    out = {"model": "resnet56-cifar10-jpeg", "test_images": len(ctx["test"].dataset), "acc_fp32": acc_fp32,
           "acc_int8": r["acc"]["onnx_int8"], "acc_drop_points": 100 * (acc_fp32 - r["acc"]["onnx_int8"]),
           **r}
    out["size_bytes"]["fp32_state_dict"] = fp32_bytes
    # summary keys read by report.py: the default engine's int8 against torch fp32
    out["speedup"] = {b: v["onnx_int8"] for b, v in r["speedup_vs_torch_fp32"].items()}
    out["size_reduction_packed"] = 1 - out["size_bytes"]["int8_packed"] / fp32_bytes
    out["size_reduction_onnx"] = 1 - out["size_bytes"]["int8_onnx"] / fp32_bytes
    sp = r["speedup_vs_torch_fp32"]
    log(f"(a) fp32 {acc_fp32:.4f} onnx int8 {r['acc']['onnx_int8']:.4f} torch.ao int8 {r['acc']['torch_ao_int8']:.4f}; "
        f"x torch fp32: onnx int8 b1 {sp['batch1']['onnx_int8']:.2f} b128 {sp['batch128']['onnx_int8']:.2f}, "
        f"torch.ao b1 {sp['batch1']['torch_ao_int8']:.2f} b128 {sp['batch128']['torch_ao_int8']:.2f}")
    return out


def _shiftadd_check(model, x) -> dict:
    """Bit-exactness of the shift kernel vs the multiply kernel on the first ShiftAddConv2d."""
    import numpy as np
    import torch

    from si_compress.quant import ShiftAddConv2d, conv2d_mul, conv2d_shift

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
    from si_compress.quant import convert_to_shiftadd
    from si_compress.quant.api import QuantConfig, quantize_model, run_qat

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
    n_test = len(ctx["test"].dataset)
    step = 1 if not args.shiftadd_samples else max(1, n_test // args.shiftadd_samples)
    sub = Subset(ctx["test"].dataset, range(0, n_test, step))
    sub_loader = DataLoader(sub, batch_size=500)
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
                         "acc_fp32_same_images": acc_fp32_sub, "seconds_eval": sa_s,
                         "seconds_per_10k_images": sa_s * 10000 / len(sub), "numba_threads": _numba_threads(),
                         "kernel_check": check}}


def _numba_threads() -> int:
    import numba

    return int(numba.get_num_threads())


def _packable(res, float_model):
    """The module whose weights the packed file stores: an onnxruntime int8 model keeps its weights in
    the ONNX file, so its float source is packed at 8 bits (per-channel, the same grid); others as they are."""
    return float_model if res.kind == "int8-onnxruntime" else res.model


def _r20_grid_setup(ctx, args):
    """ResNet-20 and its evaluation subset for the pruning x bits grids (c) and (e):
    (base, test indices, loader, tmp dir, fp32 state-dict bytes, fp32 top-1)."""
    from torch.utils.data import DataLoader, Subset

    from si_compress.compress import evaluate
    from si_compress.quant.storage import fp32_state_dict_bytes

    base = ctx["r20"]
    idx = ctx["balanced_test"](args.grid_samples)
    loader = DataLoader(Subset(ctx["test"].dataset, idx), batch_size=500)
    tmp = Path(ctx["tmp"])
    return base, idx, loader, tmp, fp32_state_dict_bytes(base, tmp / "r20_fp32.pt"), evaluate(base, loader)


def section_c(ctx, args) -> dict:
    from si_compress.compress import evaluate
    from si_compress.quant.api import QuantConfig, percentile_prune, quantize_model
    from si_compress.quant.storage import save_packed

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
            rep = save_packed(tmp / f"grid_{sparsity}_{bits}.siqp", _packable(res, pruned), bits=8)
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
    from si_compress.quant.api import (QuantConfig, dynamic_percentile_search, holding_masks, percentile_prune,
                                      quantize_model)
    from si_compress.quant.storage import save_packed

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
            rep = save_packed(tmp / f"e_{tag}_{bits}.siqp", _packable(res, model), bits=8)
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
    from si_compress.quant.storage import fp32_state_dict_bytes

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
    r = _int8_engines(pruned, ctx, args, "pruned", extra={"base_fp32": base})
    tmp = Path(ctx["tmp"])
    base_bytes = fp32_state_dict_bytes(base, tmp / "base_fp32.pt")
    pruned_bytes = fp32_state_dict_bytes(pruned, tmp / "pruned_fp32.pt")
    base_macs, base_params = count_tp(base, x0)
    macs, params = count_tp(pruned, x0)
    acc_q = r["acc"]["onnx_int8"]
    out = {"pruned_path": str(Path(args.pruned).resolve()), "plan_arch": plan.arch,
           "macs": {"base": base_macs, "pruned": macs}, "params": {"base": base_params, "pruned": params},
           "acc_base_fp32": acc_base, "acc_pruned_fp32": acc_pruned, "acc_pruned_int8": acc_q,
           "drop_vs_base_points": 100 * (acc_base - acc_q), "drop_vs_pruned_points": 100 * (acc_pruned - acc_q),
           **r}
    out["size_bytes"].update(base_fp32_state_dict=base_bytes, pruned_fp32_state_dict=pruned_bytes,
                             pruned_int8_packed=out["size_bytes"]["int8_packed"])
    # summary keys read by report.py: the default engine (onnxruntime int8) against the fp32 base, same run
    out["speedup_vs_base"] = {b: v["base_fp32"] / v["onnx_int8"] for b, v in r["latency_s"].items()}
    out["size_reduction_vs_base"] = 1 - out["size_bytes"]["int8_packed"] / base_bytes
    out["size_reduction_vs_base_onnx"] = 1 - out["size_bytes"]["int8_onnx"] / base_bytes
    sp = r["speedup_vs_torch_fp32"]
    log(f"(d) base {acc_base:.4f} pruned {acc_pruned:.4f} pruned+int8 (onnx) {acc_q:.4f}; onnx int8 x pruned fp32 "
        f"b1 {sp['batch1']['onnx_int8']:.2f} b128 {sp['batch128']['onnx_int8']:.2f}; x torch.ao int8 "
        f"b1 {r['onnx_int8_vs_torch_ao_int8']['batch1']:.2f} b128 {r['onnx_int8_vs_torch_ao_int8']['batch128']:.2f}")
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


def _int8_rows(sec, acc_fp32, fp32_bytes) -> list[str]:
    """Table rows of :func:`_int8_engines` results: torch fp32, onnxruntime fp32 / int8, torch.ao int8."""
    lat, sp, size = sec["latency_s"], sec["speedup_vs_torch_fp32"], sec["size_bytes"]
    rows = ["| model | top-1 | batch 1 latency | batch 128 latency | size on disk |", "|---|---|---|---|---|",
            f"| torch fp32 eager | {_pct(acc_fp32)} | {1e3 * lat['batch1']['fp32']:.1f} ms | "
            f"{1e3 * lat['batch128']['fp32']:.0f} ms | {fp32_bytes / 1024:.0f} KiB state dict |"]
    labels = {"onnx_fp32": ("onnxruntime fp32", f"{size['fp32_onnx'] / 1024:.0f} KiB ONNX"),
              "onnx_int8": ("**onnxruntime int8 (QDQ, default)**", f"{size['int8_onnx'] / 1024:.0f} KiB ONNX"),
              "torch_ao_int8": ("torch.ao int8 (`--int8-engine torch`)",
                                f"{size['torch_ao_int8_torchscript'] / 1024:.0f} KiB TorchScript")}
    for k, (label, sz) in labels.items():
        rows.append(f"| {label} | {_pct(sec['acc'][k])} | {1e3 * lat['batch1'][k]:.1f} ms ({sp['batch1'][k]:.2f}x) | "
                    f"{1e3 * lat['batch128'][k]:.0f} ms ({sp['batch128'][k]:.2f}x) | {sz} |")
    o = sec["onnx_int8_vs_onnx_fp32"]
    t = sec["onnx_int8_vs_torch_ao_int8"]
    ort = sec["onnxruntime"]
    rows += ["", f"onnxruntime int8 vs onnxruntime fp32: {o['batch1']:.2f}x (batch 1), {o['batch128']:.2f}x "
             f"(batch 128); vs torch.ao int8: {t['batch1']:.2f}x, {t['batch128']:.2f}x. Calibration "
             f"{ort['calibration']} on {ort['calibration_samples']} class-balanced train images, reduce_range "
             f"{ort['reduce_range']} (VNNI {ort['vnni']})."]
    return rows


def table(path: Path, sections=SECTIONS) -> str:
    """Markdown tables of the ``sections`` present in the JSON (a section still to run says so)."""
    r = json.loads(Path(path).read_text())
    r = {k: v for k, v in r.items() if k not in SECTIONS or k in sections}
    lines = []
    if "a" in r:
        a = r["a"]
        lines += ["### (a) int8 PTQ, ResNet-56-jpeg, full JPEG test split", "",
                  *_int8_rows(a, a["acc_fp32"], a["size_bytes"]["fp32_state_dict"]), ""]
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
                  f"Shift-add evaluation: {sa['seconds_eval']:.0f} s for {sa['samples']} images "
                  f"({sa['seconds_per_10k_images'] / 60:.1f} min per 10,000; {sa.get('numba_threads', '?')} Numba "
                  "threads, first call's compilation included).", "",
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
                  f"Base fp32: {_pct(d['acc_base_fp32'])}, {d['macs']['base'] / 1e6:.1f} M MACs, "
                  f"{d['size_bytes']['base_fp32_state_dict'] / 1024:.0f} KiB, batch 1 / 128: "
                  f"{1e3 * d['latency_s']['batch1']['base_fp32']:.1f} / "
                  f"{1e3 * d['latency_s']['batch128']['base_fp32']:.0f} ms (same run). SI-pruned: "
                  f"{d['macs']['pruned'] / 1e6:.1f} M MACs; rows below are the pruned model "
                  "(speed-ups against its torch fp32 eager).", "",
                  *_int8_rows(d, d["acc_pruned_fp32"], d["size_bytes"]["pruned_fp32_state_dict"]), ""]
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
    p.add_argument("--int8-calibration", default="minmax", choices=("minmax", "entropy", "percentile", "distribution"),
                   help="onnxruntime int8 calibration (default minmax)")
    p.add_argument("--torch-int8-calibration", default="mse", choices=("minmax", "percentile", "mse"),
                   help="calibration of the torch.ao int8 comparison (default mse)")
    p.add_argument("--act-calibration", default="mse", choices=("minmax", "percentile", "mse"))
    p.add_argument("--train-samples", type=int, default=0, help="0: the full train split (smoke runs: fewer)")
    p.add_argument("--qat-minutes", type=float, default=15.0, help="time budget of the 2 QAT epochs")
    p.add_argument("--qat-lr", type=float, default=2e-3)
    p.add_argument("--shiftadd-samples", type=int, default=0,
                   help="(b) test images evaluated with the shift-add kernels (0: the whole test split)")
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
