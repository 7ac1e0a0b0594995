"""Atomic file output: write to a temporary file beside the target, then rename.

A crash or a bad-input error never leaves a half-written report, CSV, figure or model behind.
Files get the mode a plain ``open()`` would give (0666 minus the umask), not mkstemp's 0600.
:class:`OutputFolder` stages a whole run's files and moves them in together at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target, suffix: str | None = None):
    """Yield a temporary path in the target's folder; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())  # mkstemp creates 0600; other users' umask-given access is kept
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def file_mode() -> int:
    """0666 minus the process umask: the mode ``open(path, "w")`` would create a file with."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


class OutputFolder:
    """A run's output folder, checked before the work starts and filled all at once at the end.

    ``OutputFolder(out, produced=names)`` raises ValueError at once when ``out`` is a file or cannot
    be written (the check creates and removes a hidden staging folder inside it). Write files into
    :attr:`staging`; :meth:`commit` moves them into ``out`` and deletes the files named in
    ``produced`` that this run did not write (left by an earlier run, they would no longer match
    the new model). :meth:`discard` (on any error) removes the staging folder, and ``out`` itself
    when this run created it, so a failed run leaves nothing behind.
    """

    def __init__(self, out, *, produced=(), option: str = "--out"):
        self.path = Path(out)
        self.produced = tuple(produced)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{option} {self.path} exists and is not a folder; choose another {option}")
        self._created = [] if self.path.exists() else [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.path))
        except OSError as exc:
            self._remove_created()
            raise ValueError(f"cannot write into {option} {self.path} ({exc.strerror or type(exc).__name__}); "
                             f"choose a writable {option}") from None

    def commit(self) -> list[str]:
        """Move the staged files into the folder; returns the stale files removed."""
        written = sorted(p.name for p in self.staging.iterdir())
        for name in written:
            os.replace(self.staging / name, self.path / name)
        self.staging.rmdir()
        stale = [n for n in self.produced if n not in written and (self.path / n).is_file()]
        for name in stale:
            (self.path / name).unlink()
        return stale

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self._remove_created()

    def _remove_created(self) -> None:
        for p in self._created:  # innermost first; only folders this run made and left empty
            try:
                p.rmdir()
            except OSError:
                break

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()


def write_text(target, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target, obj) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def save_figure(fig, target, **kwargs) -> Path:
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=Path(target).suffix.lstrip(".") or "png", **kwargs)
    return Path(target)
