import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def blobs(rng, n_per_class=40, n_classes=3, dim=5, spread=0.1, sep=10.0):
    centers = rng.standard_normal((n_classes, dim)) * sep
    X = np.concatenate([c + spread * rng.standard_normal((n_per_class, dim)) for c in centers])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return X, y


@pytest.fixture(autouse=True, scope="session")
def _single_thread_env():
    # keep test timings stable on a 2-core machine shared with other jobs
    os.environ.setdefault("NUMBA_NUM_THREADS", "2")
    yield
