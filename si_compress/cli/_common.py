"""What every CLI shares: one-line errors with exit code 2, a progress bar, model/data options."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback

EXIT_USAGE = 2
EXIT_BUG = 1


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line like ours, exit 2 (from run_main)
        raise CLIError(f"{message}; see {self.prog} --help")


def _number(text: str, kind, what: str, ok) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if (kind is float and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, "an integer >= 1", lambda v: v >= 1)


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (NaN and inf are refused: they would train an all-NaN model)."""
    return _number(text, float, "a finite number > 0", lambda v: v > 0)


def user_message(exc: BaseException) -> str:
    """The one line that names a user error.

    An exception raised inside a DataLoader worker comes back re-raised with "Caught DataError in
    DataLoader worker process 0." as its first line and the worker's traceback after it: the
    worker's own message (which names the file) is the last line of that text.
    """
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        last = lines[-1].strip()
        return re.sub(r"^[\w.]*(?:Error|Exception):\s*", "", last) or last
    return lines[0].strip() if lines else type(exc).__name__


def _bug_log(prog: str, argv) -> str | None:
    """Write the current exception's traceback to a log file; its path (None if it cannot be written)."""
    try:
        fd, path = tempfile.mkstemp(prefix=f"{prog}-bug-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{prog} {' '.join(map(str, argv or []))}\n\n")
            traceback.print_exc(file=fh)
        return path
    except OSError:
        return None


def run_main(prog: str, body, argv) -> int:
    """Run ``body(argv)``: user errors become one line on stderr and exit code 2; anything else is a
    bug: one line saying so, the traceback in a log file, exit code 1 (never a traceback on screen)."""
    from ..data import DataError
    from ..models import ModelLoadError

    try:
        return int(body(argv) or 0)
    except (CLIError, DataError, ModelLoadError, ValueError, OSError) as exc:
        # OSError: missing files, permissions, a full disk: the environment, not a bug
        if os.environ.get("SI_COMPRESS_DEBUG"):
            traceback.print_exc()
        print(f"{prog}: error: {user_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prog}: error: out of memory; lower --samples or --max-dim, or --memory-budget", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if os.environ.get("SI_COMPRESS_DEBUG"):
            traceback.print_exc()
        log = _bug_log(prog, argv)
        where = f"traceback in {log}" if log else "rerun with SI_COMPRESS_DEBUG=1 for the traceback"
        print(f"{prog}: internal error (a bug in si_compress, not in your input): {type(exc).__name__}: "
              f"{user_message(exc)}; {where}; please report it", file=sys.stderr)
        return EXIT_BUG


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the enclosed code on ``n`` threads (None: unchanged), torch's and Numba's both: Numba's
    OpenMP layer shares torch's thread pool setting, so restoring Numba's own count after an SI
    search would otherwise undo ``--threads`` for torch. The previous counts come back after, so a
    CLI called in-process (tests, notebooks) leaves the caller's settings alone."""
    import torch

    before = torch.get_num_threads()
    numba_before = None
    if n:
        try:
            import numba

            numba_before = numba.get_num_threads()
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if numba_before is not None:
            import numba

            numba.set_num_threads(numba_before)
        torch.set_num_threads(before)


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last = (None, -1)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        frac = done / total if total else 1.0
        elapsed = time.perf_counter() - self.t0
        bar = "#" * int(24 * frac)
        line = f"{stage:<22} [{bar:<24}] {done}/{total} {elapsed:6.1f}s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
            self.stream.flush()
            return
        quarter = int(4 * frac)
        if self._last != (stage, quarter):
            self._last = (stage, quarter)
            self.stream.write(line + "\n")
            self.stream.flush()

    def step(self, name: str) -> None:
        """A step without a count (compensating, evaluating, timing): one line as it starts."""
        if not self.enabled:
            return
        if self.tty and self._last[0] is not None:
            self.stream.write("\n")
        self._last = (None, -1)
        self.stream.write(f"{name} ... ({time.perf_counter() - self.t0:.1f}s)\n")
        self.stream.flush()


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint file (a state dict or an si-compress output; a full pickle needs "
                   "--trust-model)")
    p.add_argument("--arch", help="architecture: resnet20/32/44/56/110, vgg16_bn, vgg16_bn_half, vgg16_bn_quarter, "
                   "digits_cnn; torchvision:NAME; or your own model class as path/to/file.py:Class or "
                   "package.module:Class -- these two IMPORT AND RUN that code, use them only for code you trust "
                   "(default: inferred from a CIFAR ResNet or VGG-16 state dict)")
    p.add_argument("--arch-kwargs", metavar="JSON",
                   help="constructor options of a torchvision:NAME or user --arch as a JSON object, e.g. "
                   """'{"aux_logits": false}'; num_classes is passed when the constructor takes it""")
    p.add_argument("--num-classes", type=positive_int, help="classifier outputs (default: from the checkpoint)")
    p.add_argument("--trust-model", action="store_true",
                   help="allow a fully pickled model: this executes code from the file; use only for files you trust")


def parse_arch_kwargs(text) -> dict | None:
    """The --arch-kwargs JSON object as a dict (None when not given); CLIError on anything else."""
    if text is None or isinstance(text, dict):
        return text
    example = """--arch-kwargs '{"aux_logits": false}'"""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CLIError(f"--arch-kwargs is not valid JSON ({exc.msg} at character {exc.pos}); "
                       f"pass a JSON object, e.g. {example}") from None
    if not isinstance(value, dict):
        raise CLIError(f"--arch-kwargs must be a JSON object of constructor options, got {text!r}; e.g. {example}")
    return value


def add_device_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                   help=f"where {what} run: auto (default: a CUDA GPU when torch sees one, else the CPU), cpu, "
                        "cuda or cuda:N; structure tracing, planning, MAC counts, latency timing, quantization "
                        "and export always run on the CPU")


