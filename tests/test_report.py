"""benchmarks/report.py on small fake result JSONs: numbers in, verdicts computed, gaps stated."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_report", REPO / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _compress(si_ft=0.9349, l1_ft=0.9300):
    def m(macs, params, pruned, comp, ft=None):
        d = dict(macs_reduction=macs, params_reduction=params, acc_pruned=pruned, acc_compensated=comp,
                 dropped_blocks=[])
        if ft is not None:
            d["acc_finetuned"] = ft
        return d
    si = m(0.583, 0.578, 0.30, 0.90, si_ft)
    si["latency"] = {"batch1": {"speedup": 1.25}, "batch128": {"speedup": 1.5}}
    return {"settings": {"model": "resnet56-cifar10-jpeg.th", "target_macs": 0.417, "epochs": 3, "max_steps": None,
                         "lr": 0.01, "bf16": False, "seed": 0,
                         "methods": ["si", "random-same-widths", "uniform-l1", "tp-magnitude"]},
            "base": {"acc": 0.9352, "macs": 127_000_000, "params": 853_000}, "eval_samples": 10000,
            "results": {"si": si, "random-same-widths": m(0.583, 0.578, 0.11, 0.80),
                        "uniform-l1": m(0.583, 0.60, 0.2, 0.85, l1_ft)},
            "seconds": 100.0}


def _analyze():
    layers = [dict(name="layer1.0:input", si=0.30, csi=0.35, high_order_si=0.10, soft_si=0.28, dim=64,
                   reduction="none", macs=1_000_000),
              dict(name="layer1.0", si=0.40, csi=0.45, high_order_si=0.15, soft_si=0.38, dim=64, reduction="none",
                   macs=2_000_000),
              dict(name="layer1.1", si=0.38, csi=0.50, high_order_si=0.14, soft_si=0.36, dim=64, reduction="none",
                   macs=3_000_000),
              dict(name="linear:input", si=0.70, csi=0.71, high_order_si=0.55, soft_si=0.69, dim=64,
                   reduction="none", macs=3_000_000)]
    return {"model": "resnet56-cifar10-jpeg.th", "samples": 500, "wall_seconds": 3.0, "peak_rss_bytes": 2**30,
            "oracle_checks": [],
            "report": {"model": {"arch": "resnet56"}, "data": {"split": "test"}, "settings": {"order": 3},
                       "layers": layers, "n_samples": 500, "accuracy": 0.9, "total_macs": 3_000_000}}


def _quant():
    return {"args": {}, "a": {"acc_fp32": 0.899, "acc_int8": 0.8963, "size_reduction_packed": 0.749,
                              "speedup": {"batch1": 0.47, "batch128": 7.55}},
            "b": {"model": "resnet20-cifar10-jpeg", "acc_fp32": 0.8869, "acc_ptq": 0.832, "acc_qat": 0.8772,
                  "first_last_bits": 8,
                  "qat": {"epochs": 2, "steps_per_epoch": 179, "full_epoch_steps": 391},
                  "shiftadd": {"samples": 500, "acc_shiftadd": 0.862, "acc_fakequant_same_images": 0.864,
                               "acc_fp32_same_images": 0.868, "kernel_check": {"bit_exact": True}}},
            "c": {"model": "resnet20-cifar10-jpeg", "test_images": 2000, "acc_fp32": 0.878,
                  "fp32_state_dict_bytes": 1_120_000, "pruning": "global magnitude, no fine-tuning",
                  "rows": [{"sparsity_pct": 0, "bits": 8, "acc_fp32_pruned": 0.878, "acc_quant": 0.877,
                            "size_bytes": 282_000, "size_vs_fp32": 0.25},
                           {"sparsity_pct": 90, "bits": 4, "acc_fp32_pruned": 0.119, "acc_quant": 0.1195,
                            "size_bytes": 49_000, "size_vs_fp32": 0.044}]},
            "d": {"skipped": "pass --pruned PATH"}}


def _write(tmp_path, **files):
    for name, d in files.items():
        (tmp_path / report.FILES[name]).write_text(json.dumps(d))
    return tmp_path


def _row(text, claim):
    return next(line for line in text.splitlines() if line.startswith(f"| {claim}"))


def test_numbers_from_json_and_missing_results(tmp_path):
    res = _write(tmp_path, compress=_compress(), quant=_quant(), analyze_resnet56=_analyze())
    t = report.table(res)
    top1 = _row(t, "A. SI compression of ResNet-56: top-1")
    assert "93.52% -> 93.49%" in top1 and "93.49% fine-tuned (3 epoch(s))" in top1 and "matched" in top1
    assert "--target-macs 0.417 --epochs 3" in top1 and "`compress_resnet56.json`" in top1
    assert "-58.3% MACs" in _row(t, "A. SI compression of ResNet-56: FLOPs")
    # a listed method without a result, and the anchors of other methods, never show a measured number
    assert "not measured yet" in _row(t, "A. baseline: torch-pruning global magnitude pruner")
    hrank = _row(t, "A. anchor: HRank")
    assert "published, not measured" in hrank and "-0.09 pts" in hrank
    # B: numbers from the analysis JSON; ResNet-20 missing
    b56 = _row(t, "B. layer importance (SI, CSI, high-order SI per layer): ResNet-56")
    assert "SI 0.300 -> 0.700" in b56 and "1 of 2 blocks do not raise SI" in b56 and "head linear" in b56
    assert "not measured yet: run `python benchmarks/bench_analyze.py --model resnet20-cifar10-jpeg.th`" in \
        _row(t, "B. layer importance (SI, CSI, high-order SI per layer): ResNet-20")
    # C: section d skipped -> the command that measures it; int8 alone from section a
    assert "not measured yet: run `python benchmarks/bench_quant.py --sections d" in \
        _row(t, "C. SI pruning + int8: size")
    assert "89.90% -> 89.63%" in _row(t, "C. reference point")
    assert "0%/8b 87.7%" in _row(t, "D. percentile pruning x uniform quantization: post-training")
    assert "not measured yet" in _row(t, "D. percentile pruning x uniform quantization: after fine-tuning")
    e = _row(t, "E. 4-bit power-of-two weights: top-1")
    assert "87.72% QAT" in e and "not matched: -0.97 pts" in e
    for claim, cmd in (("E. shift-add kernel speed", "bench_shiftadd.py"), ("F. SI computation speed",
                                                                             "bench_separability.py"),
                       ("G. plain VGG", "bench_vgg.py")):
        row = _row(t, claim)
        assert f"not measured yet: run `python benchmarks/{cmd}" in row and "(missing)" in row


def test_verdicts_follow_the_numbers(tmp_path):
    t = report.table(_write(tmp_path, compress=_compress(si_ft=0.9349, l1_ft=0.9300)))
    assert "| matched (-0.03 pts" in _row(t, "A. SI compression of ResNet-56: top-1")
    assert "SI plan better by 0.49 pts after the same fine-tuning" in _row(t, "A. baseline: L1, uniform")
    assert "SI plan better by 10.00 pts after compensation" in _row(t, "A. baseline: SI widths, random")
    t = report.table(_write(tmp_path, compress=_compress(si_ft=0.8500, l1_ft=0.8700)))
    top1 = _row(t, "A. SI compression of ResNet-56: top-1")
    assert "not matched: drops 8.49 pts more than published" in top1 and "baseline 93.52%" in top1
    assert "SI plan worse by 2.00 pts after the same fine-tuning" in _row(t, "A. baseline: L1, uniform")
    q = _quant()
    q["b"]["acc_qat"] = 0.8850
    t = report.table(_write(tmp_path, quant=q))
    assert "| matched (the published accuracy rose" in _row(t, "E. 4-bit power-of-two weights: top-1")


def test_cli_reads_the_results_folder_from_env_and_argument(tmp_path):
    res = _write(tmp_path, compress=_compress())
    script = str(REPO / "benchmarks" / "report.py")
    for args, env in (([script, "--table"], {"SI_COMPRESS_RESULTS": str(res)}),
                      ([script, "--results", str(res)], {})):
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", **env})
        assert proc.returncode == 0, proc.stderr
        assert "93.49% fine-tuned" in proc.stdout and "not measured yet" in proc.stdout
    proc = subprocess.run([sys.executable, script, "--results", str(res), "--command", "compress"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "Command: `python benchmarks/bench_compress.py --target-macs 0.417 --epochs 3`"


@pytest.mark.parametrize("detail", [False, True])
def test_bench_analyze_table_renders_a_fake_json(tmp_path, detail):
    (tmp_path / "analyze_resnet56-cifar10-jpeg.json").write_text(json.dumps(_analyze()))
    args = [sys.executable, str(REPO / "benchmarks" / "bench_analyze.py"), "--table", "--results", str(tmp_path),
            "--model", "resnet56-cifar10-jpeg.th"] + (["--detail"] if detail else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    if detail:
        assert "| 2 | `layer1.1` | 64 | none | 0.380 | 0.500 | 0.140 | 0.360 | -0.020 | 3.0 M |" in proc.stdout
        assert "1 of 2 blocks do not raise SI (`layer1.1`)" in proc.stdout
        assert "CSI 0.710 >= SI 0.700 - 0.02 -> a linear head" in proc.stdout
        assert "No compress run of this architecture yet" in proc.stdout
    else:
        assert "| resnet56-cifar10-jpeg.th | 500 | 4 |" in proc.stdout


def test_vgg_rows_compare_truncation_with_pruning_alone(tmp_path):
    def res(macs, comp, ft):
        return dict(macs_reduction=macs, params_reduction=0.6, acc_pruned=0.2, acc_compensated=comp, acc_finetuned=ft,
                    latency={"batch1": {"speedup": 1.8}, "batch128": {"speedup": 2.0}})
    vgg = {"arch": "vgg16_bn_half", "base": {"acc": 0.91}, "quick": False,
           "truncation": {"max_si": 0.95, "peak_layer": "features.40", "truncate_after": "features.33", "tol": 0.01,
                          "si_at_cut": 0.945, "macs_saved": 20, "total_macs": 100},
           "results": {"si-truncate": res(0.5, 0.85, 0.89), "si-prune-only": res(0.5, 0.80, 0.87)}}
    t = report.table(_write(tmp_path, vgg=vgg))
    assert "cut after `features.33` (SI 0.945), 20.0% of the MACs after it" in _row(t, "G. plain VGG: cut after")
    g = _row(t, "G. plain VGG: truncate + prune")
    assert "truncation helps: +2.00 pts vs pruning alone (fine-tuned vs fine-tuned)" in g
    vgg["results"]["si-prune-only"]["acc_finetuned"] = 0.90
    t = report.table(_write(tmp_path, vgg=vgg))
    assert "truncation hurts: -1.00 pts" in _row(t, "G. plain VGG: truncate + prune")


def test_resnet56_at_the_papers_point_reads_its_own_run(tmp_path):
    """Row H for ResNet-56 comes from compress_resnet56_paper.json: SI against torch-pruning at its MACs."""
    t = report.table(tmp_path)
    assert "not measured yet: run `python benchmarks/bench_compress.py --target-macs 0.417 --target-params 0.422" in \
        _row(t, "H. ResNet-56 at the published operating point")
    c = _compress()
    c["settings"].update(target_macs=0.417, target_params=0.422, epochs=0, compensation="refit",
                         methods=["si", "tp-magnitude"])
    c["base"]["acc"] = 0.899
    c["results"] = {"si": c["results"]["si"], "tp-magnitude": dict(
        macs_reduction=0.586, params_reduction=0.353, acc_pruned=0.1, acc_compensated=0.7824)}
    c["results"]["si"].pop("acc_finetuned")
    c["results"]["si"]["acc_compensated"] = 0.8335
    row = _row(report.table(_write(tmp_path, compress_paper=c)), "H. ResNet-56 at the published operating point")
    assert "-58.3% MACs, -57.8% params; 89.90% -> 83.35% compensated" in row
    assert "magnitude 78.24% (-35.3% params)" in row and "1.25x / 1.50x" in row
    assert "reductions matched within 1 pt" in row and "accuracy not matched: -6.55 pts vs -0.03 pts" in row
    assert "SI +5.11 pts vs the best torch-pruning importance" in row and "`compress_resnet56_paper.json`" in row


def test_the_resnet56_paper_row_prefers_the_run_with_reconstruction(tmp_path):
    """Row H reads compress_resnet56_paper_recon.json once it holds an SI result, says what training the accuracy
    cost (re-fit + label-free steps, no fine-tuning) and gives the command that made it; the re-fit-only run
    stays the fallback."""
    def run(comp, si_acc, tp_acc, recon=None):
        c = _compress()
        c["settings"].update(target_macs=0.417, target_params=0.422, epochs=0, compensation=comp,
                             methods=["si", "tp-group-norm"], objective="macs", reconstruct_seconds=3600.0,
                             reconstruct_steps=1200, reconstruct_images=50000)
        c["base"]["acc"] = 0.899
        si = c["results"]["si"]
        si.pop("acc_finetuned")
        si["acc_compensated"] = si_acc
        if recon:
            si["reconstruct"] = recon
        c["results"] = {"si": si, "tp-group-norm": dict(macs_reduction=0.588, params_reduction=0.321, acc_pruned=0.1,
                                                        acc_compensated=tp_acc)}
        return c
    refit = run("refit", 0.8335, 0.6535)
    recon = run("refit+reconstruct", 0.8771, 0.8500, recon={"steps": 1200, "images": 50000, "labels_used": False})
    row = _row(report.table(_write(tmp_path, compress_paper=refit)), "H. ResNet-56 at the published operating point")
    assert "83.35% compensated (re-fit only, no training" in row and "`compress_resnet56_paper.json`" in row
    half = run("refit+reconstruct", 0.8771, 0.8500)
    half["results"].pop("si")
    row = _row(report.table(_write(tmp_path, compress_paper_recon=half)), "H. ResNet-56 at the published operating point")
    assert "83.35%" in row, "a recon JSON without an SI result must not replace the re-fit run"
    row = _row(report.table(_write(tmp_path, compress_paper_recon=recon)), "H. ResNet-56 at the published operating point")
    assert "89.90% -> 87.71% compensated (re-fit + 1200 label-free reconstruction steps on 50,000 train images, " \
        "no fine-tuning" in row
    assert "our training budget: re-fit + 1200 label-free" in row
    assert "SI +2.71 pts vs the best torch-pruning importance" in row and "`compress_resnet56_paper_recon.json`" in row
    assert "--compensation refit+reconstruct --objective macs --reconstruct-seconds 3600.0 --methods si tp-group-norm " \
        "--out benchmarks/results/compress_resnet56_paper_recon.json" in row
    recon["results"]["si"]["acc_finetuned"] = 0.8905
    recon["settings"]["epochs"] = 3
    row = _row(report.table(_write(tmp_path, compress_paper_recon=recon)), "H. ResNet-56 at the published operating point")
    assert "89.05% fine-tuned (re-fit + 1200 label-free reconstruction steps on 50,000 train images, then fine-tuned " \
        "3 epoch(s)" in row


def test_the_papers_other_networks_read_their_runs(tmp_path):
    """Rows H for VGG-16 / GoogLeNet / DenseNet-40: 'not measured' with the command until their bench_compress JSON
    exists, then its numbers, how the base was trained, the gap to the published cut, torch-pruning beside it."""
    t = report.table(tmp_path)
    for name, arch in (("VGG-16", "vgg16_bn"), ("GoogLeNet", "googlenet_cifar"), ("DenseNet-40", "densenet40")):
        row = _row(t, f"H. SI compression of {name}")
        assert "not measured yet" in row and f"--arch {arch}" in row
    c = _compress()
    c["settings"].update(model="runs/train/vgg16_bn_quarter/vgg16_bn_quarter.pth", arch="vgg16_bn_quarter",
                         target_macs=0.24, target_params=0.125, epochs=0, methods=["si", "tp-magnitude"])
    c["train_record"] = {"epochs_done": 10, "recipe": {"train_images": 50000}, "seconds": 1200, "device": "cpu"}
    c["base"]["acc"] = 0.85
    si = c["results"]["si"]
    si.pop("acc_finetuned")
    si.update(macs_reduction=0.761, params_reduction=0.80, acc_compensated=0.80)
    c["results"] = {"si": si, "tp-magnitude": dict(macs_reduction=0.76, params_reduction=0.5, acc_compensated=0.82)}
    row = _row(report.table(_write(tmp_path, compress_vgg16_paper=c)), "H. SI compression of VGG-16")
    assert "`vgg16_bn_quarter` trained here: 10 epochs on 50000 JPEG train images, 20 min on cpu" in row
    assert "-76.1% MACs, -80.0% params; 85.00% -> 80.00% compensated" in row
    assert "reductions differ: params -80.0% vs -87.5%" in row and "MACs" not in row.split("reductions differ")[1][:40]
    assert "accuracy -5.00 pts (compensated; no published accuracy in our source)" in row
    assert "SI -2.00 pts vs the best torch-pruning importance" in row
    assert "--model runs/train/vgg16_bn_quarter/vgg16_bn_quarter.pth --arch vgg16_bn_quarter --target-macs 0.24" \
        in row and "`compress_vgg16_paper.json`" in row


@pytest.mark.parametrize("which", ["empty", "real"])
def test_every_published_number_names_its_own_source(tmp_path, which):
    """Each published figure cites its reference by key (full citation listed under the table); no
    row attributes numbers to a generic 'paper'."""
    import re

    results = tmp_path if which == "empty" else REPO / "benchmarks" / "results"
    rows = report.all_rows(results)
    assert len(rows) > 10
    keys = tuple(report.REFERENCES)
    for r in rows:
        pub = str(r.published)
        if re.search(r"\d", pub) and not pub.startswith("-"):
            tags = re.findall(r"\[([^\]]+)\]", pub)
            assert tags and all(t.startswith(keys) for t in tags), (r.claim, pub)
    text = report.table(results)
    assert "SI compression paper" not in text and "[paper" not in text.lower()
    for k, full in report.REFERENCES.items():
        assert f"- [{k}] {full}" in text
    # the four sources behind the reproduced claims are each cited by their own reference
    for key, src in (("si_r56", "Saffar"), ("si_googlenet", "Saffar"), ("prune_quant_r50", "Song"),
                     ("percentile_grid", "Alhimdiat"), ("pot4", "Wang"), ("pot4_fpga", "Wang")):
        assert report.PUBLISHED[key]["source"].startswith(src)
    with pytest.raises(KeyError, match="REFERENCES"):
        report.cites("the paper")


def test_bench_compress_table_states_how_the_same_latency_baseline_was_found(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_compress", REPO / "benchmarks" / "bench_compress.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    d = _compress()
    d["settings"].update(compensation="refit", target_params=None)
    d["machine"] = {"torch_threads": 2}
    d["same_latency"] = {"batch": 128, "target_macs": 0.473,
                         "trace": [{"target_macs": 0.525, "latency_ratio_to_si": 1.169},
                                   {"target_macs": 0.473, "latency_ratio_to_si": 0.943}]}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    out = bench.table(p)
    assert "tp-magnitude-same-latency" in out and "0.473 x MACs" in out and "0.943 x the SI model" in out
    assert "(2 steps, each timing it against the SI model at batch 128)" in out
    del d["same_latency"]
    p.write_text(json.dumps(d))
    assert "same-latency" not in bench.table(p)


def test_bench_compress_keep_results_merges_only_the_same_experiment(tmp_path):
    """--keep-results adds methods to an earlier run only when every setting but the per-run ones is the
    same (else a one-line exit naming them) and the SI plan is the same model."""
    import argparse

    spec = importlib.util.spec_from_file_location("bench_compress", REPO / "benchmarks" / "bench_compress.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "c.json"
    settings = dict(model="m.pth", target_macs=0.5, seed=0, methods=["si"], finetune_methods=["si"],
                    no_latency=True, keep_results=False)
    args = argparse.Namespace(**{**settings, "methods": ["tp-group-norm-local"], "keep_results": True, "out": out})
    with pytest.raises(SystemExit, match="does not exist"):
        bench.prior_results(args)
    prior = {"settings": settings, "results": {"si": {"acc_compensated": 0.9}}, "plan": {}}
    out.write_text(json.dumps(prior))
    assert bench.prior_results(args)["results"] == prior["results"]
    args.target_macs = 0.3
    with pytest.raises(SystemExit, match="settings differ .*: target_macs;"):
        bench.prior_results(args)
    args.target_macs, args.keep_results = 0.5, False
    assert bench.prior_results(args) is None
    plan = {"layers": [{"name": "a", "keep": [0, 2]}], "dropped_blocks": ["b"], "truncate_after": None,
            "source": {"seconds": 1.0}}
    same = {**plan, "source": {"seconds": 2.0}}
    assert bench._plan_key(plan) == bench._plan_key(same)
    assert bench._plan_key(plan) != bench._plan_key({**plan, "layers": [{"name": "a", "keep": [0, 1]}]})
    assert bench._plan_key(plan) != bench._plan_key({**plan, "dropped_blocks": []})


def test_bench_compress_table_header_says_what_training_and_which_baselines_there_were(tmp_path):
    """The header states the fine-tuning the accuracies went through (none when no method was
    fine-tuned, whatever --epochs said) and mentions baselines only when the run has some."""
    spec = importlib.util.spec_from_file_location("bench_compress", REPO / "benchmarks" / "bench_compress.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    d = _compress()
    d["settings"].update(compensation="refit", target_params=0.5, target_macs=0.5)
    d["machine"] = {"torch_threads": 2}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    head = bench.table(p).splitlines()[0]
    assert "fine-tuning: 3 epoch(s), SGD cosine, lr 0.01." in head and "(the baselines match" in head
    d["results"] = {"si-streams": {k: v for k, v in d["results"]["si"].items() if k != "acc_finetuned"}}
    p.write_text(json.dumps(d))
    head = bench.table(p).splitlines()[0]
    assert "fine-tuning: none." in head and "0.5 x params." in head and "baselines" not in head
