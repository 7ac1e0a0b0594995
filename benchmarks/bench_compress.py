"""SI compression of a CIFAR ResNet against fair baselines, through one executor.

For the JPEG-fine-tuned ResNet-56 in ../shared/models (default), on the JPEG splits:
  1. SI plan (the si-compress default): block SI gains + per-filter prefix-SI curves on a
     class-balanced train sample decide which blocks go and how many filters each layer keeps
     (multiples of 8; moves ranked per MAC and per measured CPU second saved), MACs budget
     (--target-macs, counted as torch-pruning counts them); inside a layer L1 picks the filters;
  2. ablations with the SI plan's widths and drops: single-filter-SI and random filter choice;
     baselines at the same MACs: uniform-ratio L1 pruning; torch-pruning's global magnitude pruner;
  3. each one: apply (torch-pruning), accuracy on the whole test split before compensation, after
     least-squares compensation (no training), and after --epochs of fine-tuning (SGD, cosine);
  4. CPU latency of each compressed model at batch 1 and 128, as a ratio to the base in this run.
Every method's final model is saved (si_compress format) to runs/compress/<out stem>/<method>.pt, and
the SI model also to runs/compress/si_<arch>.pt for bench_quant.
Writes benchmarks/results/compress_<arch>.json; --table prints the README table from it.

  python benchmarks/bench_compress.py --epochs 2 --bf16     # ~35 min on 2 quiet cores
  python benchmarks/bench_compress.py --table
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _harness import SHARED, machine_info, write_json_atomic  # noqa: E402

METHODS = ("si", "si-streams", "si-no-streams", "si-macs-only", "si-latency-b1", "si-latency-b1-b128",
           "si-ranked-same-widths", "random-same-widths", "uniform-l1", "tp-magnitude", "tp-magnitude-same-latency",
           "tp-group-norm", "tp-taylor", "tp-magnitude-local", "tp-group-norm-local", "tp-taylor-local")
# settings that may differ between the runs whose results --keep-results merges into one JSON
PER_RUN = ("methods", "finetune_methods", "no_latency", "keep_results", "latency_si_only", "latency_repeats")


def stem_of(model: str) -> str:
    return Path(model).name.split("-")[0]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def _plan_key(plan: dict):
    """What makes two SI plans the same model: each layer's kept filters, the dropped sections, the cut."""
    return ([(d["name"], list(d["keep"])) for d in plan["layers"]], list(plan["dropped_blocks"]),
            plan.get("truncate_after"))


def prior_results(args) -> dict | None:
    """With --keep-results: the earlier run in --out, checked to be the same experiment (every setting but
    the per-run ones of PER_RUN); its results for the methods not run now are kept."""
    import json

    if not args.keep_results:
        return None
    if not args.out.is_file():
        raise SystemExit(f"--keep-results: {args.out} does not exist; run without it first")
    prior = json.loads(args.out.read_text())
    now = {k: v for k, v in vars(args).items() if k != "out"}
    diff = sorted(k for k in set(now) | set(prior["settings"]) if k not in PER_RUN
                  and now.get(k) != prior["settings"].get(k))
    if diff:
        raise SystemExit(f"--keep-results: settings differ from the run in {args.out}: {', '.join(diff)}; "
                         f"use the same settings or another --out")
    return prior


