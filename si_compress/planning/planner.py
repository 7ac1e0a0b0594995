"""The SI planner: pure functions from measured SI curves to a CompressionPlan.

Inputs are plain data: the per-layer analysis (SI of every block output), the model structure
(blocks, prunable convs, MACs per filter) and a filter ranking with its prefix-SI curve per conv.

Decisions
- Block gain: g_b = SI(block output) - SI(block input) for a residual section; for a
  concatenation branch, SI(parent output) - SI(parent output without the branch's channels); for a
  section that changes the map's shape, SI(block output) - SI(post(shortcut(input))), same shape and
  pooling (``pipeline.shortcut_si``). In threshold mode a section whose gain is confidently <=
  ``drop_gain`` (gain + ``drop_z`` standard errors, ``gain_se``, on ``gain_samples``) does not raise
  SI and is dropped (a residual section is replaced by its shortcut; a branch goes with its
  channels; one branch of each concatenation stays).
- Residual streams (units with ``coupled`` writers): one width per stream, ranked by the SI at the
  stage output; a channel saves the MACs of every writer and reader still present (sections already
  dropped are netted out), and its SI loss is weighted by the summed gains of the sections it feeds.
- Width of a conv (threshold mode): the shortest prefix k of its ranking whose SI reaches
  (1 - delta) * max_k SI(top-k), rounded up to a multiple of ``round_to``.
- Budget mode (``target_macs`` = fraction of the base MACs to keep): start from the full model and
  repeatedly take the cheapest move per MAC saved until the budget is met, where the cost of a
  move is the separation it loses, in units of block gain:
    remove ``round_to`` filters of conv b:  g_b * (E_b[k] - E_b[k - step]) / E_b[C]
    drop block b (k filters left):          g_b * E_b[k] / E_b[C]
  with E_b the running max of b's prefix-SI curve (best SI with <= k filters) and g_b clipped
  at a small positive floor. Widths and drops thus come from the SI curves, not a uniform ratio.
  ``objective`` says what "saved" means: MACs (default), measured seconds of the block at each
  width (a latency table from ``si_compress.latency``), or the mean of the two fractions; the
  stop rule is always the MACs budget. Widths move in steps of ``round_to`` and never go below
  ``min_keep`` (default ``round_to``): below that only dropping the block remains.
  ``target_params`` adds a size budget (fraction of the parameters to keep): moves go on until
  both budgets hold, and "saved" is the sum of the fractions saved of each budget still unmet
  (once the MACs fit, the cheapest SI loss per parameter: the wide late convs).
- Head: linear if the final features' CSI >= SI - tau (class means already separate as well as
  neighbours do); otherwise an MLP with the smallest hidden width whose hidden-layer CSI reaches SI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..plan import BlockDecision, CompressionPlan, HeadSpec, LayerDecision
from .importance import Ranking

_GAIN_FLOOR = 1e-4


@dataclass(frozen=True)
class PlannerConfig:
    target_macs: float | None = 0.5   # fraction of base MACs to keep; None = threshold mode
    target_params: float | None = None  # also keep at most this fraction of the parameters (budget mode)
    delta: float = 0.02
    drop_gain: float = 0.0
    allow_drop: bool = True
    round_to: int = 1
    min_keep: int | None = None       # fewest filters a kept conv keeps (None: round_to); below it, drop the block
    head_tau: float = 0.02
    weighting: str = "gain"           # filter-loss weight per block: "gain" (g_b) or "uniform" (mean gain)
    objective: str = "macs"           # what a move saves: "macs", "latency" (measured) or "both" (mean of fractions)
    gain_samples: int | None = None   # SI sample size: threshold drops need the gain's upper bound <= drop_gain
    drop_z: float = 1.96              # ... at this many standard errors (1.96: 95% two-sided)

    def __post_init__(self):
        if self.target_macs is not None and not (0.0 < self.target_macs <= 1.0):
            raise ValueError(f"target_macs is the fraction of MACs to keep, in (0, 1]; got {self.target_macs}")
        if not (0.0 <= self.delta < 1.0):
            raise ValueError(f"delta must be in [0, 1); got {self.delta}")
        if self.target_params is not None:
            if self.target_macs is None:
                raise ValueError("target_params is a budget: it needs target_macs (1.0 for a size budget alone)")
            if not (0.0 < self.target_params <= 1.0):
                raise ValueError(f"target_params is the fraction of parameters to keep, in (0, 1]; got "
                                 f"{self.target_params}")
        if self.objective not in ("macs", "latency", "both"):
            raise ValueError(f"objective must be 'macs', 'latency' or 'both'; got {self.objective!r}")
        if self.min_keep is None:
            object.__setattr__(self, "min_keep", self.round_to)
        if self.round_to < 1 or self.min_keep < 1:
            raise ValueError("round_to and min_keep must be >= 1")


def block_si(report_layers, blocks) -> dict[str, tuple[float, float]]:
    """(SI in, SI out) of each block from analysis records (name -> si), in network order.

    The input SI of a block is the SI of the last recorded layer before it (the stem, recorded
    as ``<first block>:input``, for the first block). Blocks without a record are left out.
    """
    si = {r.name: r.si for r in report_layers}
    names = [r.name for r in report_layers]
    out = {}
    for b in blocks:
        if b.name not in si:
            continue
        i = names.index(b.name)
        prev = next((si[names[j]] for j in range(i - 1, -1, -1)), None)
        if prev is None:
            continue
        out[b.name] = (float(prev), float(si[b.name]))
    return out


def gain_se(si_in: float, si_out: float, n: int | None) -> float:
    """Standard error of an SI gain measured on n samples: sqrt(p_in(1-p_in)/n + p_out(1-p_out)/n).

    Each SI is a mean of n per-sample 0/1 outcomes; treating the two as independent overstates the
    noise of their (positively correlated) difference, so a drop it allows is a confident one."""
    if not n:
        return 0.0
    return math.sqrt(max(si_in * (1 - si_in), 0.0) / n + max(si_out * (1 - si_out), 0.0) / n)


def _threshold_width(env: np.ndarray, delta: float, round_to: int, min_keep: int) -> int:
    target = (1.0 - delta) * env[-1]
    k = int(np.argmax(env >= target - 1e-12)) + 1
    k = int(math.ceil(k / round_to) * round_to)
    return max(min_keep, min(k, env.size))


def size_head(si: float, csi: float, *, in_features: int, num_classes: int, tau: float = 0.02,
              hidden_csi: dict[int, float] | None = None) -> HeadSpec:
    """Head from CSI (see module doc); ``hidden_csi``: hidden width -> CSI of that MLP's hidden layer."""
    if csi >= si - tau:
        return HeadSpec("linear", in_features, num_classes, si=si, csi=csi,
                        reason=f"CSI {csi:.3f} >= SI {si:.3f} - {tau}: class means already separate")
    if not hidden_csi:
        return HeadSpec("linear", in_features, num_classes, si=si, csi=csi,
                        reason=f"CSI {csi:.3f} < SI {si:.3f} - {tau} but no hidden-layer CSI measured")
    for h in sorted(hidden_csi):
        if hidden_csi[h] >= si - 1e-12:
            return HeadSpec("mlp", in_features, num_classes, hidden=int(h), si=si, csi=csi,
                            reason=f"hidden {h}: CSI {hidden_csi[h]:.3f} reaches SI {si:.3f}")
    h = max(hidden_csi, key=lambda k: (hidden_csi[k], -k))
    return HeadSpec("mlp", in_features, num_classes, hidden=int(h), si=si, csi=csi,
                    reason=f"no width reached SI {si:.3f}; best hidden-layer CSI {hidden_csi[h]:.3f} at {h}")


