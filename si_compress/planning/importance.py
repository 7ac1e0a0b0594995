"""Filter importance behind one interface: SI (single-filter or greedy), L1 norm, random.

Every ranker returns a ``Ranking``: filter indices, most important first, plus the evidence
(scores and, where computed, the prefix-SI curve: SI of the top-k filters for k = 1..C).
Pure numpy: filters arrive as groups G (n_samples, C, g) of pooled activations, weights as arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..separability.selection import forward_select, prefix_si, single_group_si

METHODS = ("si", "si-greedy", "l1", "random")


@dataclass(frozen=True)
class Ranking:
    method: str
    order: tuple[int, ...]            # filter indices, most important first
    scores: tuple[float, ...] = ()    # per filter (index order): single SI, L1 norm, ...
    curve: tuple[float, ...] = ()     # SI of the top-k filters in ``order``, k = 1..C

    def envelope(self) -> np.ndarray:
        """Best SI reachable with at most k filters (running max of the curve)."""
        return np.maximum.accumulate(np.asarray(self.curve, dtype=np.float64))


def _stable_desc(scores: np.ndarray) -> np.ndarray:
    # descending score, ties to the lower filter index
    return np.lexsort((np.arange(scores.size), -scores))


def rank_filters(method: str, *, G=None, y=None, weight=None, seed: int = 0, curve: bool = True) -> Ranking:
    """Rank the C output filters of one conv.

    si:        single-filter SI of each filter's pooled map (G[:, c]), descending;
    si-greedy: greedy forward selection by SI of the concatenation (``forward_select``);
    l1:        L1 norm of each filter's weights (weight (C, ...)), descending;
    random:    a seeded permutation.
    ``curve=True`` also computes the prefix-SI curve of the ranking (needs G and y).
    """
    if method not in METHODS:
        raise ValueError(f"filter ranking must be one of {', '.join(METHODS)}; got {method!r}")
    scores: np.ndarray | None = None
    if method in ("si", "si-greedy"):
        if G is None or y is None:
            raise ValueError(f"ranking by {method} needs the filters' pooled activations G and labels y")
        if method == "si":
            scores = single_group_si(G, y)
            order = _stable_desc(scores)
        else:
            res = forward_select(G, y)
            order = res.order
            return Ranking(method=method, order=tuple(int(i) for i in order), curve=tuple(float(v) for v in res.si))
    elif method == "l1":
        if weight is None:
            raise ValueError("ranking by l1 needs the conv weight (C_out, ...)")
        w = np.asarray(weight, dtype=np.float64)
        scores = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1)
        order = _stable_desc(scores)
    else:
        n = G.shape[1] if G is not None else np.asarray(weight).shape[0]
        order = np.random.default_rng(seed).permutation(n)
    cur = prefix_si(G, y, order) if (curve and G is not None and y is not None) else ()
    return Ranking(method=method, order=tuple(int(i) for i in order),
                   scores=() if scores is None else tuple(float(v) for v in scores),
                   curve=tuple(float(v) for v in cur))