def run(args, prior: dict | None = None) -> dict:
    import numpy as np
    import torch

    from si_compress.baselines import tp_magnitude_plan
    from si_compress.compress import apply_plan, cifar_augment, evaluate, preload, save_compressed
    from si_compress.data import balanced_indices, load_dataset
    from si_compress.models import load_model
    from si_compress.latency import speedup_table
    from si_compress.pipeline import CompressConfig, count_tp, execute, group_weight, reconstruction_loader, si_plan
    from si_compress.planning import plan_uniform, plan_with_widths, rank_filters

    torch.manual_seed(args.seed)
    ckpt = Path(args.model) if Path(args.model).is_file() else SHARED / "models" / args.model
    data = SHARED / "data" / "cifar10-jpeg"
    loaded = load_model(ckpt, arch=args.arch)
    base = loaded.model
    train = load_dataset(data, split="train")
    test = load_dataset(data, split="test")
    t0 = time.perf_counter()
    sample = preload(train.dataset, balanced_indices(train.labels, args.si_samples, seed=args.seed))
    test_ds = preload(test.dataset, None if not args.eval_samples else balanced_indices(test.labels, args.eval_samples))
    DL = torch.utils.data.DataLoader
    sample_loader = DL(sample, batch_size=250)
    test_loader = DL(test_ds, batch_size=500)
    train_loader = None
    if args.epochs:
        train_loader = DL(preload(train.dataset), batch_size=128, shuffle=True,
                          generator=torch.Generator().manual_seed(args.seed))
    log(f"data ready in {time.perf_counter() - t0:.0f} s")
    x0 = sample[0][0][None]
    cfg = CompressConfig(target_macs=args.target_macs, target_params=args.target_params, ranking=args.ranking,
                         objective=args.objective, latency_batches=tuple(args.latency_batches),
                         round_to=args.round_to, compensation=args.compensation,
                         finetune_epochs=args.epochs, finetune_steps=args.max_steps, bf16=args.bf16, lr=args.lr,
                         seed=args.seed, reconstruct_steps=args.reconstruct_steps,
                         reconstruct_seconds=args.reconstruct_seconds, reconstruct_images=args.reconstruct_images,
                         teacher=args.teacher, reconstruct_bn=args.reconstruct_bn, reconstruct_lr=args.reconstruct_lr)
    # reconstruction reads unlabelled train images (a class-balanced sample; by default all 50,000)
    recon_loader = reconstruction_loader(train, min(args.reconstruct_images, len(train.labels)),
                                         train_loader=train_loader, seed=args.seed + 1) \
        if "reconstruct" in args.compensation else None
    base_macs, base_params = count_tp(base, x0)
    base_acc = evaluate(base, test_loader)
    log(f"base: {base_acc:.4f} acc, {base_macs / 1e6:.2f} M MACs")
    payload["base"] = dict(acc=base_acc, macs=base_macs, params=base_params)
    rec = ckpt.parent / "record.json"   # a model trained by train_cifar.py: how it was trained
    if rec.is_file():
        r = json.loads(rec.read_text())
        payload["train_record"] = {k: r.get(k) for k in ("recipe", "epochs_done", "test_acc", "seconds", "device",
                                                         "bf16")}
    payload["eval_samples"] = len(test_ds)

    t0 = time.perf_counter()
    plan, ev = si_plan(base, sample_loader, arch=loaded.arch, num_classes=loaded.num_classes, example_input=x0,
                       config=cfg)
    plan_s = time.perf_counter() - t0
    log(f"SI plan in {plan_s:.0f} s:\n{plan.summary()}")
    payload["plan"] = plan.to_dict()
    payload["plan_seconds"] = plan_s
    if prior is not None and _plan_key(prior["plan"]) != _plan_key(payload["plan"]):
        raise SystemExit(f"--keep-results: this run's SI plan differs from the one in {args.out} (its baselines "
                         f"matched other MACs); run every method again without --keep-results")
    st = ev.structure

    def per_group(rank):  # one ranking per channel group, found under every writer of a stream
        out = {}
        for i, u in enumerate(st.convs):
            out[u.conv] = rank(i, u)
            for c in u.coupled:
                out[c] = out[u.conv]
        return out

    l1 = per_group(lambda i, u: rank_filters("l1", weight=group_weight(base, u), curve=False))
    from si_compress.structure import collect_filter_groups

    plans = {"si": plan}
    from dataclasses import replace as _replace

    for variant, on in (("si-streams", True), ("si-no-streams", False)):   # ablations: residual streams on / off
        if variant in args.methods:
            plans[variant], _ = si_plan(base, sample_loader, arch=loaded.arch, num_classes=loaded.num_classes,
                                        example_input=x0, config=_replace(cfg, streams=on))
    if "si-macs-only" in args.methods:   # ablation: the SI plan without the parameter budget
        plans["si-macs-only"], _ = si_plan(base, sample_loader, arch=loaded.arch, num_classes=loaded.num_classes,
                                           example_input=x0, config=_replace(cfg, target_params=None))
    # ablations: the planner's moves priced by the time measured at batch 1 only, or at batches 1 and 128 alike
    for variant, batches in (("si-latency-b1", (1,)), ("si-latency-b1-b128", (1, 128))):
        if variant in args.methods:
            plans[variant], _ = si_plan(base, sample_loader, arch=loaded.arch, num_classes=loaded.num_classes,
                                        example_input=x0,
                                        config=_replace(cfg, objective="latency", latency_batches=batches))
    si_tp_macs = count_tp(apply_plan(base, plan, example_input=x0), x0)[0]
    ratio = si_tp_macs / base_macs
    if "si-ranked-same-widths" in args.methods:   # each baseline is built only when it is run
        groups, glabels = collect_filter_groups(base, sample_loader, [u.activation for u in st.convs], grid=cfg.grid)
        sir = per_group(lambda i, u: rank_filters("si", G=groups[u.activation], y=glabels, curve=False))
        del groups
        plans["si-ranked-same-widths"] = plan_with_widths(plan, sir)
    if "random-same-widths" in args.methods:
        rnd = per_group(lambda i, u: rank_filters("random", weight=group_weight(base, u), seed=args.seed + i,
                                                  curve=False))
        plans["random-same-widths"] = plan_with_widths(plan, rnd)
    if "uniform-l1" in args.methods:
        # uniform L1 and torch-pruning's pruner: the same torch-pruning MAC count as the SI plan
        lo_t, hi_t = 0.05, 1.0
        for _ in range(30):
            mid = (lo_t + hi_t) / 2
            u = plan_uniform(arch=loaded.arch, num_classes=loaded.num_classes, structure=st, rankings=l1,
                             target_macs=mid)
            got = count_tp(apply_plan(base, u, example_input=x0), x0)[0]
            lo_t, hi_t = (mid, hi_t) if got <= si_tp_macs else (lo_t, mid)
        plans["uniform-l1"] = plan_uniform(arch=loaded.arch, num_classes=loaded.num_classes, structure=st,
                                           rankings=l1, target_macs=lo_t)
    for imp in ("magnitude", "group-norm", "taylor"):
        for name, global_pruning in ((f"tp-{imp}", True), (f"tp-{imp}-local", False)):
            if name in args.methods:
                t0 = time.perf_counter()
                plans[name] = tp_magnitude_plan(base, st, example_input=x0, target_macs=ratio, arch=loaded.arch,
                                                num_classes=loaded.num_classes, importance=imp,
                                                loader=sample_loader, global_pruning=global_pruning)
                log(f"{name} plan in {time.perf_counter() - t0:.0f} s")
    if "tp-magnitude-same-latency" in args.methods:
        plans["tp-magnitude-same-latency"] = same_latency_tp_plan(base, st, plan, x0, loaded, sample_loader, payload)
    results = dict(prior["results"]) if prior is not None else {}
    if prior is not None and "latency_run" in prior:
        # those were timed together in one --latency-only run that this run's models were not part of
        for r in results.values():
            r.pop("latency", None)
        log("--keep-results: the earlier methods' joint timing is dropped; run --latency-only again")
    from dataclasses import replace

    for name in args.methods:
        t0 = time.perf_counter()
        run_cfg = cfg if name in args.finetune_methods else replace(cfg, finetune_epochs=0)
        model, m = execute(base, plans[name], example_input=x0, calib_loader=sample_loader, test_loader=test_loader,
                           train_loader=train_loader, config=run_cfg, augment=cifar_augment, recon_loader=recon_loader,
                           progress=lambda h, n=name: log(f"  {n} epoch {h.get('epoch')}: {h}"))
        m.pop("refit", None)
        m["widths"] = {d.name: len(d.keep) for d in plans[name].layers}
        m["dropped_blocks"] = list(plans[name].dropped_blocks)
        m["macs_reduction"] = 1 - m["macs"] / base_macs
        m["params_reduction"] = 1 - m["params"] / base_params
        m["seconds_total"] = time.perf_counter() - t0
        # every method's model, per run (a later fine-tuning comparison starts from these without
        # redoing the reconstruction); the SI model also where bench_quant reads it
        save_path = ROOT / "runs" / "compress" / Path(args.out).stem / f"{name}.pt"
        save_compressed(save_path, model, plans[name], arch=loaded.arch, num_classes=loaded.num_classes, base=base)
        m["saved_model"] = str(save_path.relative_to(ROOT))
        if name == "si":
            save_compressed(ROOT / "runs" / "compress" / f"si_{stem_of(args.model)}.pt", model, plans[name],
                            arch=loaded.arch, num_classes=loaded.num_classes, base=base)
        if not args.no_latency and (name == "si" or not args.latency_si_only):
            m["latency"] = speedup_table(base, model, tuple(x0.shape[1:]), repeats=args.latency_repeats)
        results[name] = m
        log(f"{name}: MACs -{100 * m['macs_reduction']:.1f}%, acc pruned {m['acc_pruned']:.4f}, "
            f"compensated {m['acc_compensated']:.4f}, finetuned {m.get('acc_finetuned')}")
        payload["results"] = results
        write_json_atomic(args.out, payload)
    return results


