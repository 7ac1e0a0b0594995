"""CompressionPlan: what to remove from a model, and the evidence behind each decision.

A plan is plain data (frozen dataclasses <-> versioned JSON); the planner writes it, a user may
edit it, and the executor (``si_compress.compress``) applies it to the original model:

- ``dropped_blocks``: removable sections (``structure.describe(...).blocks``): a residual section
  replaced by its shortcut (identity, projection or the parameter-free option-A shortcut), or a
  concatenation branch (inception branch, dense layer) removed with its channels;
- ``truncate_after``: for a plain chain, the module after which the forward is cut (a module name
  such as ``"features.23"``; ``None``: no truncation); a new head is
  attached to that layer's pooled output (the SI planner cuts after the SI peak, see
  ``planning/truncate.py``);
- ``layers``: per conv, the output filters to keep (sorted indices into the original filters);
  a conv not listed is kept whole;
- ``head``: ``linear`` (keep or re-fit one Linear) or ``mlp`` with one hidden layer of ``hidden``;
- ``predicted``: parameters and MACs per image of the base and of the planned model.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field

SCHEMA = "si_compress.plan"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerDecision:
    """Filters kept in one conv (``name``: module name, e.g. ``layer1.0.conv1``)."""

    name: str
    out_channels: int
    keep: tuple[int, ...]
    ranking: tuple[int, ...] = ()        # filter indices, most important first
    curve: tuple[float, ...] = ()        # SI of the top-k ranked filters, k = 1..len(curve)
    method: str = "si"                   # how filters were ranked: si, si-greedy, l1, random, ...
    reason: str = ""
    coupled: tuple[str, ...] = ()        # a residual stream: the other convs writing these channels, pruned alike

    def __post_init__(self):
        # A float (0.5) or a string ("1") is a mistake in an edited plan, not a filter index: int()
        # would silently turn it into another filter.
        bad = [i for i in self.keep if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
        if bad:
            raise ValueError(f"layer {self.name}: keep must list filter indices (integers); got {bad[0]!r}")
        keep = tuple(int(i) for i in self.keep)
        if not keep:
            raise ValueError(f"layer {self.name}: a plan must keep at least one filter")
        if list(keep) != sorted(set(keep)):
            raise ValueError(f"layer {self.name}: keep must be sorted unique filter indices")
        if keep[0] < 0 or keep[-1] >= self.out_channels:
            raise ValueError(f"layer {self.name}: keep indices must lie in [0, {self.out_channels})")
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "ranking", tuple(int(i) for i in self.ranking))
        object.__setattr__(self, "curve", tuple(float(v) for v in self.curve))
        if isinstance(self.coupled, str) or not all(isinstance(c, str) for c in self.coupled):
            raise ValueError(f"layer {self.name}: coupled must list module names; got {self.coupled!r}")
        object.__setattr__(self, "coupled", tuple(self.coupled))

    @property
    def removed(self) -> tuple[int, ...]:
        kept = set(self.keep)
        return tuple(i for i in range(self.out_channels) if i not in kept)


@dataclass(frozen=True)
class BlockDecision:
    """A residual block (or plain-chain layer) scored by the SI it adds."""

    name: str
    si_in: float
    si_out: float
    macs: int
    dropped: bool
    reason: str = ""

    @property
    def gain(self) -> float:
        return self.si_out - self.si_in


@dataclass(frozen=True)
class HeadSpec:
    """Classifier head: ``linear`` (in_features -> num_classes) or ``mlp`` (-> hidden -> classes)."""

    kind: str
    in_features: int
    num_classes: int
    hidden: int | None = None
    si: float | None = None
    csi: float | None = None
    reason: str = ""

    def __post_init__(self):
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"head kind must be 'linear' or 'mlp'; got {self.kind!r}")
        if self.kind == "mlp" and (self.hidden is None or self.hidden < 1):
            raise ValueError("an mlp head needs hidden >= 1")


@dataclass(frozen=True)
class CompressionPlan:
    arch: str
    num_classes: int
    layers: tuple[LayerDecision, ...] = ()
    blocks: tuple[BlockDecision, ...] = ()
    dropped_blocks: tuple[str, ...] = ()
    truncate_after: str | None = None
    head: HeadSpec | None = None
    predicted: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        names = [d.name for d in self.layers]
        if len(names) != len(set(names)):
            raise ValueError("a plan lists a layer twice")
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "dropped_blocks", tuple(self.dropped_blocks))

    def layer(self, name: str) -> LayerDecision | None:
        return next((d for d in self.layers if d.name == name), None)

    def keep_map(self) -> dict[str, tuple[int, ...]]:
        return {d.name: d.keep for d in self.layers}

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionPlan":
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ValueError("not an si_compress compression plan (missing schema 'si_compress.plan'); "
                             "produce one with si-compress or si-analyze")
        version = d.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise ValueError(f"plan schema_version {version!r} is not supported (this si_compress reads version "
                             f"{SCHEMA_VERSION}); make the plan again with this version's si-compress")
        try:
            head = d.get("head")
            return cls(
                arch=d["arch"], num_classes=int(d["num_classes"]),
                layers=tuple(LayerDecision(**{**x, "keep": tuple(x["keep"]), "ranking": tuple(x.get("ranking", ())),
                                              "curve": tuple(x.get("curve", ()))}) for x in d.get("layers", ())),
                blocks=tuple(BlockDecision(**x) for x in d.get("blocks", ())),
                dropped_blocks=tuple(d.get("dropped_blocks", ())),
                truncate_after=d.get("truncate_after"),
                head=None if head is None else HeadSpec(**head),
                predicted=dict(d.get("predicted", {})), settings=dict(d.get("settings", {})),
                source=dict(d.get("source", {})),
            )
        except KeyError as exc:
            raise ValueError(f"malformed compression plan: entry {exc} is missing") from None
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"malformed compression plan: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "CompressionPlan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(d)

    def save(self, path) -> "Path":
        """Write the plan as JSON, atomically (what ``si-compress --plan`` reads)."""
        from ._io import write_text

        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path) -> "CompressionPlan":
        """Read a plan written by :meth:`save` or si-compress; ValueError on anything else."""
        from pathlib import Path

        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"plan file {path} does not exist") from None
        return cls.from_json(text)

    # ------------------------------------------------------------------ summary
    def summary(self) -> str:
        p = self.predicted
        lines = [f"compression plan for {self.arch} ({self.num_classes} classes)"]
        if p.get("base_macs"):
            lines.append(f"  MACs   {p['base_macs'] / 1e6:8.2f} M -> {p.get('macs', 0) / 1e6:8.2f} M "
                         f"({100 * (1 - p.get('macs', 0) / p['base_macs']):.1f}% fewer)")
        if p.get("base_params"):
            lines.append(f"  params {p['base_params'] / 1e6:8.3f} M -> {p.get('params', 0) / 1e6:8.3f} M "
                         f"({100 * (1 - p.get('params', 0) / p['base_params']):.1f}% fewer)")
        if self.dropped_blocks:
            lines.append(f"  dropped blocks: {', '.join(self.dropped_blocks)}")
        if self.truncate_after:
            lines.append(f"  truncated after: {self.truncate_after}")
        for d in self.layers:
            if len(d.keep) < d.out_channels:
                lines.append(f"  {d.name:<22} keep {len(d.keep):4d}/{d.out_channels:<4d} ({d.method}) {d.reason}")
        if self.head is not None:
            h = self.head
            lines.append(f"  head: {h.kind}" + (f" hidden {h.hidden}" if h.hidden else "") + f"  {h.reason}")
        return "\n".join(lines)
