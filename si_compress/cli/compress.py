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

from ._common import ArgumentParser, CLIError, Progress, add_model_args, run_main
from ._quant import add_quant_args

PROG = "si-compress"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Plan by Separation Index and prune a trained CNN: drop blocks "
                       "that add little separation, keep the filters that separate, compensate without training.")
    add_model_args(p)
    p.add_argument("--data", required=True, help="digits, cifar10, cifar100, or an ImageFolder with train/ and test/")
    p.add_argument("--data-root")
    p.add_argument("--download", action="store_true")
    p.add_argument("--normalize", default="auto")
    p.add_argument("--plan", help="apply this plan.json instead of planning")
    p.add_argument("--target-macs", type=float, default=0.5,
                   help="fraction of the base MACs to keep (default 0.5); 1 with --delta for threshold mode")
    p.add_argument("--delta", type=float, default=None,
                   help="threshold mode: keep the shortest filter prefix reaching (1-delta) x max SI (no budget)")
    p.add_argument("--ranking", default="l1", choices=("si", "si-greedy", "l1", "random"),
                   help="which filters a layer keeps (default l1: measured best after compensation); how many "
                        "filters per layer and which blocks go always come from the SI curves")
    p.add_argument("--objective", default="both", choices=("macs", "latency", "both"),
                   help="rank planner moves by SI lost per MAC saved, per measured CPU second saved, or per "
                        "the mean of both fractions (default both)")
    p.add_argument("--no-drop", action="store_true", help="never drop whole blocks")
    p.add_argument("--no-truncate", action="store_true",
                   help="plain chains (VGG-style): do not cut the network after its SI peak")
    p.add_argument("--truncate-below-budget", action="store_true",
                   help="plain chains: cut at the SI peak even when the cut alone keeps well under --target-macs "
                        "(default: such a cut is not applied, so the MACs land at the budget)")
    p.add_argument("--truncate-tol", type=float, default=0.01,
                   help="plain chains: cut after the first layer whose SI is within this of the max SI (default 0.01)")
    p.add_argument("--round-to", type=int, default=8,
                   help="kept filter counts in multiples of this (default 8, what fast CPU kernels need); "
                        "a layer never goes below it: the block is dropped instead")
    p.add_argument("--si-samples", type=int, default=2000, help="class-balanced train sample for SI (default 2000)")
    p.add_argument("--eval-samples", type=int, default=0, help="test images for accuracy (0 = the whole split)")
    p.add_argument("--compensation", default="refit",
                   choices=("refit", "refit+bn", "bn", "none", "refit+reconstruct", "reconstruct"),
                   help="refit: least-squares re-fit of every layer reading changed inputs (no training); "
                        "+reconstruct: then train the model to reproduce the base model's outputs on unlabelled "
                        "train images (--reconstruct-*; labels are never read); bn: re-estimate BatchNorm statistics")
    p.add_argument("--reconstruct-steps", type=int, default=600, help="reconstruction: at most this many Adam steps")
    p.add_argument("--reconstruct-seconds", type=float, default=300.0, help="reconstruction: at most this many seconds")
    p.add_argument("--reconstruct-images", type=int, default=5000,
                   help="reconstruction: class-balanced train images used (their labels are not read)")
    p.add_argument("--reconstruct-targets", default="logits", choices=("logits", "features", "both"),
                   help="reconstruction matches the base's logits (KL at T=4), its section outputs, or both")
    p.add_argument("--teacher", default="base", choices=("base", "none"),
                   help="fine-tuning distils from the base model's logits plus the label loss (default), or labels only")
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="stop fine-tuning after this many SGD steps (a fraction of an epoch on a slow CPU)")
    p.add_argument("--head-only", action="store_true",
                   help="no fine-tuning of conv weights: only the classifier head is trained (--head-epochs)")
    p.add_argument("--head-epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--bf16", action="store_true", help="fine-tune with bfloat16 autocast (AMX/AVX512-BF16 CPUs)")
    p.add_argument("--export", nargs="*", default=[], choices=("torchscript", "onnx"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="runs/compress")
    p.add_argument("--quiet", action="store_true")
    add_quant_args(p)
    return p


def _body(argv) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .. import plots
    from .._io import save_figure, write_json, write_text
    from ..compress import (cifar_augment, evaluate, export_onnx, export_torchscript, preload, save_compressed)
    from ..data import balanced_indices, load_dataset
    from ..models import load_model
    from ..pipeline import CompressConfig, config_dict, count_tp, execute, latency, si_plan
    from ..plan import CompressionPlan
    from ._common import parse_normalize

    if not (0 < args.target_macs <= 1):
        raise CLIError(f"--target-macs is the fraction of MACs to keep, in (0, 1]; got {args.target_macs}")
    if not (0 <= args.truncate_tol < 1):
        raise CLIError(f"--truncate-tol is an absolute SI tolerance in [0, 1); got {args.truncate_tol}")
    if args.si_samples < 20:
        raise CLIError(f"--si-samples must be >= 20; got {args.si_samples}")
    if args.quant or args.sparsity:  # quantization options are checked before any expensive step
        from ._quant import check_quant_args

        try:
            check_quant_args(args)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    torch.manual_seed(args.seed)
    progress = Progress(enabled=not args.quiet)
    from ._common import parse_arch_kwargs

    loaded = load_model(args.model, arch=args.arch, num_classes=args.num_classes, trust_model=args.trust_model,
                        arch_kwargs=parse_arch_kwargs(getattr(args, "arch_kwargs", None)))
    model = loaded.model
    norm = parse_normalize(args.normalize)
    train = load_dataset(args.data, split="train", root=args.data_root, download=args.download, normalize=norm)
    test = load_dataset(args.data, split="test", root=args.data_root, download=args.download, normalize=norm)
    if train.num_classes != loaded.num_classes:
        raise CLIError(f"the data has {train.num_classes} classes but the model outputs {loaded.num_classes}; "
                       "pick the matching --data or checkpoint")
    out = Path(args.out)
    config = CompressConfig(target_macs=None if args.delta is not None else args.target_macs,
                            delta=args.delta if args.delta is not None else 0.02, ranking=args.ranking,
                            allow_drop=not args.no_drop, round_to=args.round_to, objective=args.objective,
                            compensation=args.compensation, finetune_epochs=args.finetune_epochs,
                            finetune_steps=args.finetune_steps,
                            head_only=args.head_only, head_epochs=args.head_epochs, lr=args.lr,
                            batch_size=args.batch_size, bf16=args.bf16, seed=args.seed,
                            truncate=not args.no_truncate, truncate_tol=args.truncate_tol,
                            truncate_below_budget=args.truncate_below_budget,
                            reconstruct_steps=args.reconstruct_steps, reconstruct_seconds=args.reconstruct_seconds,
                            reconstruct_images=args.reconstruct_images, reconstruct_targets=args.reconstruct_targets,
                            teacher=args.teacher)
    si_idx = balanced_indices(train.labels, min(args.si_samples, len(train)), seed=args.seed)
    sample = preload(train.dataset, si_idx)
    DL = torch.utils.data.DataLoader
    sample_loader = DL(sample, batch_size=256)
    test_idx = None if not args.eval_samples or args.eval_samples >= len(test) else \
        balanced_indices(test.labels, args.eval_samples, seed=args.seed)
    test_loader = DL(preload(test.dataset, test_idx), batch_size=500)
    x0 = sample[0][0][None]
    from ..structure import describe

    # What the adapter finds (and what it cannot handle) is known before any expensive step.
    structure = describe(model, x0)
    train_loader = None
    if args.finetune_epochs or args.head_only or getattr(args, "qat_epochs", 0) or getattr(args, "sparsity_epochs", 0):
        train_loader = DL(preload(train.dataset), batch_size=args.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(args.seed))

    if args.plan:
        try:
            plan = CompressionPlan.from_json(Path(args.plan).read_text())
        except FileNotFoundError:
            raise CLIError(f"plan file {args.plan} does not exist") from None
        if plan.arch != loaded.arch:
            raise CLIError(f"the plan is for {plan.arch} but the model is {loaded.arch}; use the plan made for it")
    else:
        plan, _ = si_plan(model, sample_loader, arch=loaded.arch, num_classes=loaded.num_classes, example_input=x0,
                          config=config, progress=progress)
    augment = cifar_augment if tuple(x0.shape[-2:]) == (32, 32) else None
    base_acc = evaluate(model, test_loader)
    recon_loader = None
    if "reconstruct" in args.compensation:
        recon_idx = balanced_indices(train.labels, min(args.reconstruct_images, len(train)), seed=args.seed + 1)
        recon_loader = DL(preload(train.dataset, recon_idx), batch_size=args.batch_size, shuffle=False)
    compressed, m = execute(model, plan, example_input=x0, calib_loader=sample_loader, test_loader=test_loader,
                            train_loader=train_loader, config=config, augment=augment, recon_loader=recon_loader)
    base_macs, base_params = count_tp(model, x0)
    shape = tuple(x0.shape[1:])
    lat = {}
    for b in (1, 128):
        tb, tc = latency(model, b, shape), latency(compressed, b, shape)
        lat[f"batch{b}"] = {"base_s": tb, "compressed_s": tc, "speedup": tb / tc}
    metrics = dict(
        model=str(Path(args.model).resolve()), arch=loaded.arch, data=train.description, si_samples=int(si_idx.size),
        eval_samples=len(test_loader.dataset), base=dict(macs=base_macs, params=base_params, acc=base_acc),
        compressed=dict(macs=m["macs"], params=m["params"]), macs_reduction=1 - m["macs"] / base_macs,
        params_reduction=1 - m["params"] / base_params,
        accuracy=dict(base=base_acc, pruned=m["acc_pruned"], compensated=m["acc_compensated"],
                      head=m.get("acc_head"), finetuned=m.get("acc_finetuned")),
        latency=lat, threads=torch.get_num_threads(), config=config_dict(config),
        seconds={k: v for k, v in m.items() if k.startswith("seconds")}, refit=m.get("refit"),
        finetune_history=m.get("finetune_history"), reconstruct=m.get("reconstruct"),
        finetune_teacher=m.get("finetune_teacher"),
        structure=dict(layers=list(structure.layers), sections=[b.name for b in structure.blocks],
                       groups=len(structure.convs), left_whole=[dict(root=g.conv, channels=g.out_channels,
                                                                     reason=g.reason) for g in structure.skipped],
                       notes=list(structure.notes)),
    )
    if args.quant:
        from ._quant import apply_quant

        metrics["quant"] = apply_quant(args, compressed, sample_loader, train_loader, test_loader)
    write_text(out / "plan.json", plan.to_json())
    save_compressed(out / "model.pt", compressed, plan, arch=_rebuildable_arch(loaded), num_classes=loaded.num_classes,
                    base=model, input_shape=shape, arch_kwargs=loaded.arch_kwargs, prior=_prior(loaded))
    write_json(out / "metrics.json", metrics)
    fig, _ = plots.kept_filters_figure(plan)
    save_figure(fig, out / "kept_filters.png", dpi=130)
    if "torchscript" in args.export:
        export_torchscript(compressed, out / "model.ts", x0)
    if "onnx" in args.export:
        export_onnx(compressed, out / "model.onnx", x0)
    print(f"model: {len(structure.layers)} layers recorded, {len(structure.blocks)} removable sections, "
          f"{len(structure.convs)} channel groups planned, {len(structure.skipped)} left whole"
          + (f" (e.g. {structure.skipped[0].conv}: {structure.skipped[0].reason})" if structure.skipped else ""))
    for note in structure.notes:
        print(f"note: {note}")
    print(plan.summary())
    acc = metrics["accuracy"]
    steps = [f"base {100 * acc['base']:.2f}%", f"pruned {100 * acc['pruned']:.2f}%",
             f"compensated ({args.compensation}) {100 * acc['compensated']:.2f}%"]
    if acc["head"] is not None:
        steps.append(f"head-trained {100 * acc['head']:.2f}%")
    if acc["finetuned"] is not None:
        steps.append(f"fine-tuned {args.finetune_epochs} ep {100 * acc['finetuned']:.2f}%")
    print(f"accuracy on {metrics['eval_samples']} test images: " + " -> ".join(steps))
    print(f"MACs {base_macs / 1e6:.2f} M -> {m['macs'] / 1e6:.2f} M ({100 * metrics['macs_reduction']:.1f}% fewer), "
          f"params {base_params / 1e6:.3f} M -> {m['params'] / 1e6:.3f} M "
          f"({100 * metrics['params_reduction']:.1f}% fewer)")
    q = metrics.get("quant")
    if q:
        qacc = q["accuracy"].get("quantized", q["accuracy"].get("pruned"))
        print(f"{q['kind']}: {q['bits_per_weight']:.2f} bits/weight, {q['size_on_disk_bytes'] / 1024:.0f} KiB packed "
              f"on disk ({100 * q['size_reduction']:.1f}% smaller than the compressed fp32 state dict), top-1 "
              f"{100 * qacc:.2f}%" + (f", batch-128 speed-up vs compressed fp32 {q['latency']['batch128']['speedup']:.2f}x"
                                       if q.get("latency") else ""))
    print(f"CPU latency speed-up vs base (same run, {metrics['threads']} threads): batch 1 "
          f"{lat['batch1']['speedup']:.2f}x, batch 128 {lat['batch128']['speedup']:.2f}x; wrote {out}/")
    return 0


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
