"""si-analyze: per-layer SI / CSI of a trained model on labelled data, with report and plots.

    si-analyze model.th --data cifar10 [--arch resnet56] [--samples 5000] [--out DIR]
    si-analyze net.pt --data cifar10 --arch path/to/net.py:Net [--arch-kwargs '{"width": 32}']

Prints a per-layer table on stdout (progress on stderr) and writes, atomically, in DIR:
report.json (versioned), layers.csv, si_layers.png and si_per_class.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ._common import (
    ArgumentParser,
    CLIError,
    Progress,
    add_data_args,
    add_device_arg,
    add_model_args,
    check_device,
    load_model_and_data,
    positive_float,
    positive_int,
    run_main,
    torch_threads,
)

PROG = "si-analyze"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Which layers of a trained CNN separate the classes: "
                       "per-layer Separation Index (SI), centre SI, high-order and soft SI.")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--layers", nargs="+", help="module names or globs (default: stem, every block, pooled features)")
    p.add_argument("--max-dim", type=positive_int, default=4096,
                   help="maps with more values are average-pooled to at most this many (default 4096)")
    p.add_argument("--order", type=positive_int, default=3, help="order r of the high-order and soft SI (default 3)")
    p.add_argument("--reference-split", choices=("train", "test"),
                   help="also compute cross-SI of the analysed features against a sample of this split")
    p.add_argument("--backend", default="auto", choices=("auto", "numba", "faiss", "numpy"),
                   help="nearest-neighbour search (default auto: the fastest for the data; numpy is the "
                        "brute-force oracle)")
    p.add_argument("--memory-budget", type=positive_float, default=4.0,
                   help="GiB of features held at once; more layers take more passes (default 4)")
    p.add_argument("--threads", type=positive_int, help="torch and Numba threads (default: all cores)")
    add_device_arg(p, "the model's forward passes over the data (feature collection)")
    p.add_argument("--out", default="runs/analyze", help="output folder (default runs/analyze)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _body(argv) -> int:
    args = build_parser().parse_args(argv)
    from .._io import OutputFolder

    if args.order < 1:
        raise CLIError(f"--order must be >= 1; got {args.order}")
    if args.max_dim < 1:
        raise CLIError(f"--max-dim must be >= 1; got {args.max_dim}")
    if args.memory_budget <= 0:
        raise CLIError(f"--memory-budget must be > 0 GiB; got {args.memory_budget}")
    args.device = check_device(args)
    folder = OutputFolder(args.out)   # a file or unwritable folder fails here, before any work
    with folder, torch_threads(args.threads):
        _run(args, folder)
    folder.commit()
    return 0


def _run(args, folder) -> None:
    from .. import plots
    from .._io import save_figure, write_json, write_text
    from ..analysis import analyze, check_samples_per_class, format_table, layers_csv
    from ..data import balanced_indices, load_dataset, make_loader

    out, stage = folder.path, folder.staging
    loaded, info, loader, idx, x0 = load_model_and_data(args)
    labels = info.labels if idx is None else info.labels[idx]
    check_samples_per_class(labels, args.order, info.class_names)
    ref_loader = None
    if args.reference_split:
        ref = load_dataset(args.data, split=args.reference_split, root=args.data_root, download=args.download,
                           normalize=info.normalization if info.normalization is not None else "none")
        n_ref = min(labels.size, len(ref))
        ridx = None if n_ref == len(ref) else balanced_indices(ref.labels, n_ref, seed=args.seed + 1)
        ref_loader = make_loader(ref, ridx, batch_size=args.batch_size, num_workers=args.workers)

    progress = Progress(enabled=not args.quiet)
    report = analyze(
        loaded.model, loader, layers=args.layers, order=args.order, max_dim=args.max_dim, backend=args.backend,
        memory_budget_bytes=int(args.memory_budget * 2**30), reference_loader=ref_loader,
        class_names=info.class_names, example_input=x0, progress=progress, device=args.device,
        model_info=dict(path=str(Path(args.model).resolve()), name=Path(args.model).name, arch=loaded.arch,
                        num_classes=loaded.num_classes, key_style=loaded.key_style,
                        arch_kwargs=dict(loaded.arch_kwargs)),
        data_info=dict(name=info.name, split=info.split, description=info.description, seed=args.seed,
                       samples=int(labels.size), normalization=info.normalization,
                       reference_split=args.reference_split),
    )

    write_json(stage / "report.json", report.to_dict())
    write_text(stage / "layers.csv", layers_csv(report))
    fig, _ = plots.si_layers_figure(report)
    save_figure(fig, stage / "si_layers.png", dpi=130)
    fig2, _ = plots.si_per_class_figure(report)
    save_figure(fig2, stage / "si_per_class.png", dpi=130)

    acc = "" if report.accuracy is None else f", top-1 {100 * report.accuracy:.2f}%"
    print(f"model {report.model['name']} ({report.model['arch']}, {report.total_params / 1e6:.3f} M params, "
          f"{report.total_macs / 1e6:.1f} M MACs/image) on {info.description}: {report.n_samples} samples{acc}")
    print(format_table(report))
    best = max(report.layers, key=lambda r: r.si)
    print(f"\nhighest SI {best.si:.3f} at {best.name}; final-layer SI {report.layers[-1].si:.3f}, "
          f"CSI {report.layers[-1].csi:.3f}")
    from .._device import describe_device

    print(f"device {describe_device(args.device)}; time {report.seconds:.1f} s, peak RSS {report.peak_rss_mb:.0f} MB "
          f"(features {report.feature_mb:.0f} MB in {report.settings['passes']} pass(es)); wrote {out}/")


def main(argv=None) -> int:
    return run_main(PROG, _body, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