def same_latency_tp_plan(base, structure, si_plan_, x0, loaded, sample_loader, payload, *, batch=128, steps=7):
    """torch-pruning's magnitude plan as fast as the SI model: bisection on its MACs target until its
    measured latency at ``batch`` matches the SI model's (each step times both together, interleaved;
    the largest target found not slower is kept). The trace goes to ``payload["same_latency"]``."""
    from si_compress.baselines import tp_magnitude_plan
    from si_compress.compress import apply_plan
    from si_compress.latency import compare_models

    si_model = apply_plan(base, si_plan_, example_input=x0)
    lo, hi, trace = 0.05, 1.0, []

    def tp_at(t):
        return tp_magnitude_plan(base, structure, example_input=x0, target_macs=t, arch=loaded.arch,
                                 num_classes=loaded.num_classes, importance="magnitude", loader=sample_loader)
    for _ in range(steps):
        mid = (lo + hi) / 2
        cand = apply_plan(base, tp_at(mid), example_input=x0)
        t = compare_models({"si": si_model, "tp": cand}, batch, tuple(x0.shape[1:]), repeats=5)
        ratio = t["models"]["tp"]["median_s"] / t["models"]["si"]["median_s"]
        trace.append(dict(target_macs=mid, latency_ratio_to_si=ratio, noisy=t["noisy"]))
        log(f"same latency: tp-magnitude at {mid:.3f} x MACs takes {ratio:.3f} x the SI model's time (batch {batch})")
        lo, hi = (lo, mid) if ratio > 1 else (mid, hi)
    payload["same_latency"] = dict(batch=batch, target_macs=lo, trace=trace)
    return tp_at(lo)