def plan_compression(*, arch: str, num_classes: int, structure, rankings: dict[str, Ranking],
                     gains: dict[str, tuple[float, float]], config: PlannerConfig = PlannerConfig(),
                     head: HeadSpec | None = None, truncate_after: str | None = None,
                     source: dict | None = None, latency: dict[str, tuple[float, ...]] | None = None
                     ) -> CompressionPlan:
    """Plan blocks to drop and filters to keep (see the module doc for the rules).

    ``latency`` (with ``config.objective`` "latency" or "both"): conv name -> measured seconds of its
    section with k = 0..C filters in that group (k = 0: dropped). Moves are then ranked by SI loss per
    second saved (the stop rule stays the MACs budget); seconds are scaled so that the timed sections'
    full-width time equals their share of the MACs, and a group without a table counts its MACs.
    """
    units = [u for u in structure.convs if u.conv in rankings]
    block_macs = {b.name: b.macs for b in structure.blocks}
    block_params = {b.name: b.params for b in structure.blocks}
    lat = None
    if config.objective != "macs" and latency:
        lat = {u.conv: np.asarray(latency[u.conv], dtype=np.float64) for u in units
               if u.conv in latency and len(latency[u.conv]) == u.out_channels + 1 and u.block in block_macs} or None
    # Measured seconds become MAC-equivalents: the timed sections' full-width seconds stand for their
    # MACs, so a timed move and an untimed one (its MACs fraction) are ranked on one scale.
    if lat:
        full = {}
        for u in units:
            if u.conv in lat:
                full[u.block] = max(full.get(u.block, 0.0), float(lat[u.conv][-1]))
        sec_scale = sum(block_macs[b] for b in full) / structure.total_macs / max(sum(full.values()), 1e-15)
    w_lat, w_macs = {"latency": (1.0, 0.0), "both": (0.5, 0.5)}.get(config.objective, (0.0, 1.0)) if lat else (0.0, 1.0)

    # A residual stream (u.coupled) has members in many sections: what one of its channels costs
    # shrinks as those sections are dropped, and a section's drop saves less once the stream narrows.
    branch_of = {b.name: set(b.branch) for b in structure.blocks}

    def _in(name, b):  # a member goes with a dropped section only when it is in the section's branch
        return name in branch_of.get(b, ())

    def mpf(u):
        if not u.shares:
            return u.macs_per_filter
        return u.macs_per_filter - sum(m for n, m in u.shares if any(_in(n, b) for b in dropped))

    def block_now(b):
        inner = sum((v.out_channels - width[v.conv]) * v.macs_per_filter for v in units if v.block == b)
        stream = sum((v.out_channels - width[v.conv]) * m for v in units for n, m in v.shares if _in(n, b))
        return block_macs[b] - inner - stream

    def block_params_now(b):
        return block_params[b] - sum((v.out_channels - width[v.conv]) * v.params_per_filter
                                     for v in units if v.block == b)

    def _saved(u, k_from, k_to, need_macs=True, need_params=False):
        """Resource saved by taking conv u from k_from to k_to filters (k_to = 0: block dropped): the
        fraction of the MACs (or measured seconds) saved while the MACs budget is unmet, plus the
        fraction of the parameters saved while a parameter budget is unmet."""
        if k_to == 0 and u.block in block_macs:  # a drop saves the whole branch as it stands now
            macs = block_now(u.block) / structure.total_macs
            params = block_params_now(u.block) / max(structure.total_params, 1)
        else:
            macs = ((k_from - k_to) * mpf(u)) / structure.total_macs
            params = (k_from - k_to) * u.params_per_filter / max(structure.total_params, 1)
        secs = (lat[u.conv][k_from] - lat[u.conv][k_to]) * sec_scale if lat and u.conv in lat else macs
        return (w_macs * macs + w_lat * secs if need_macs else 0.0) + (params if need_params else 0.0)
    width = {u.conv: u.out_channels for u in units}
    env = {u.conv: rankings[u.conv].envelope() for u in units}
    for u in units:
        if env[u.conv].size != u.out_channels:
            raise ValueError(f"ranking of {u.conv} has a curve of {env[u.conv].size} points for "
                             f"{u.out_channels} filters; rank with curve=True")
    gain = {b: max(g[1] - g[0], _GAIN_FLOOR) for b, g in gains.items()}
    mean_gain = float(np.mean(list(gain.values()))) if gain else _GAIN_FLOOR
    wgain = gain if config.weighting == "gain" else {b: mean_gain for b in gain}
    # A stream carries the separation of every section it runs through: its SI loss is weighted by
    # the sum of the gains of those still there (a block's inner conv, by its own block's gain).
    stream_secs = {u.conv: {b.name for b in structure.blocks if any(_in(n, b.name) for n, _ in u.shares)}
                   for u in units if u.coupled}
    dropped: list[str] = []
    reasons: dict[str, str] = {}
    base = structure.total_macs
    step = config.round_to
    # A concatenation whose every operand is a droppable branch must keep one of them.
    siblings = {}
    for b in structure.blocks:
        if getattr(b, "needs_one", False):
            siblings.setdefault(b.parent, []).append(b.name)

    def may_drop(name: str) -> bool:
        for group in siblings.values():
            if name in group and all(o in dropped for o in group if o != name):
                return False
        return True

    def macs_now() -> int:
        m = base
        for u in units:
            if u.block in dropped:
                continue
            m -= (u.out_channels - width[u.conv]) * mpf(u)
        for b in dropped:
            m -= block_macs[b]
        return m

    def params_now() -> int:
        # a stream's params_per_filter counts every member, also those of dropped sections (an
        # over-estimate of what a narrower stream saves once sections are gone: never under budget)
        p = structure.total_params
        for u in units:
            if u.block in dropped:
                continue
            p -= (u.out_channels - width[u.conv]) * u.params_per_filter
        for b in dropped:
            p -= block_params[b]
        return p

    def weight_of(u):
        # A group's separation is weighted by the SI gain of its section, else of the recorded
        # module holding it (an inception block, a stage); a stream by the gains it carries;
        # plain chains use the mean gain.
        if u.conv in stream_secs:
            return sum(wgain.get(b, mean_gain) for b in stream_secs[u.conv] if b not in dropped) or mean_gain
        where = u.block or getattr(u, "scope", None)
        return wgain.get(where, mean_gain) if where else mean_gain

    if config.allow_drop and config.target_macs is None:
        # Threshold mode drops every section that does not raise SI; with a budget, such sections
        # compete with the other moves (their loss is at the gain floor, so they go first) and the
        # budget decides how many go.
        for b, (si_in, si_out) in gains.items():
            half = config.drop_z * gain_se(si_in, si_out, config.gain_samples)
            if b in block_macs and si_out - si_in + half <= config.drop_gain and may_drop(b):
                dropped.append(b)
                reasons[b] = f"SI gain {si_out - si_in:+.4f}" + (f" +- {half:.4f}" if half else "") + \
                    f" <= {config.drop_gain}"
            elif b in block_macs and si_out - si_in <= config.drop_gain:
                reasons[b] = f"kept: SI gain {si_out - si_in:+.4f} +- {half:.4f} is not confidently <= {config.drop_gain}"

    if config.target_macs is None:
        for u in units:
            width[u.conv] = _threshold_width(env[u.conv], config.delta, step, config.min_keep)
            reasons[u.conv] = f"shortest prefix reaching {(1 - config.delta):.2f} x max SI {env[u.conv][-1]:.3f}"
    else:
        target = config.target_macs * base
        ptarget = None if config.target_params is None else config.target_params * structure.total_params
        while macs_now() > target or (ptarget is not None and params_now() > ptarget):
            now = macs_now()
            need = dict(need_macs=now > target, need_params=ptarget is not None and params_now() > ptarget)
            cands = []  # (cost per resource, kind order, name, new width, MACs after the move)
            for u in units:
                if u.block in dropped:
                    continue
                e, k = env[u.conv], width[u.conv]
                g = gain.get(u.block, _GAIN_FLOOR) if u.block else _GAIN_FLOOR
                wg = weight_of(u)
                top = e[-1] if e[-1] > 0 else 1.0
                new_k = max(config.min_keep, ((k - 1) // step) * step if k % step == 0 else (k // step) * step)
                if new_k < k:
                    loss = wg * (e[k - 1] - e[new_k - 1]) / top
                    cands.append((loss / max(_saved(u, k, new_k, **need), 1e-15), 0, u.conv, new_k,
                                  now - (k - new_k) * mpf(u)))
                if config.allow_drop and u.block in gain and u.block in block_macs and may_drop(u.block):
                    if k * u.macs_per_filter > 0:
                        cands.append((g * e[k - 1] / top / max(_saved(u, k, 0, **need), 1e-15), 1, u.block, None,
                                      now - block_now(u.block)))
            if not cands:
                break
            _, kind, name, new_k, _ = min(cands, key=lambda c: c[:3])
            if kind == 0:
                width[name] = new_k
            else:
                dropped.append(name)
                reasons[name] = f"lowest SI loss per MAC (gain {gains[name][1] - gains[name][0]:+.4f})"
        # The last move may land well below the budget (a section drop): give filters back where
        # they separate the most per MAC, as long as the budget still holds.
        while True:
            now, adds = macs_now(), []
            pnow = params_now()
            for u in units:
                if u.block in dropped or width[u.conv] >= u.out_channels:
                    continue
                e, k = env[u.conv], width[u.conv]
                new_k = min(u.out_channels, (k // step + 1) * step)
                wg = weight_of(u)
                top = e[-1] if e[-1] > 0 else 1.0
                cost = (new_k - k) * mpf(u)
                if now + cost <= target and (ptarget is None or pnow + (new_k - k) * u.params_per_filter <= ptarget):
                    adds.append((-wg * (e[new_k - 1] - e[k - 1]) / top / max(cost, 1), u.conv, new_k))
            if not adds:
                break
            _, name, new_k = min(adds)
            width[name] = new_k
        for u in units:
            if u.block not in dropped:
                reasons[u.conv] = (f"budget {config.target_macs:.2f} x MACs"
                                   + (f", {config.target_params:.2f} x params" if config.target_params else "")
                                   + f": keeps {width[u.conv]} filters, "
                                   f"SI {env[u.conv][width[u.conv] - 1]:.3f} of max {env[u.conv][-1]:.3f}")

    layers = []
    for u in units:
        if u.block in dropped:
            continue
        r = rankings[u.conv]
        keep = tuple(sorted(r.order[:width[u.conv]]))
        name, coupled = u.conv, tuple(u.coupled)
        if coupled:
            if len(keep) == u.out_channels:
                continue  # a stream kept whole needs no decision
            # the stream is named by a writer that survives the drops; the others are listed with it
            alive = [n for n in (u.conv, *u.coupled) if not any(_in(n, b) for b in dropped)]
            if not alive:
                continue
            name, coupled = alive[0], tuple(alive[1:])
        layers.append(LayerDecision(name=name, out_channels=u.out_channels, keep=keep, ranking=r.order,
                                    curve=r.curve, method=r.method, reason=reasons.get(u.conv, ""),
                                    coupled=coupled))
    blocks = tuple(BlockDecision(name=b.name, si_in=gains[b.name][0], si_out=gains[b.name][1], macs=b.macs,
                                 dropped=b.name in dropped, reason=reasons.get(b.name, ""))
                   for b in structure.blocks if b.name in gains)
    params = params_now()
    return CompressionPlan(
        arch=arch, num_classes=num_classes, layers=tuple(layers), blocks=blocks,
        dropped_blocks=tuple(b.name for b in structure.blocks if b.name in dropped),
        truncate_after=truncate_after, head=head,
        predicted=dict(base_macs=int(base), macs=int(macs_now()), base_params=int(structure.total_params),
                       params=int(params)),
        settings=dict(target_macs=config.target_macs, target_params=config.target_params, delta=config.delta, drop_gain=config.drop_gain,
                      allow_drop=config.allow_drop, round_to=config.round_to, min_keep=config.min_keep,
                      head_tau=config.head_tau, ranking=sorted({r.method for r in rankings.values()}),
                      weighting=config.weighting, objective=config.objective if lat else "macs",
                      **({"latency_units": len(lat)} if lat else {})),
        source=dict(source or {}),
    )


def plan_uniform(*, arch: str, num_classes: int, structure, rankings: dict[str, Ranking], target_macs: float,
                 round_to: int = 1, min_keep: int = 1) -> CompressionPlan:
    """Baseline: the same keep ratio for every prunable conv, the largest meeting ``target_macs``."""
    units = [u for u in structure.convs if u.conv in rankings]
    base = structure.total_macs

    def widths(ratio):
        return {u.conv: max(min_keep, int(math.ceil(u.out_channels * ratio / round_to) * round_to)) for u in units}

    def macs(w):
        return base - sum((u.out_channels - min(w[u.conv], u.out_channels)) * u.macs_per_filter for u in units)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if macs(widths(mid)) <= target_macs * base:
            lo = mid
        else:
            hi = mid
    w = widths(lo)
    layers = tuple(LayerDecision(name=u.conv, out_channels=u.out_channels,
                                 keep=tuple(sorted(rankings[u.conv].order[:min(w[u.conv], u.out_channels)])),
                                 ranking=rankings[u.conv].order, method=rankings[u.conv].method,
                                 reason=f"uniform keep ratio {lo:.3f}", coupled=tuple(u.coupled)) for u in units
                   if not (u.coupled and w[u.conv] >= u.out_channels))
    return CompressionPlan(arch=arch, num_classes=num_classes, layers=layers,
                           predicted=dict(base_macs=int(base), macs=int(macs(w))),
                           settings=dict(uniform_ratio=lo, target_macs=target_macs))


def plan_with_widths(reference: CompressionPlan, rankings: dict[str, Ranking]) -> CompressionPlan:
    """Baseline: the same per-layer budgets (and dropped blocks) as ``reference``, other rankings.
    ``rankings`` is keyed by conv name; a stream is found under any of its writers."""
    layers = []
    for d in reference.layers:
        r = next((rankings[n] for n in (d.name, *d.coupled) if n in rankings), None)
        if r is None:
            raise ValueError(f"no ranking for {d.name!r}")
        layers.append(LayerDecision(name=d.name, out_channels=d.out_channels,
                                    keep=tuple(sorted(r.order[:len(d.keep)])), ranking=r.order, method=r.method,
                                    reason=f"same width as the {d.method} plan", coupled=d.coupled))
    return CompressionPlan(arch=reference.arch, num_classes=reference.num_classes, layers=tuple(layers),
                           blocks=reference.blocks, dropped_blocks=reference.dropped_blocks,
                           truncate_after=reference.truncate_after, head=reference.head,
                           predicted=dict(reference.predicted), settings=dict(reference.settings,
                                                                             ranking=[layers[0].method] if layers else []))
