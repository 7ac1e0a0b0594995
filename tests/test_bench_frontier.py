"""benchmarks/bench_frontier.py: who dominates whom, which runs may be compared, the table it prints."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_frontier", REPO / "benchmarks" / "bench_frontier.py")
frontier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frontier)


def test_dominated_by_needs_at_least_as_good_in_both_and_better_in_one():
    pts = {"a": (0.88, 1.5), "b": (0.87, 2.0), "c": (0.86, 1.9), "d": (0.88, 1.5), "e": (0.90, 1.0)}
    dom = frontier.dominated_by(pts)
    assert dom["c"] == ["b"]                 # b: more accurate and faster
    assert dom["a"] == [] and dom["d"] == []  # a tie dominates nobody
    assert dom["b"] == [] and dom["e"] == []
    assert frontier.dominated_by({"x": (0.5, 1.0), "y": (0.5, 1.2)}) == {"x": ["y"], "y": []}


def _run(steps=1200, **settings):
    s = dict(model="resnet56-cifar10-jpeg.th", arch=None, compensation="refit+reconstruct", reconstruct_steps=1200,
             reconstruct_images=50000, reconstruct_lr=1e-3, reconstruct_bn="train", teacher="base", epochs=0,
             max_steps=None, lr=0.01)
    s.update(settings)
    rec = dict(targets="logits", bn="train", steps=steps, images=50000, batch=128, lr=1e-3, temperature=4.0,
               labels_used=False)
    return {"settings": s, "eval_samples": 10000, "base": {"acc": 0.899},
            "results": {"si": dict(macs_reduction=0.58, params_reduction=0.58, acc_compensated=0.877,
                                   reconstruct=rec)}}


def test_runs_made_with_other_training_are_refused():
    frontier.check_comparable({"a.json": _run(), "b.json": _run()})
    tuned = _run(epochs=3)
    tuned["results"]["si"]["acc_finetuned"] = 0.89
    with pytest.raises(SystemExit, match="b.json: epochs = 3 but a.json has 0"):
        frontier.check_comparable({"a.json": _run(), "b.json": tuned})
    with pytest.raises(SystemExit, match="its reconstruction ran with other steps"):
        frontier.check_comparable({"a.json": _run(), "b.json": _run(steps=700)})
    other = _run()
    other["eval_samples"] = 2000
    with pytest.raises(SystemExit, match="eval_samples"):
        frontier.check_comparable({"a.json": _run(), "b.json": other})


def test_a_missing_run_is_one_line_and_exit_code_2(tmp_path, capsys):
    rc = frontier.main(["--runs", str(tmp_path / "nope.json"), "--out", str(tmp_path / "f.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nope.json: no such result" in err
    assert not (tmp_path / "f.json").exists()


def test_table_sorts_by_accuracy_and_names_who_dominates(tmp_path):
    def row(run, meth, macs, acc, s1, s128, dom):
        return dict(run=run, method=meth, macs_reduction=macs, params_reduction=macs - 0.2, acc=acc,
                    batch1=dict(speedup=s1, spread=0.05, dominated_by=["z"] if meth == "si" else []), batch128=dict(speedup=s128, spread=0.031, dominated_by=dom))
    rows = {"si @ -58.4% MACs": row("p.json", "si", 0.584, 0.8771, 1.41, 1.56, ["tp-group-norm @ -51.9% MACs"]),
            "tp-group-norm @ -51.9% MACs": row("r.json", "tp-group-norm", 0.519, 0.8801, 1.34, 1.70, [])}
    timing = {b: dict(base_s=0.1, base_spread=0.01, noisy=b == "batch1", retried=False, repeats=7, threads=2)
              for b in ("batch1", "batch128")}
    d = dict(benchmark="frontier", runs=["r.json", "p.json"], settings=_run()["settings"], eval_samples=10000,
             base=dict(model="resnet56-cifar10-jpeg.th", acc=0.899), timing=timing, rows=rows)
    (tmp_path / "f.json").write_text(json.dumps(d))
    t = frontier.table(tmp_path / "f.json")
    lines = [ln for ln in t.splitlines() if ln.startswith("| ") and "%" in ln]
    assert lines[0] == "| tp-group-norm @ -51.9% MACs | -51.9% | -31.9% | 88.01% | 1.34x | 1.70x | none | none |"
    assert lines[1].endswith("| 87.71% | 1.41x | 1.56x | z | tp-group-norm @ -51.9% MACs |")
    assert "1200 reconstruction steps on 50,000 unlabelled train images" in t
    assert "(largest spread of a model: 5.0% at b1, 3.1% at b128;" in t
    assert "NOISY at batch1" in t and "all 2 models timed in turn in the same 7 rounds" in t
    quiet = copy.deepcopy(d)
    quiet["timing"]["batch1"]["noisy"] = False
    (tmp_path / "q.json").write_text(json.dumps(quiet))
    assert "below 10% at both batch sizes" in frontier.table(tmp_path / "q.json")


def test_a_run_that_fine_tuned_nothing_compares_as_zero_epochs():
    # bench_compress's --epochs defaults to 1 and applies only to --finetune-methods: a run whose
    # methods were not fine-tuned made its accuracies without fine-tuning, whatever its --epochs
    frontier.check_comparable({"a.json": _run(), "b.json": _run(epochs=1, lr=0.05, max_steps=10)})