def rebuilt_plan(base, structure, result: dict, arch: str, num_classes: int):
    """A plan giving the architecture a method produced (its recorded widths and dropped blocks; the
    first filters kept): latency depends on shapes, not on which filters survived."""
    from si_compress.plan import CompressionPlan, LayerDecision

    gone = {n for b in structure.blocks if b.name in result.get("dropped_blocks", []) for n in b.branch}
    writers = {}
    for u in structure.convs:
        for n in (u.conv, *u.coupled):
            writers[n] = (u, [w for w in (u.conv, *u.coupled) if w not in gone and w != n])
    layers = []
    for name, w in result["widths"].items():
        u, others = writers[name]
        layers.append(LayerDecision(name=name, out_channels=u.out_channels, keep=tuple(range(w)),
                                    coupled=tuple(others) if u.coupled else ()))
    return CompressionPlan(arch=arch, num_classes=num_classes, layers=tuple(layers),
                           dropped_blocks=tuple(result.get("dropped_blocks", [])))


def rebuilt_models(d: dict, methods=None) -> dict:
    """name -> nn.Module: the base model of a bench_compress JSON ("base") and each method's model
    rebuilt from its recorded widths (``methods``: those only; default all), each checked against its
    recorded MACs."""
    import torch

    from si_compress.compress import apply_plan
    from si_compress.models import load_model
    from si_compress.pipeline import count_tp
    from si_compress.structure import describe

    st = d["settings"]
    ckpt = Path(st["model"]) if Path(st["model"]).is_file() else SHARED / "models" / st["model"]
    loaded = load_model(ckpt, arch=st.get("arch"))
    base = loaded.model.eval()
    x0 = torch.zeros(1, 3, 32, 32)
    structure = describe(base, x0)
    models = {"base": base}
    for name, m in d["results"].items():
        if methods is not None and name not in methods:
            continue
        models[name] = apply_plan(base, rebuilt_plan(base, structure, m, loaded.arch, loaded.num_classes),
                                  example_input=x0)
        got = count_tp(models[name], x0)[0]
        if got != m["macs"]:
            raise SystemExit(f"{name}: the rebuilt model has {got} MACs, the run recorded {m['macs']}")
    return models


