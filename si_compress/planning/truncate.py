"""Where to cut a plain chain: the SI peak (a pure function of the per-layer SI curve).

For a plain network (no removable sections; ``structure.describe(...).chain`` lists its recorded
layers in order), layers after the point where separation stops growing add MACs without separating the classes
better. :func:`choose_truncation` picks that point from per-layer analysis records:

Rule
    Candidates are the chain's recorded layers (``chain``: module names, in network order). The reference is the maximum SI over ALL records (candidates and any later
    record such as ``classifier:input``, the pooled features the old head reads). The cut is the
    FIRST candidate whose SI is within ``tol`` of that maximum:

        cut = first c in chain with SI(c) >= max_l SI(l) - tol        (absolute tolerance)

    If that candidate is the last activation of the chain (or the peak lies only after the
    chain), nothing is cut (``truncate_after=None``): only pooling would be removed.

Format of ``truncate_after``
    The name of a module the model runs once (``"features.23"``, ``"block3"``); the executor
    (``si_compress.structure.truncate_at``) keeps the forward up to that module's output (kept
    modules keep their names), then global average pooling and a new Linear head on its channels.

SI of a layer is measured on that layer's (possibly pooled) feature map, whereas the new head
reads the globally average-pooled map; the pipeline therefore also measures the SI/CSI of the
truncated model's head input and sizes the head from those.

MACs saved = total MACs - cumulative MACs at the cut (records carry cumulative MACs up to and
including the layer, as ``analysis.LayerRecord`` does); this includes the old head and leaves out
the new head's ``channels x classes`` MACs (negligible next to a conv layer).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["TruncationDecision", "choose_truncation"]


@dataclass(frozen=True)
class TruncationDecision:
    """The cut and its evidence. ``truncate_after`` is None when nothing is cut.

    ``layer``: the chosen candidate (the SI peak within ``tol``); ``peak_layer``: where the
    maximum SI itself lies (may be later than ``layer``); ``macs_*``: MACs per image.
    """

    truncate_after: str | None
    layer: str
    si_at_cut: float
    max_si: float
    peak_layer: str
    tol: float
    macs_at_cut: int
    total_macs: int
    macs_saved: int
    candidates: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["candidates"] = list(self.candidates)
        return d


def _field(rec, key):
    return rec[key] if isinstance(rec, dict) else getattr(rec, key)


def choose_truncation(records: Sequence, *, chain: Sequence[str] | None = None, total_macs: int | None = None,
                      tol: float = 0.01) -> TruncationDecision:
    """Pick the layer after which a plain chain is cut (see the module doc for the rule).

    ``records``: per-layer records in network order with ``name``, ``si`` and cumulative ``macs``
    (``analysis.LayerRecord`` objects or dicts). ``chain``: the activation names that may be cut
    after (default: every record that names a module, i.e. without ``":"``); each must be a record name.
    ``total_macs``: MACs of the whole model (default: the largest record's cumulative MACs).
    ``tol``: absolute SI tolerance, in [0, 1).
    """
    if not (0.0 <= float(tol) < 1.0):
        raise ValueError(f"tol is an absolute SI tolerance in [0, 1); got {tol!r}")
    recs = list(records)
    if not recs:
        raise ValueError("choose_truncation needs at least one layer record")
    names = [str(_field(r, "name")) for r in recs]
    si = {n: float(_field(r, "si")) for n, r in zip(names, recs)}
    macs = {n: int(_field(r, "macs")) for n, r in zip(names, recs)}
    if chain is None:
        chain = [n for n in names if ":" not in n]
    chain = list(chain)
    for c in chain:
        if c not in si:
            raise ValueError(f"chain layer {c!r} has no SI record; records: {names}")
    order = sorted(chain, key=names.index)
    if order != chain:
        raise ValueError("chain layers must be listed in network order")
    total = int(total_macs) if total_macs is not None else max(macs.values())
    max_si = max(si.values())
    peak = next(n for n in names if si[n] == max_si)
    if not chain:
        return TruncationDecision(None, peak, max_si, max_si, peak, float(tol), macs[peak], total, 0, (),
                                  "no chain layers to cut after")
    cut = next((c for c in chain if si[c] >= max_si - tol), None)
    if cut is None or cut == chain[-1]:
        where = cut or peak
        return TruncationDecision(
            None, where, si[where], max_si, peak, float(tol), macs[where], total, 0, tuple(chain),
            f"SI peaks at the end of the chain ({where}: {si[where]:.4f}, max {max_si:.4f} at {peak}, tol {tol})")
    saved = max(0, total - macs[cut])
    return TruncationDecision(
        cut, cut, si[cut], max_si, peak, float(tol), macs[cut], total, saved, tuple(chain),
        f"first layer within {tol} of the max SI {max_si:.4f} ({peak}): {cut} SI {si[cut]:.4f}; "
        f"cutting after it saves {saved:,} of {total:,} MACs ({100 * saved / max(total, 1):.1f}%)")