def check_device(args):
    """The resolved ``--device`` (a torch.device); CLIError for a bad or unavailable one, before any work."""
    from .._device import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as exc:
        raise CLIError(f"--device: {exc}") from None


DEFAULT_SAMPLES = 5000


def add_data_args(p: argparse.ArgumentParser, *, default_samples: int = DEFAULT_SAMPLES) -> None:
    p.add_argument("--data", required=True, help="cifar10, cifar100, digits, or an ImageFolder directory")
    p.add_argument("--data-root", help="where torchvision CIFAR data lives (default ~/.cache/si_compress/data)")
    p.add_argument("--download", action="store_true", help="download CIFAR if missing (needs internet)")
    p.add_argument("--split", default="test", choices=("train", "test"), help="split to analyse (default test)")
    p.add_argument("--samples", type=nonneg_int, default=None,
                   help=f"class-balanced sample size (default {default_samples} or the whole split if smaller; "
                   "0 = the whole split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the class-balanced sample")
    p.add_argument("--normalize", default="auto",
                   help="auto (dataset preset), none, or 'm1,m2,m3/s1,s2,s3' mean/std per channel")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--workers", type=nonneg_int, default=0, help="DataLoader worker processes (default 0)")


def parse_normalize(text: str):
    if text in ("auto", "none"):
        return text
    try:
        mean, std = text.split("/")
        m = tuple(float(v) for v in mean.split(","))
        s = tuple(float(v) for v in std.split(","))
    except ValueError:
        raise CLIError(f"--normalize must be auto, none or 'm1,m2,m3/s1,s2,s3'; got {text!r}") from None
    if len(m) != len(s) or any(v <= 0 for v in s):
        raise CLIError(f"--normalize needs as many means as stds and positive stds; got {text!r}")
    return (m, s)


def load_model_and_data(args, *, split=None, samples=None):
    """Load the checkpoint and a class-balanced sample; check they fit each other."""
    import torch

    from ..data import balanced_indices, load_dataset, make_loader
    from ..models import load_model

    arch_kwargs = parse_arch_kwargs(getattr(args, "arch_kwargs", None))
    if args.samples is not None and args.samples < 0:
        raise CLIError(f"--samples must be >= 0; got {args.samples}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1; got {args.batch_size}")
    loaded = load_model(args.model, arch=args.arch, num_classes=args.num_classes, trust_model=args.trust_model,
                        arch_kwargs=arch_kwargs)
    info = load_dataset(args.data, split=split or args.split, root=args.data_root, download=args.download,
                        normalize=parse_normalize(args.normalize))
    if len(info) == 0:
        raise CLIError(f"dataset {args.data!r} ({info.split}) has no samples")
    if info.num_classes != loaded.num_classes:
        raise CLIError(
            f"the data has {info.num_classes} classes but the model outputs {loaded.num_classes}; "
            "pick the matching --data or checkpoint"
        )
    n = samples if samples is not None else args.samples
    if n is None:
        n = min(DEFAULT_SAMPLES, len(info))
    if n and n > len(info):
        raise CLIError(f"--samples {n} exceeds the {len(info)} images of {info.description}; lower --samples")
    idx = None if (not n or n == len(info)) else balanced_indices(info.labels, n, seed=args.seed)
    loader = make_loader(info, idx, batch_size=args.batch_size, num_workers=args.workers)
    # one forward pass up front: a wrong input shape or channel count fails here with a clear message
    x0 = next(iter(make_loader(info, [0] if idx is None else [int(idx[0])], batch_size=1)))[0]
    try:
        with torch.inference_mode():
            out = loaded.model(x0)
    except RuntimeError as exc:
        raise CLIError(f"the model cannot run on {info.name} images of shape {tuple(x0.shape[1:])}: "
                       f"{str(exc).splitlines()[0]}") from None
    if out.ndim != 2 or out.shape[1] != info.num_classes:
        raise CLIError(f"the model's output has shape {tuple(out.shape)}; expected (batch, {info.num_classes})")
    return loaded, info, loader, idx, x0
