"""si-compress: SI compression plan of a trained model, applied as real structured pruning.

    si-compress model.th --data DIR_WITH_TRAIN_AND_TEST [--target-macs 0.5] --out DIR
    si-compress model.th --data ... --plan plan.json --out DIR      # apply an (edited) plan

SI is measured on a class-balanced sample of the train split; accuracy on the test split. Writes
atomically in DIR: plan.json, model.pt (arch + plan + state dict; reloads with weights_only=True),
metrics.json, kept_filters.png, and with --export: model.ts (TorchScript), model.onnx.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ._common import (ArgumentParser, CLIError, Progress, add_device_arg, add_model_args, check_device, nonneg_int,
                      positive_float, positive_int, run_main, torch_threads)
from ._quant import add_quant_args

PROG = "si-compress"


# Every file a run may write: a reused --out loses the ones this run does not write again
# (an old model.onnx beside a new model.pt would describe another model).
OUTPUTS = ("plan.json", "model.pt", "metrics.json", "kept_filters.png", "model.ts", "model.onnx",
           "weights.siqp", "model_fp32.pt", "model.int8.ts", "model.int8.onnx", "model.codes.npz", "model.codes.h",
           "model.codes.onnx")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Plan by Separation Index and prune a trained CNN: drop blocks "
                       "that add little separation, keep the filters that separate, compensate without training.")
    add_model_args(p)
    p.add_argument("--data", required=True, help="digits, cifar10, cifar100, or an ImageFolder with train/ and test/")
    p.add_argument("--data-root", help="where torchvision CIFAR data lives (default ~/.cache/si_compress/data)")
    p.add_argument("--download", action="store_true", help="download CIFAR if missing (needs internet)")
    p.add_argument("--normalize", default="auto",
                   help="auto (dataset preset), none, or 'm1,m2,m3/s1,s2,s3' mean/std per channel")
    p.add_argument("--plan", help="apply this plan.json instead of planning")
    p.add_argument("--target-macs", type=float, default=0.5,
                   help="fraction of the base MACs to keep (default 0.5); 1 with --delta for threshold mode")
    p.add_argument("--target-params", type=float, default=None,
                   help="also keep at most this fraction of the parameters (model size; e.g. 0.5); both budgets "
                        "hold, and once the MACs fit the planner cuts where SI is lost least per parameter")
    p.add_argument("--delta", type=float, default=None,
                   help="threshold mode: keep the shortest filter prefix reaching (1-delta) x max SI (no budget)")
    p.add_argument("--ranking", default="l1", choices=("si", "si-greedy", "l1", "random"),
                   help="which filters a layer keeps (default l1: measured best after compensation); how many "
                        "filters per layer and which blocks go always come from the SI curves")
    p.add_argument("--objective", default="both", choices=("macs", "latency", "both"),
                   help="rank planner moves by SI lost per MAC saved, per measured CPU second saved, or per "
                        "the mean of both fractions (default both)")
    p.add_argument("--latency-batch", type=int, nargs="+", default=[128], metavar="B",
                   help="with --objective latency/both: time sections at these batch sizes (e.g. 1 128 for a model "
                        "served one image at a time and in batches: each batch's fraction of time saved counts "
                        "alike; default 128)")
    p.add_argument("--no-drop", action="store_true", help="never drop whole blocks")
    p.add_argument("--streams", action="store_true",
                   help="also narrow residual streams (the channels a stage's blocks add into), planned by SI at the "
                        "stage output; off by default: on ResNet-56 at -50%% MACs it cut params to -56%% but kept "
                        "72.75%% after the re-fit against 87.15%% without (2000 test images)")
    p.add_argument("--no-truncate", action="store_true",
                   help="plain chains (VGG-style): do not cut the network after its SI peak")
    p.add_argument("--truncate-below-budget", action="store_true",
                   help="plain chains: cut at the SI peak even when the cut alone keeps well under --target-macs "
                        "(default: such a cut is not applied, so the MACs land at the budget)")
    p.add_argument("--truncate-tol", type=float, default=0.01,
                   help="plain chains: cut after the first layer whose SI is within this of the max SI (default 0.01)")
    p.add_argument("--round-to", type=positive_int, default=8,
                   help="kept filter counts in multiples of this (default 8, what fast CPU kernels need); "
                        "a layer never goes below it: the block is dropped instead")
    p.add_argument("--si-samples", type=positive_int, default=None,
                   help=f"class-balanced train sample for SI (default {DEFAULT_SI_SAMPLES} or the whole train "
                        "split if smaller)")
    p.add_argument("--eval-samples", type=nonneg_int, default=0,
                   help="class-balanced test images for accuracy (default 0 = the whole test split)")
    p.add_argument("--compensation", default="refit",
                   choices=("refit", "refit+bn", "bn", "none", "refit+reconstruct", "reconstruct"),
                   help="refit: least-squares re-fit of every layer reading changed inputs (no training); "
                        "+reconstruct: then train the model to reproduce the base model's outputs on unlabelled "
                        "train images (--reconstruct-*; labels are never read); bn: re-estimate BatchNorm statistics")
    p.add_argument("--reconstruct-steps", type=positive_int, default=1200,
                   help="reconstruction: at most this many Adam steps (default 1200)")
    p.add_argument("--reconstruct-seconds", type=positive_float, default=300.0,
                   help="reconstruction: at most this many seconds (default 300; the cosine ends with whichever "
                        "budget ends first)")
    p.add_argument("--reconstruct-images", type=positive_int, default=None,
                   help="reconstruction: class-balanced train images used, cached in memory as float32 (their "
                        "labels are not read; default: the whole train split up to 50000 images, fewer if "
                        "their cache would pass 2 GiB)")
    p.add_argument("--reconstruct-lr", type=positive_float, default=1e-3,
                   help="reconstruction: Adam's peak learning rate, cosine to zero over the budget (default 1e-3)")
    p.add_argument("--reconstruct-bn", default="train", choices=("frozen", "train"),
                   help="BatchNorm while reconstructing: train (batch statistics, re-estimated afterwards; default) "
                        "or frozen (eval mode; the re-fit's statistics stay)")
    p.add_argument("--reconstruct-targets", default="logits", choices=("logits", "features", "both"),
                   help="reconstruction matches the base's logits (KL at T=4), its section outputs, or both")
    p.add_argument("--teacher", default="base", choices=("base", "none"),
                   help="fine-tuning distils from the base model's logits plus the label loss (default), or labels only")
    p.add_argument("--finetune-epochs", type=nonneg_int, default=0, help="SGD fine-tuning epochs (default 0)")
    p.add_argument("--finetune-steps", type=positive_int, default=None,
                   help="with --finetune-epochs: stop each epoch after this many SGD steps (a fraction of an "
                        "epoch on a slow CPU)")
    p.add_argument("--head-only", action="store_true",
                   help="no fine-tuning of conv weights: only the classifier head is trained (--head-epochs)")
    p.add_argument("--head-epochs", type=nonneg_int, default=5, help="epochs of head training (default 5)")
    p.add_argument("--lr", type=positive_float, default=0.01, help="learning rate of fine-tuning (default 0.01)")
    p.add_argument("--bf16", action="store_true", help="fine-tune with bfloat16 autocast (AMX/AVX512-BF16 CPUs)")
    p.add_argument("--export", nargs="*", default=[], choices=("torchscript", "onnx"),
                   help="also write model.ts (TorchScript) and/or model.onnx (opset 17, dynamic batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples, ranking and fine-tuning (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="fine-tuning and reconstruction batch size (default 128)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch and Numba threads for everything, latency timing included (default: all cores)")
    add_device_arg(p, "feature collection, compensation, reconstruction, head training, fine-tuning and "
                      "evaluation")
    p.add_argument("--out", default="runs/compress", help="output folder (default runs/compress)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_quant_args(p)
    return p


DEFAULT_SI_SAMPLES = 2000


def _check_options(args) -> None:
    """Option combinations argparse cannot check; all before any file is read."""
    if not (0 < args.target_macs <= 1):
        raise CLIError(f"--target-macs is the fraction of MACs to keep, in (0, 1]; got {args.target_macs}")
    if args.target_params is not None and not (0 < args.target_params <= 1):
        raise CLIError(f"--target-params is the fraction of parameters to keep, in (0, 1]; got {args.target_params}")
    if args.target_params is not None and args.delta is not None:
        raise CLIError("--target-params is a budget and --delta is threshold mode (no budget); use one of them")
    if args.delta is not None and not (0 <= args.delta < 1):
        raise CLIError(f"--delta is the SI fraction a layer may lose, in [0, 1); got {args.delta}")
    if any(b < 1 for b in args.latency_batch):
        raise CLIError(f"--latency-batch takes batch sizes >= 1; got {' '.join(map(str, args.latency_batch))}")
    if args.latency_batch != [128] and args.objective == "macs":
        raise CLIError("--latency-batch sets the batch sizes sections are timed at, but --objective macs times "
                       "nothing; use --objective latency or both")
    if not (0 <= args.truncate_tol < 1):
        raise CLIError(f"--truncate-tol is an absolute SI tolerance in [0, 1); got {args.truncate_tol}")
    if args.si_samples is not None and args.si_samples < 20:
        raise CLIError(f"--si-samples must be >= 20; got {args.si_samples}")
    if args.finetune_steps is not None and not args.finetune_epochs:
        raise CLIError(f"--finetune-steps {args.finetune_steps} caps the steps of each fine-tuning epoch but no "
                       "epoch runs; add --finetune-epochs 1")
    if args.head_only and args.finetune_epochs:
        raise CLIError("--head-only trains the classifier only (--head-epochs); drop --finetune-epochs or --head-only")
    args.device = check_device(args)
    if args.quant or args.sparsity:  # quantization options are checked before any expensive step
        from ._quant import check_quant_args

        try:
            check_quant_args(args)
        except ValueError as exc:
            raise CLIError(str(exc)) from None


def _body(argv) -> int:
    args = build_parser().parse_args(argv)
    _check_options(args)
    from .._io import OutputFolder

    folder = OutputFolder(args.out, produced=OUTPUTS)   # a file or unwritable --out fails before any work
    with folder, torch_threads(args.threads):
        report = _run(args, folder)
    stale = folder.commit()
    report.append(f"wrote {folder.path}/" + (f" (removed {', '.join(stale)} of an earlier run)" if stale else ""))
    print("\n".join(report))
    return 0


def _run(args, folder) -> list[str]:
    """Plan, compress, measure and write into ``folder.staging``; returns the lines to print."""
    import argparse

    import torch

    from .. import plots
    from .._io import save_figure, write_json, write_text
    from ..compress import (cifar_augment, evaluate, export_onnx, export_torchscript, preload, save_compressed)
    from ..compress.reconstruct import image_budget
    from ..data import balanced_indices, load_dataset
    from ..latency import speedup_table
    from ..models import load_model
    from ..pipeline import (CompressConfig, check_plan_base, config_dict, count_tp, execute,
                            reconstruction_loader, si_plan)
    from ..plan import CompressionPlan
    from ._common import parse_arch_kwargs, parse_normalize

    torch.manual_seed(args.seed)
    progress = Progress(enabled=not args.quiet)
    stage = folder.staging
    plan = None
    if args.plan:   # read and checked before any model or data: a bad plan fails at once
        try:
            text = Path(args.plan).read_text()
        except FileNotFoundError:
            raise CLIError(f"plan file {args.plan} does not exist") from None
        plan = CompressionPlan.from_json(text)

    loaded = load_model(args.model, arch=args.arch, num_classes=args.num_classes, trust_model=args.trust_model,
                        arch_kwargs=parse_arch_kwargs(getattr(args, "arch_kwargs", None)))
    model = loaded.model
    norm = parse_normalize(args.normalize)
    # SI is measured on train images and accuracy on test images: one folder for both would score
    # the model on the images it was planned on.
    train = load_dataset(args.data, split="train", root=args.data_root, download=args.download, normalize=norm,
                         require_splits=True)
    test = load_dataset(args.data, split="test", root=args.data_root, download=args.download, normalize=norm,
                        require_splits=True)
    if train.num_classes != loaded.num_classes:
        raise CLIError(f"the data has {train.num_classes} classes but the model outputs {loaded.num_classes}; "
                       "pick the matching --data or checkpoint")
    if plan is not None and plan.arch != loaded.arch:
        raise CLIError(f"the plan is for {plan.arch} but the model is {loaded.arch}; use the plan made for it")
    for opt, n, ds in (("--si-samples", args.si_samples, train), ("--eval-samples", args.eval_samples, test)):
        if n and n > len(ds):
            raise CLIError(f"{opt} {n} exceeds the {len(ds)} images of {ds.description}; lower {opt}")
    # reconstruction's cache: the requested images, else all (up to 50,000) that fit in 2 GiB, at least two of
    # each class (a class-balanced sample needs them)
    n_recon = None
    if "reconstruct" in args.compensation:
        if args.reconstruct_images:
            n_recon = min(args.reconstruct_images, len(train))
        else:
            x_first = torch.as_tensor(train.dataset[0][0])
            n_recon = min(len(train), max(2 * train.num_classes, image_budget(
                len(train), tuple(x_first.shape), itemsize=x_first.element_size())))
    config = CompressConfig(target_macs=None if args.delta is not None else args.target_macs,
                            target_params=args.target_params,
                            delta=args.delta if args.delta is not None else 0.02, ranking=args.ranking,
                            allow_drop=not args.no_drop, streams=args.streams, round_to=args.round_to,
                            objective=args.objective, latency_batches=tuple(args.latency_batch),
                            compensation=args.compensation, finetune_epochs=args.finetune_epochs,
                            finetune_steps=args.finetune_steps,
                            head_only=args.head_only, head_epochs=args.head_epochs, lr=args.lr,
                            batch_size=args.batch_size, bf16=args.bf16, seed=args.seed,
                            truncate=not args.no_truncate, truncate_tol=args.truncate_tol,
                            truncate_below_budget=args.truncate_below_budget,
                            reconstruct_steps=args.reconstruct_steps, reconstruct_seconds=args.reconstruct_seconds,
                            reconstruct_images=n_recon, reconstruct_targets=args.reconstruct_targets,
                            reconstruct_bn=args.reconstruct_bn, reconstruct_lr=args.reconstruct_lr,
                            teacher=args.teacher, device=str(args.device))
    n_si = args.si_samples or min(DEFAULT_SI_SAMPLES, len(train))
    si_idx = balanced_indices(train.labels, n_si, seed=args.seed)
    sample = preload(train.dataset, si_idx)
    DL = torch.utils.data.DataLoader
    sample_loader = DL(sample, batch_size=256)
    test_idx = None if not args.eval_samples or args.eval_samples == len(test) else \
        balanced_indices(test.labels, args.eval_samples, seed=args.seed)
    test_loader = DL(preload(test.dataset, test_idx), batch_size=500)
    x0 = sample[0][0][None]
    if plan is not None:
        check_plan_base(plan, model, x0)
    from .._device import describe_device
    from ..structure import describe

    # What the adapter finds (and what it cannot handle) is known before any expensive step.
    structure = describe(model, x0)
    train_loader = None
    if args.finetune_epochs or args.head_only or getattr(args, "qat_epochs", 0) or getattr(args, "sparsity_epochs", 0):
        train_loader = DL(preload(train.dataset), batch_size=args.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(args.seed))

    if plan is None:
        plan, _ = si_plan(model, sample_loader, arch=loaded.arch, num_classes=loaded.num_classes, example_input=x0,
                          config=config, progress=progress)
        if plan.settings.get("budget_unmet"):
            print(f"{PROG}: warning: {plan.settings['budget_unmet'].replace('round_to', '--round-to')}",
                  file=sys.stderr)
    augment = cifar_augment if tuple(x0.shape[-2:]) == (32, 32) else None
    step = progress.step
    step("evaluate base")
    base_acc = evaluate(model, test_loader, device=args.device)
    recon_loader = None
    if "reconstruct" in args.compensation:
        recon_loader = reconstruction_loader(train, n_recon, train_loader=train_loader, batch_size=args.batch_size,
                                             seed=args.seed + 1)
    compressed, m = execute(model, plan, example_input=x0, calib_loader=sample_loader, test_loader=test_loader,
                            train_loader=train_loader, config=config, augment=augment, recon_loader=recon_loader,
                            stage=step,
                            progress=lambda r: _record_progress(progress, r, args.finetune_epochs))
    base_macs, base_params = count_tp(model, x0)
    if args.plan:
        # An applied (possibly edited) plan predicts what was measured, in the one count of metrics.json.
        plan = _with_predicted(plan, dict(plan.predicted, base_macs=int(base_macs), macs=int(m["macs"]),
                                          base_params=int(base_params), params=int(m["params"]),
                                          counter="torch_pruning.utils.count_ops_and_params"))
    shape = tuple(x0.shape[1:])
    step("time base vs compressed (batch 1 and 128)")
    lat = speedup_table(model, compressed, shape, threads=args.threads)
    ft = m.get("finetune_history") or []
    ft_steps = sum(int(r.get("steps", 0)) for r in ft)
    metrics = dict(
        model=str(Path(args.model).resolve()), arch=loaded.arch,
        data=dict(si=train.description, accuracy=test.description), si_samples=int(si_idx.size),
        eval_samples=len(test_loader.dataset), base=dict(macs=base_macs, params=base_params, acc=base_acc),
        compressed=dict(macs=m["macs"], params=m["params"]), macs_reduction=1 - m["macs"] / base_macs,
        params_reduction=1 - m["params"] / base_params,
        accuracy=dict(base=base_acc, pruned=m["acc_pruned"], compensated=m["acc_compensated"],
                      head=m.get("acc_head"), finetuned=m.get("acc_finetuned")),
        latency=lat, threads=torch.get_num_threads(), config=config_dict(config),
        device=m["device"], device_name=describe_device(m["device"]),
        seconds={k: v for k, v in m.items() if k.startswith("seconds")}, refit=m.get("refit"),
        finetune_history=m.get("finetune_history"), finetune_steps=ft_steps if ft else None,
        reconstruct=m.get("reconstruct"), finetune_teacher=m.get("finetune_teacher"),
        structure=dict(layers=list(structure.layers), sections=[b.name for b in structure.blocks],
                       groups=len(structure.convs), left_whole=[dict(root=g.conv, channels=g.out_channels,
                                                                     reason=g.reason) for g in structure.skipped],
                       notes=list(structure.notes)),
    )
    if args.quant:
        from ._quant import apply_quant

        # The quantization step writes its files too: into the staging folder with the rest.
        qargs = argparse.Namespace(**{**vars(args), "out": str(stage)})
        metrics["quant"] = q = apply_quant(qargs, compressed, sample_loader, train_loader, test_loader)
        for key in ("packed_path", "int8_onnx_path", "codes_path", "codes_onnx_path"):
            if q.get(key):   # written to the staging folder: name the file where it ends up
                q[key] = str(folder.path / Path(q[key]).name)
    write_text(stage / "plan.json", plan.to_json())
    save_compressed(stage / "model.pt", compressed, plan, arch=_rebuildable_arch(loaded),
                    num_classes=loaded.num_classes, base=model, input_shape=shape, arch_kwargs=loaded.arch_kwargs,
                    prior=_prior(loaded))
    write_json(stage / "metrics.json", metrics)
    fig, _ = plots.kept_filters_figure(plan, model_name=Path(args.model).name)
    save_figure(fig, stage / "kept_filters.png", dpi=130)
    if "torchscript" in args.export:
        export_torchscript(compressed, stage / "model.ts", x0)
    if "onnx" in args.export:
        export_onnx(compressed, stage / "model.onnx", x0)

    lines = [f"model: {len(structure.layers)} layers recorded, {len(structure.blocks)} removable sections, "
             f"{len(structure.convs)} channel groups planned, {len(structure.skipped)} left whole"
             + (f" (e.g. {structure.skipped[0].conv}: {structure.skipped[0].reason})" if structure.skipped else "")]
    lines += [f"note: {note}" for note in structure.notes]
    lines.append(plan.summary())
    acc = metrics["accuracy"]
    steps = [f"base {100 * acc['base']:.2f}%", f"pruned {100 * acc['pruned']:.2f}%",
             f"compensated ({args.compensation}) {100 * acc['compensated']:.2f}%"]
    if acc["head"] is not None:
        steps.append(f"head-trained {100 * acc['head']:.2f}%")
    if acc["finetuned"] is not None:
        # what ran: whole epochs, or epochs cut short by --finetune-steps
        full = args.finetune_steps is None or all(r.get("steps", 0) < args.finetune_steps for r in ft)
        what = f"{len(ft)} ep" if full else f"{ft_steps} steps ({len(ft)} ep of <= {args.finetune_steps} steps)"
        steps.append(f"fine-tuned {what} {100 * acc['finetuned']:.2f}%")
    lines.append(f"accuracy on {metrics['eval_samples']} test images: " + " -> ".join(steps))
    lines.append(f"device {metrics['device_name']}: SI features, compensation, training and evaluation ran there; "
                 "structure tracing, planning, MAC counts and latency on the CPU")
    lines.append(f"MACs {base_macs / 1e6:.2f} M -> {m['macs'] / 1e6:.2f} M ({100 * metrics['macs_reduction']:.1f}% "
                 f"fewer), params {base_params / 1e6:.3f} M -> {m['params'] / 1e6:.3f} M "
                 f"({100 * metrics['params_reduction']:.1f}% fewer)")
    q = metrics.get("quant")
    if q:
        qacc = q["accuracy"].get("quantized", q["accuracy"].get("pruned"))
        lines.append(f"{q['kind']}: {q['bits_per_weight']:.2f} bits/weight, {q['size_on_disk_bytes'] / 1024:.0f} KiB "
                     f"packed on disk ({100 * q['size_reduction']:.1f}% smaller than the compressed fp32 state dict), "
                     f"top-1 {100 * qacc:.2f}%" + (f", batch-128 speed-up vs compressed fp32 "
                                                  f"{q['latency']['batch128']['speedup']:.2f}x" if q.get("latency") else ""))
    lines.append(_latency_line(lat))
    return lines


def _record_progress(progress, record: dict, epochs: int) -> None:
    """Progress of execute()'s per-record callbacks: fine-tuning epochs, reconstruction steps."""
    if "epoch" in record:
        progress("fine-tune epochs", record["epoch"], epochs)
    elif "step" in record:
        progress(f"{record.get('stage', 'training')} steps", record["step"], record["steps"])