def latency_only(args) -> dict:
    """Time every method of ``args.out`` and the base together (interleaved rounds, one run): the models
    are rebuilt from the recorded widths, so timing can wait for a quiet machine."""
    import json

    from si_compress.latency import compare_models

    d = json.loads(args.out.read_text())
    models = rebuilt_models(d)
    for b in (1, 128):
        t = compare_models(models, b, (3, 32, 32), repeats=args.latency_repeats)
        tb = t["models"]["base"]
        log(f"batch {b}: " + ", ".join(f"{k} {1e3 * v['median_s']:.1f} ms" for k, v in t["models"].items())
            + (" (NOISY)" if t["noisy"] else ""))
        for name, m in d["results"].items():
            tc = t["models"][name]
            m.setdefault("latency", {})[f"batch{b}"] = dict(
                base_s=tb["median_s"], compressed_s=tc["median_s"], speedup=tb["median_s"] / tc["median_s"],
                base_spread=tb["spread"], compressed_spread=tc["spread"], noisy=t["noisy"], retried=t["retried"],
                repeats=t["repeats"], threads=t["threads"], timed_together=list(models))
    d["latency_run"] = dict(machine=machine_info(), repeats=args.latency_repeats, together=True)
    write_json_atomic(args.out, d)
    return d


def fine_tuning(d: dict) -> dict:
    """The fine-tuning a run's accuracies went through: its settings' epochs, max_steps and lr, or
    0 epochs (no steps, no lr) when no method of the run was fine-tuned (``--epochs`` is then unused)."""
    s = d["settings"]
    if not any(m.get("acc_finetuned") is not None for m in d["results"].values()):
        return {"epochs": 0, "max_steps": None, "lr": None}
    return {"epochs": s["epochs"], "max_steps": s.get("max_steps"), "lr": s["lr"]}


