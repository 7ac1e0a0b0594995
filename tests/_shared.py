"""Locate the read-only ../shared fixtures (real checkpoints and data) for integration tests.

``SI_COMPRESS_SHARED`` overrides the default ``<repo>/../shared``. A missing fixture skips the
test locally but fails it in CI (``CI=true``), where the fixtures must be present.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SI_COMPRESS_SHARED", str(REPO.parent / "shared"))).expanduser()


def require_shared(relpath: str) -> Path:
    """``SHARED / relpath`` if it exists; otherwise skip (or fail when ``CI == "true"``)."""
    path = SHARED / relpath
    if not path.exists():
        msg = f"shared fixture {path} is missing; set SI_COMPRESS_SHARED to the folder that holds it"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
