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

TABLES = {
    "separability": ([sys.executable, str(HERE / "bench_separability.py"), "--table"], "separability.json"),
    "compress": ([sys.executable, str(HERE / "bench_compress.py"), "--table"], "compress_resnet56.json"),
    "quant": ([sys.executable, str(HERE / "bench_quant.py"), "--table"], "quant.json"),
    "analyze": ([sys.executable, str(HERE / "bench_analyze.py"), "--table"], "analyze_resnet56-cifar10-jpeg.json"),
    "shiftadd": ([sys.executable, str(HERE / "bench_shiftadd.py"), "--table"], "shiftadd.json"),
    "vgg": ([sys.executable, str(HERE / "bench_vgg.py"), "--table"], "vgg.json"),
}


def render(name: str) -> str:
    cmd, result = TABLES[name]
    if not (HERE / "results" / result).exists() or not Path(cmd[1]).exists():
        return f"_Not measured yet: run `python benchmarks/{Path(cmd[1]).name}`._"
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