def _latency_line(lat: dict) -> str:
    """The speed-up line; a noisy measurement says so instead of printing a number to trust."""
    t = lat["batch1"]
    parts = []
    for b in ("batch1", "batch128"):
        r = lat[b]
        spread = max(r["base_spread"], r["compressed_spread"])
        parts.append(f"{b.replace('batch', 'batch ')} {r['speedup']:.2f}x (spread {100 * spread:.0f}%)")
    line = (f"CPU latency speed-up vs base ({t['threads']} threads, median of {t['repeats']} interleaved runs): "
            + ", ".join(parts))
    noisy = [b for b in ("batch1", "batch128") if lat[b]["noisy"]]
    if noisy:
        line += (f"; UNRELIABLE: the timings of {' and '.join(n.replace('batch', 'batch ') for n in noisy)} vary more "
                 "than the threshold even after a retry (a busy machine?); time again on a quiet machine")
    return line


def _with_predicted(plan, predicted: dict):
    from dataclasses import replace

    return replace(plan, predicted=predicted)


def _prior(loaded) -> dict | None:
    """The payload of a compressed input file (its plans are replayed when the new file is rebuilt)."""
    if loaded.key_style != "compressed":
        return None
    import torch

    return torch.load(loaded.path, map_location="cpu", weights_only=True)


def _rebuildable_arch(loaded) -> str:
    """The arch a compressed model is rebuilt from: the loaded one, or for a trusted full pickle of a
    class we cannot build by name, that class as ``package.module:Class`` (reloading then needs it
    importable and --arch)."""
    from ..models import available_archs

    if loaded.key_style != "pickled-module" or loaded.arch in available_archs() or loaded.arch.startswith("torchvision:"):
        return loaded.arch
    cls = type(loaded.model)
    return f"{cls.__module__}:{cls.__qualname__}"


def main(argv=None) -> int:
    return run_main(PROG, _body, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
