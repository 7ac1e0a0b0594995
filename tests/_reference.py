"""O(n^2) pure-Python oracle for the SI family, written for clarity, not speed."""
from __future__ import annotations

import math


def _dist(a, b):
    return math.fsum((float(x) - float(y)) ** 2 for x, y in zip(a, b))


def neighbors(X, i, r):
    """The r nearest other samples of i: sorted by (distance, index), i excluded by index."""
    others = [(_dist(X[i], X[j]), j) for j in range(len(X)) if j != i]
    return [j for _, j in sorted(others)[:r]]


def si(X, y, order=1, soft=False):
    scores = []
    for i in range(len(X)):
        same = [y[j] == y[i] for j in neighbors(X, i, order)]
        scores.append(sum(same) / order if soft else float(all(same)))
    return sum(scores) / len(scores)


def csi(X, y):
    classes = sorted(set(y))
    centers = {}
    for c in classes:
        rows = [X[i] for i in range(len(X)) if y[i] == c]
        centers[c] = [math.fsum(col) / len(rows) for col in zip(*rows)]
    hits = 0
    for i in range(len(X)):
        best = min(classes, key=lambda c: (_dist(X[i], centers[c]), classes.index(c)))
        hits += best == y[i]
    return hits / len(X)


def cross_si(R, yr, Q, yq, order=1):
    hits = 0
    for q in range(len(Q)):
        near = sorted((_dist(Q[q], R[j]), j) for j in range(len(R)))[:order]
        hits += all(yr[j] == yq[q] for _, j in near)
    return hits / len(Q)
