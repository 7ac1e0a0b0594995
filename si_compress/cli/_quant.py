"""Quantization options of si-compress: prune (unstructured) -> fine-tune -> quantize -> shift-add.

``add_quant_args(parser)`` adds the options; ``apply_quant(args, model, calib_loader, train_loader,
test_loader)`` runs them on the (already SI-compressed) float model and returns the metrics that
go into metrics.json under ``"quant"``. With ``args.out`` set it also writes
``<out>/weights.siqp`` (packed weights, :mod:`si_compress.quant.storage`), ``<out>/model_fp32.pt`` (the
float state dict, for the size comparison) and, for int8, ``<out>/model.int8.onnx`` (onnxruntime
engine, the default: QDQ int8 ONNX) or ``<out>/model.int8.ts`` (``--int8-engine torch``: TorchScript);
for int4 / pot4 / apot4, ``<out>/model.codes.npz`` and ``<out>/model.codes.h`` (integer weight codes
per layer, :mod:`si_compress.quant.export`) and ``<out>/model.codes.onnx`` (the same codes as
int8 initializers behind DequantizeLinear, when onnx is installed).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

QUANT_CHOICES = ("int8", "int4", "pot4", "apot4")
INT8_ENGINES = ("onnxruntime", "torch")
CALIBRATIONS = ("minmax", "percentile", "mse", "entropy", "distribution")


def add_quant_args(parser) -> None:
    """Add --quant and its options to an argparse parser."""
    g = parser.add_argument_group("quantization (after pruning and fine-tuning)")
    g.add_argument("--quant", choices=QUANT_CHOICES, default=None,
                   help="int8: real int8 kernels (PTQ, onnxruntime by default, writes model.int8.onnx); int4 / "
                        "pot4 / apot4: 4-bit weights (integer, power-of-two, additive power-of-two) with 8-bit "
                        "activations, PTQ then --qat-epochs")
    g.add_argument("--int8-engine", choices=INT8_ENGINES, default="onnxruntime",
                   help="int8 engine: onnxruntime (default; QDQ ONNX, per-channel int8 weights) or torch "
                        "(deprecated torch.ao FX path, TorchScript output)")
    g.add_argument("--quant-calibration", choices=CALIBRATIONS, default=None,
                   help="activation range calibration: minmax / entropy / percentile / distribution for "
                        "onnxruntime int8 (default minmax); minmax / percentile / mse for the 4-bit modes and "
                        "torch int8 (default mse)")
    g.add_argument("--quant-samples", type=int, default=512, help="calibration images (default 512)")
    g.add_argument("--qat-epochs", type=int, default=0, help="QAT epochs for int4/pot4/apot4 (default 0: PTQ)")
    g.add_argument("--qat-max-steps", type=int, default=None, help="stop each QAT epoch after this many batches")
    g.add_argument("--qat-lr", type=float, default=1e-3)
    g.add_argument("--shiftadd", action="store_true",
                   help="pot4/apot4: convert to shift-add integer kernels (Numba) at the end")
    g.add_argument("--sparsity", type=float, default=0.0,
                   help="unstructured global magnitude pruning: percent of conv/linear weights set to zero "
                        "before quantization (kept at zero through QAT)")
    g.add_argument("--sparsity-epochs", type=int, default=0,
                   help="fine-tuning epochs after --sparsity pruning, before quantization (masks held)")


def check_quant_args(args) -> None:
    """ValueError (one line) when the quantization options do not fit together; cheap, so the CLI
    calls it before any compression work."""
    if args.quant_samples < 1:
        raise ValueError(f"--quant-samples must be >= 1; got {args.quant_samples}")
    if args.qat_epochs < 0 or args.sparsity_epochs < 0:
        raise ValueError("--qat-epochs and --sparsity-epochs must be >= 0")
    if not 0 <= args.sparsity < 100:
        raise ValueError(f"--sparsity is a percentage in [0, 100); got {args.sparsity}")
    if args.quant == "int8" and args.qat_epochs:
        raise ValueError("--qat-epochs applies to int4/pot4/apot4; int8 is post-training only")
    if args.shiftadd and args.quant not in ("pot4", "apot4"):
        raise ValueError("--shiftadd needs --quant pot4 or apot4 (power-of-two weights)")
    engine = getattr(args, "int8_engine", "onnxruntime")
    cal = args.quant_calibration
    if cal is not None and args.quant is not None:
        ort = args.quant == "int8" and engine == "onnxruntime"
        allowed = ("minmax", "entropy", "percentile", "distribution") if ort else ("minmax", "percentile", "mse")
        if cal not in allowed:
            who = "--quant int8 (onnxruntime)" if ort else f"--quant {args.quant}" + (
                " --int8-engine torch" if args.quant == "int8" else "")
            extra = "; mse is offered by --int8-engine torch" if ort and cal == "mse" else ""
            raise ValueError(f"--quant-calibration {cal} does not apply to {who}: use one of "
                             f"{', '.join(allowed)}{extra}")
    if args.quant == "int8" and engine == "onnxruntime":
        from ..quant.engine_ort import ort_available

        if not ort_available():
            raise ValueError("--quant int8 runs through onnxruntime, which is not installed: "
                             "pip install onnx onnxruntime (or pass --int8-engine torch)")


def apply_quant(args, model, calib_loader, train_loader, test_loader) -> dict:
    """Prune (``--sparsity``) -> fine-tune (``--sparsity-epochs``) -> quantize (``--quant``) ->
    shift-add (``--shiftadd``) a copy of ``model``; returns metrics (see :func:`_apply`). Without
    ``args.out`` the files go to a temporary folder that is removed afterwards."""
    if getattr(args, "out", None):
        return _apply(args, model, calib_loader, train_loader, test_loader, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="si_quant_") as tmp:
        metrics = _apply(args, model, calib_loader, train_loader, test_loader, Path(tmp))
        if metrics:
            metrics["packed_path"] = None
        return metrics


def _apply(args, model, calib_loader, train_loader, test_loader, out: Path) -> dict:
    """The work of :func:`apply_quant`, writing into ``out``.

    Metrics: kind, bits_per_weight (nominal code bits), stored_bits_per_weight (codes + index +
    scales), size_on_disk_bytes (packed file), fp32_size_bytes (torch.save state dict of the
    input), size_reduction, sparsity, accuracy {fp32, pruned, quantized}, latency {batch1,
    batch128: fp32_s, quant_s, speedup} for int8 and shift-add (interleaved medians; fake-quant
    models simulate quantization in float and get no latency), details. Returns {} without --quant
    and --sparsity.
    """
    import copy

    import torch

    from ..compress import cifar_augment, evaluate
    from ..quant.api import QuantConfig, compare_latency, percentile_prune, quantize_model, run_qat
    from ..quant.storage import fp32_state_dict_bytes, save_packed

    if args.quant is None and not args.sparsity:
        return {}
    check_quant_args(args)
    if (args.qat_epochs and args.quant != "int8") or args.sparsity_epochs:
        if train_loader is None:
            raise ValueError("--qat-epochs / --sparsity-epochs need the training split (train_loader)")
    example = next(iter(calib_loader))[0][:1]
    augment = cifar_augment if tuple(example.shape[-2:]) == (32, 32) else None
    work = copy.deepcopy(model).eval()
    metrics: dict = {"accuracy": {"fp32": evaluate(work, test_loader)}}
    masks = None
    if args.sparsity:
        masks = percentile_prune(work, args.sparsity, scope="global", hold=False)
        metrics["sparsity_percentile"] = args.sparsity
        if args.sparsity_epochs:
            run_qat(work, train_loader, epochs=args.sparsity_epochs, lr=args.qat_lr, augment=augment, masks=masks)
        metrics["accuracy"]["pruned"] = evaluate(work, test_loader)
    fp32_bytes = fp32_state_dict_bytes(model, out / "model_fp32.pt")
    if args.quant is None:
        qmodel, kind, bpw, details, fmt = work, "float32", 32.0, {}, None
    else:
        cfg = QuantConfig(mode=args.quant, calibration=args.quant_calibration,
                          int8_engine=getattr(args, "int8_engine", "onnxruntime"),
                          calibration_samples=args.quant_samples, qat_epochs=args.qat_epochs,
                          qat_max_steps=args.qat_max_steps, lr=args.qat_lr, shiftadd=args.shiftadd,
                          bf16=bool(getattr(args, "bf16", False)), seed=int(getattr(args, "seed", 0)))
        res = quantize_model(work, cfg, calib_loader, train_loader=train_loader, augment=augment, masks=masks)
        qmodel, kind, bpw, details = res.model, res.kind, res.bits_per_weight, res.details
        metrics["accuracy"]["quantized"] = evaluate(qmodel, test_loader)
    ort_int8 = kind == "int8-onnxruntime"
    # a float model (sparsity only) is stored with float32 codes, so the size shows the sparse format alone;
    # the onnxruntime int8 model's weights live in its ONNX file, the packed file stores `work` at 8 bits
    report = save_packed(out / "weights.siqp", work if ort_int8 else qmodel, bits=None if args.quant is None else 8)
    if ort_int8:
        qmodel.save(out / "model.int8.onnx")
        metrics["int8_onnx_path"] = str(out / "model.int8.onnx")
        metrics["int8_onnx_bytes"] = (out / "model.int8.onnx").stat().st_size
        metrics["accuracy"]["fp32_onnx"] = evaluate(res.reference, test_loader)
    elif args.quant == "int8":
        from ..quant.engine_torch import save_int8

        save_int8(qmodel, out / "model.int8.ts", example)
    elif args.quant is not None:
        from ..quant.export import export_c_header, export_codes

        export_codes(qmodel, out / "model.codes.npz")
        export_c_header(out / "model.codes.npz", out / "model.codes.h")
        metrics["codes_path"] = str(out / "model.codes.npz")
        from ..quant.engine_ort import ort_available

        if ort_available():  # onnx is an optional dependency
            from ..quant.export import export_qdq_onnx

            try:
                export_qdq_onnx(qmodel, out / "model.codes.onnx", example)
                metrics["codes_onnx_path"] = str(out / "model.codes.onnx")
            except ValueError as exc:  # integer weights wider than int8: the .npz holds them
                metrics["codes_onnx_path"] = None
                metrics["codes_onnx_skipped"] = str(exc)
    lat = {}
    if args.quant == "int8" or args.shiftadd:
        shape = tuple(example.shape[1:])
        models = {"fp32": model, "quant": qmodel}
        if ort_int8:
            models["fp32_onnx"] = res.reference  # same runtime, float: the like-for-like baseline
        for b in (1, 128):
            x = torch.randn(b, *shape)
            r = compare_latency(models, x, repeats=5 if args.quant == "int8" else 2, warmup=1)
            lat[f"batch{b}"] = {"fp32_s": r["fp32"]["median_s"], "quant_s": r["quant"]["median_s"],
                                "speedup": r["fp32"]["median_s"] / r["quant"]["median_s"]}
            if ort_int8:
                lat[f"batch{b}"].update(fp32_onnx_s=r["fp32_onnx"]["median_s"],
                                        speedup_vs_fp32_onnx=r["fp32_onnx"]["median_s"] / r["quant"]["median_s"])
    metrics.update(kind=kind, bits_per_weight=bpw, stored_bits_per_weight=report.bits_per_weight,
                   size_on_disk_bytes=report.size_bytes, fp32_size_bytes=fp32_bytes,
                   size_reduction=1.0 - report.size_bytes / fp32_bytes, sparsity=report.sparsity,
                   latency=lat or None, packed_path=str(report.path),
                   details={k: v for k, v in details.items() if k != "qat_history"},
                   qat_history=details.get("qat_history"))
    return metrics