def table(path: Path) -> str:
    import json

    d = json.loads(path.read_text())
    r = d["results"]
    b = d["base"]
    from report import finetune_budget

    f = fine_tuning(d)
    ft = finetune_budget(f)[1]
    ft += f", SGD cosine, lr {f['lr']}" if ft != "none" else ""
    lines = [f"Base {d['settings']['model']}: {100 * b['acc']:.2f}% top-1 on {d['eval_samples']} test JPEGs, "
             f"{b['macs'] / 1e6:.1f} M MACs, {b['params'] / 1e6:.3f} M params. "
             f"Compensation: {d['settings']['compensation']}; fine-tuning: {ft}."
             + (f" SI budget: {d['settings']['target_macs']:.3g} x MACs and {d['settings']['target_params']:.3g} x "
                "params" + (" (the baselines match the SI plan's MACs)." if any(not k.startswith("si") for k in r)
                            else ".") if d["settings"].get("target_params") else ""), "",
             "| method | MACs | params | blocks dropped | top-1 pruned | after compensation (no training) "
             "| after fine-tuning | CPU speed-up b1 / b128 |",
             "|---|---|---|---:|---|---|---|---|"]
    recon = any("acc_refit" in m for m in r.values())
    if recon:   # the re-fit alone, then the label-free reconstruction (what it used)
        rc = next(m["reconstruct"] for m in r.values() if "reconstruct" in m)
        lines[0] += (f" Reconstruction: {rc['steps']} Adam steps on {rc['images']:,} unlabelled train images "
                     f"(targets: {rc['targets']}, lr {rc.get('lr', 1e-3):g}), "
                     + ("BatchNorm frozen." if rc.get("bn") == "frozen" else "then BN re-estimated."))
        lines[2] = lines[2].replace("after compensation (no training)", "after re-fit (no training) | after reconstruction (no labels)")
        lines[3] = lines[3] + "---|"
    for name, m in r.items():
        ft = "" if m.get("acc_finetuned") is None else f"{100 * m['acc_finetuned']:.2f}%"
        lat = m.get("latency")
        sp = " / ".join(f"{lat[k]['speedup']:.2f}x" + (" (noisy)" if lat[k].get("noisy") else "")
                        for k in ("batch1", "batch128")) if lat else ""
        lines.append(f"| {name} | -{100 * m['macs_reduction']:.1f}% | -{100 * m['params_reduction']:.1f}% | "
                     f"{len(m.get('dropped_blocks', []))} | {100 * m['acc_pruned']:.2f}% | "
                     + (f"{100 * m['acc_refit']:.2f}% | " if recon else "")
                     + f"{100 * m['acc_compensated']:.2f}% | {ft} | {sp} |")
    if d.get("latency_run"):
        lr = d["latency_run"]
        threads = next((m["latency"]["batch1"].get("threads") for m in r.values() if m.get("latency")), "?")
        lines += ["", f"Speed-up: base latency / method latency (medians), eager PyTorch on the CPU, {threads} "
                      f"threads; the base and every method timed in turn in the same {lr['repeats']} rounds "
                      "(`--latency-only`, one run); (noisy): interquartile spread above 10%."]
    elif any("base_spread" in m.get("latency", {}).get("batch1", {}) for m in r.values()):   # the interleaved harness
        lines += ["", f"Speed-up: base latency / compressed latency (medians), eager PyTorch on the CPU, "
                      f"{d['machine'].get('torch_threads', '?')} threads; each method timed with the base, in turn in "
                      f"the same {d['settings'].get('latency_repeats', 7)} rounds, right after it was built; "
                      "(noisy): interquartile spread above 10%."]
    elif any(m.get("latency") for m in r.values()):   # an older JSON: one model after the other, no spread kept
        lines += ["", f"Speed-up: base latency / compressed latency, eager PyTorch on the CPU, "
                      f"{d['machine'].get('torch_threads', '?')} threads, median of "
                      f"{d['settings'].get('latency_repeats', 7)} runs, both models timed back to back in one run."]
    else:
        lines += ["", "Latency not timed in this run (`--no-latency`); `--latency-only` times it later."]
    if d.get("same_latency"):
        sl = d["same_latency"]
        last = sl["trace"][-1] if sl["trace"] else {}
        lines += ["", f"tp-magnitude-same-latency: torch-pruning's magnitude pruner with its MACs target bisected "
                      f"({len(sl['trace'])} steps, each timing it against the SI model at batch {sl['batch']}) to "
                      f"the largest target not slower than the SI model: {sl['target_macs']:.3f} x MACs (last step: "
                      f"{last.get('latency_ratio_to_si', float('nan')):.3f} x the SI model's time)."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56-cifar10-jpeg.th", help="a file in ../shared/models, or a path")
    p.add_argument("--arch", default=None, help="the model's arch when the file does not say (torchvision:resnet18)")
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--target-params", type=float, default=None,
                   help="SI methods: also keep at most this fraction of the parameters (the baselines match MACs)")
    p.add_argument("--ranking", default="l1")
    p.add_argument("--objective", default="both", choices=("macs", "latency", "both"))
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--latency-batches", type=int, nargs="+", default=[128],
                   help="objective latency/both: batch sizes the planner times sections at")
    p.add_argument("--compensation", default="refit")
    p.add_argument("--reconstruct-steps", type=int, default=1200)
    p.add_argument("--reconstruct-seconds", type=float, default=1800.0)
    p.add_argument("--reconstruct-images", type=int, default=50000)
    p.add_argument("--teacher", default="base", choices=("base", "none"))
    p.add_argument("--reconstruct-bn", default="train", choices=("frozen", "train"))
    p.add_argument("--reconstruct-lr", type=float, default=1e-3)
    p.add_argument("--no-latency", action="store_true", help="skip timing (accuracy-only runs on a busy machine)")
    p.add_argument("--si-samples", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop fine-tuning after this many SGD steps (batch 128; 391 steps = 1 epoch)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--finetune-methods", nargs="+", default=["si", "uniform-l1", "tp-magnitude"], choices=METHODS,
                   help="methods that are also fine-tuned (--epochs); the others stop after compensation")
    p.add_argument("--latency-si-only", action="store_true", help="time only the SI model (default: every method)")
    p.add_argument("--latency-repeats", type=int, default=7)
    p.add_argument("--latency-only", action="store_true",
                   help="time the methods already in --out together with the base (rebuilt from their widths) and stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep-results", action="store_true",
                   help="add this run's methods to the results already in --out (same settings and SI plan "
                        "required; a method run again replaces its earlier result)")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    stem = stem_of(args.model)
    args.out = args.out or HERE / "results" / f"compress_{stem}.json"
    if args.table:
        print(table(args.out))
        return 0
    if args.latency_only:
        latency_only(args)
        print(table(args.out))
        return 0
    import torch

    global payload
    prior = prior_results(args)   # checked before the expensive work
    payload = {"benchmark": "compress", "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "machine": {**machine_info(), "torch_threads": torch.get_num_threads()}}
    if prior is not None:
        kept = [k for k in prior["results"] if k not in args.methods]
        payload["settings"]["methods"] = kept + list(args.methods)
        payload["settings"]["finetune_methods"] = sorted(
            {m for m in prior["settings"]["finetune_methods"] if m in kept}
            | {m for m in args.finetune_methods if m in args.methods})
        payload["runs"] = prior.get("runs", [{"methods": list(prior["results"]), "seconds": prior.get("seconds"),
                                              "machine": prior.get("machine")}])
    run_start = time.perf_counter()
    from si_compress.compress import evaluate  # noqa: F401
    res = run(args, prior)
    payload["seconds"] = time.perf_counter() - run_start
    if prior is not None:
        payload["runs"].append({"methods": list(args.methods), "seconds": payload["seconds"],
                                "machine": payload["machine"]})
        payload["seconds"] = sum(r["seconds"] or 0 for r in payload["runs"])
    write_json_atomic(args.out, payload)
    print(table(args.out))
    return 0


payload: dict = {}

if __name__ == "__main__":
    sys.exit(main())
