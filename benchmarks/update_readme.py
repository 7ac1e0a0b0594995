"""Regenerate the measured tables in README.md (and benchmarks/README.md) from benchmarks/results/*.json.

Each table lives between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` markers and is the
``--table`` output of the benchmark that measured it; a table whose JSON is missing says so.

  python benchmarks/update_readme.py
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PY = sys.executable
R56, R20 = "resnet56-cifar10-jpeg.th", "resnet20-cifar10-jpeg.th"


def _script(name: str, *args: str) -> list[str]:
    return [PY, str(HERE / name), *args]


def _compress_run(result: str, options: str) -> tuple:
    """A bench_compress table read from ``results/<result>``, and the command that makes it."""
    return (_script("bench_compress.py", "--table", "--out", str(HERE / "results" / result)), result,
            f"python benchmarks/bench_compress.py {options} --out benchmarks/results/{result}")


# name -> (command printing the table, result JSON it needs (None: always run), command that makes the JSON)
TABLES = {
    "report": (_script("report.py", "--table"), None, None),
    "separability": (_script("bench_separability.py", "--table"), "separability.json", None),
    "compress": (_script("bench_compress.py", "--table"), "compress_resnet56.json", None),
    "quant": (_script("bench_quant.py", "--table"), "quant.json", None),
    "quant_int8": (_script("bench_quant.py", "--table", "--sections", "a", "d"), "quant.json", None),
    "quant_grid": (_script("bench_quant.py", "--table", "--sections", "c", "e"), "quant.json", None),
    "quant_pot": (_script("bench_quant.py", "--table", "--sections", "b"), "quant.json", None),
    "analyze": (_script("bench_analyze.py", "--table", "--model", R56), f"analyze_{R56[:-3]}.json", None),
    "analyze_resnet20": (_script("bench_analyze.py", "--table", "--model", R20), f"analyze_{R20[:-3]}.json",
                         f"python benchmarks/bench_analyze.py --model {R20}"),
    "layers_resnet56": (_script("bench_analyze.py", "--table", "--detail", "--model", R56), f"analyze_{R56[:-3]}.json",
                        None),
    "layers_resnet20": (_script("bench_analyze.py", "--table", "--detail", "--model", R20), f"analyze_{R20[:-3]}.json",
                        f"python benchmarks/bench_analyze.py --model {R20}"),
    "shiftadd": (_script("bench_shiftadd.py", "--table"), "shiftadd.json", None),
    "vgg": (_script("bench_vgg.py", "--table"), "vgg.json", None),
    "adapter": (_script("bench_adapter.py", "--table"), "adapter.json", None),
    "cluster": (_script("bench_cluster.py", "--table"), "cluster.json", None),
    "cluster_200k": (_script("bench_cluster.py", "--table", "--out", str(HERE / "results" / "cluster_200k.json")),
                     "cluster_200k.json", "python benchmarks/bench_cluster.py --only dask --repeats 1 "
                     "--out benchmarks/results/cluster_200k.json"),
    "compress_noft": _compress_run("compress_resnet56_noft.json", "--methods si tp-magnitude uniform-l1 --epochs 0"),
    "compress_streams": _compress_run("compress_resnet56_streams_refit.json",
                                      "--methods si si-no-streams tp-magnitude tp-group-norm --epochs 0 "
                                      "--compensation refit --objective macs --no-latency --eval-samples 2000"),
    "compress_recon1200": _compress_run("compress_resnet56_recon1200.json",
                                        "--methods si tp-magnitude --target-macs 0.5 --target-params 0.5 --epochs 1 "
                                        "--compensation refit+reconstruct --reconstruct-steps 1200 "
                                        "--reconstruct-seconds 1800 --reconstruct-images 10000 --reconstruct-bn train "
                                        "--reconstruct-lr 1e-3 --eval-samples 0"),
    "compress_recon1200_gn": _compress_run("compress_resnet56_recon1200_gn.json",
                                           "--methods tp-group-norm --finetune-methods tp-group-norm "
                                           "--compensation refit+reconstruct --reconstruct-images 10000 "
                                           "--target-params 0.5 --epochs 1"),
    "compress_recon50k": _compress_run("compress_resnet56_recon50k.json",
                                       "--methods si tp-group-norm --compensation refit+reconstruct "
                                       "--reconstruct-images 50000 --reconstruct-seconds 3600 --epochs 0 --target-params 0.5"),
    "compress_recon2400": _compress_run("compress_resnet56_recon2400.json",
                                        "--methods si tp-group-norm --target-macs 0.5 --target-params 0.5 --epochs 0 "
                                        "--compensation refit+reconstruct --reconstruct-images 50000 "
                                        "--reconstruct-steps 2400 --reconstruct-seconds 7200 --eval-samples 0 "
                                        "--no-latency"),
    "compress_latency_batch": _compress_run("compress_resnet56_latency_batch.json",
                                            "--methods si si-latency-b1-b128 si-latency-b1 tp-magnitude tp-magnitude-same-latency "
                                            "--target-params 0.5 --epochs 0 --compensation refit"),
    "compress_params50": _compress_run("compress_resnet56_params50.json",
                                       "--methods si si-macs-only tp-magnitude tp-group-norm --target-macs 0.5 "
                                       "--target-params 0.5 --epochs 0 --compensation refit --objective macs "
                                       "--eval-samples 0"),
    "compress_paper": _compress_run("compress_resnet56_paper.json",
                                    "--methods si tp-magnitude tp-group-norm --target-macs 0.417 --target-params 0.422 "
                                    "--epochs 0 --compensation refit --objective macs --eval-samples 0"),
    "compress_deep70": _compress_run("compress_resnet56_deep70.json",
                                     "--methods si tp-magnitude tp-group-norm --target-macs 0.3 --target-params 0.3 "
                                     "--epochs 0 --compensation refit --objective macs --eval-samples 0"),
    "compress_resnet18": _compress_run("compress_resnet18_tv.json",
                                       "--model runs/models/resnet18-adapter.pth --arch torchvision:resnet18 "
                                       "--methods si tp-magnitude tp-group-norm --target-macs 0.5 --epochs 0 "
                                       "--compensation refit --objective macs --eval-samples 0"),
    "compress_deep70_recon": _compress_run("compress_resnet56_deep70_recon.json",
                                           "--methods si tp-magnitude tp-group-norm --target-macs 0.3 --target-params 0.3 "
                                           "--epochs 0 --compensation refit+reconstruct --reconstruct-images 50000 "
                                           "--reconstruct-seconds 3600 --objective macs --eval-samples 0 --no-latency"),
    "compress_paper_recon": _compress_run("compress_resnet56_paper_recon.json",
                                          "--methods si tp-magnitude tp-group-norm --target-macs 0.417 "
                                          "--target-params 0.422 --epochs 0 --compensation refit+reconstruct "
                                          "--reconstruct-images 50000 --reconstruct-seconds 3600 --objective macs "
                                          "--eval-samples 0 --no-latency"),
    "compress_kd3": _compress_run("compress_resnet56_kd3.json",
                                  "--methods si tp-group-norm --finetune-methods si tp-group-norm --target-macs 0.5 "
                                  "--target-params 0.5 --epochs 3 --compensation refit+reconstruct "
                                  "--reconstruct-images 50000 --reconstruct-seconds 3600 --objective macs "
                                  "--eval-samples 0 --no-latency"),
    "compress_streams_recon": _compress_run("compress_resnet56_streams_recon.json",
                                            "--methods si-streams --target-macs 0.5 --target-params 0.5 --epochs 0 "
                                            "--compensation refit+reconstruct --reconstruct-images 50000 "
                                            "--reconstruct-seconds 3600 --objective macs --eval-samples 0 --no-latency"),
    "compress_resnet18_recon": _compress_run("compress_resnet18_tv_recon.json",
                                             "--model runs/models/resnet18-adapter.pth --arch torchvision:resnet18 "
                                             "--methods si tp-magnitude tp-group-norm --target-macs 0.5 --epochs 0 "
                                             "--compensation refit+reconstruct --reconstruct-images 50000 "
                                             "--reconstruct-seconds 3600 --objective macs --eval-samples 0 --no-latency"),
    "frontier": (_script("bench_frontier.py", "--table"), "frontier_resnet56_recon.json",
                 "python benchmarks/bench_frontier.py"),
    # the command line that produced each result (from the settings recorded in its JSON)
    **{f"cmd_{k}": (_script("report.py", "--command", k), None, None)
       for k in ("compress", "quant", "shiftadd", "separability", "analyze_resnet56", "analyze_resnet20", "vgg")},
}


def render(name: str) -> str:
    cmd, result, make = TABLES[name]
    if not Path(cmd[1]).exists() or (result and not (HERE / "results" / result).exists()):
        return f"_Not measured yet: run `{make or 'python benchmarks/' + Path(cmd[1]).name}`._"
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        return f"_Table could not be rendered: {proc.stderr.strip().splitlines()[-1] if proc.stderr else 'error'}_"
    return proc.stdout.strip()


def example(name: str) -> str:
    """The real stdout of a CLI run stored in a benchmark JSON, as a code block."""
    import json

    src = HERE / "results" / "analyze_resnet56-cifar10-jpeg.json"
    if name != "analyze" or not src.exists():
        return "_Not measured yet: run `python benchmarks/bench_analyze.py`._"
    d = json.loads(src.read_text())
    cmd = f"si-analyze ../shared/models/{d['model']} --data ../shared/data/cifar10-jpeg --samples {d['samples']}"
    return f"```\n$ {cmd}\n{d['stdout'].rstrip()}\n```"


def update(path: Path) -> None:
    text = path.read_text()
    text_in = text
    text = re.sub(r"<!-- example:(\w+) -->.*?<!-- /example:\1 -->",
                  lambda m: f"<!-- example:{m.group(1)} -->\n{example(m.group(1))}\n<!-- /example:{m.group(1)} -->",
                  text, flags=re.S)

    def sub(m):
        return f"<!-- table:{m.group(1)} -->\n{render(m.group(1))}\n<!-- /table:{m.group(1)} -->"

    new = re.sub(r"<!-- table:(\w+) -->.*?<!-- /table:\1 -->", sub, text, flags=re.S)
    if new != text_in:
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(new)
        tmp.replace(path)
        print(f"updated {path.relative_to(ROOT)}")


if __name__ == "__main__":
    for p in (ROOT / "README.md", HERE / "README.md"):
        if p.exists():
            update(p)
