"""Lookups on the tidy results table shared by figures and findings: (metric, layer, adapter) -> statistic."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Stat:
    """One row's numbers: value with its bootstrap CI (NaN when none) and the null it is read against."""

    value: float
    lo: float
    hi: float
    null: float
    null_name: str
    rank: int
    d: int

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def upper(self) -> float:
        """CI upper bound, or the value itself when there is no CI."""
        return self.hi if self.has_ci else self.value

    def lower(self) -> float:
        return self.lo if self.has_ci else self.value


class Tab:
    """Index over a normalised results DataFrame (see report.run.normalize_frame)."""

    def __init__(self, df):
        self.df = df
        self._idx: dict[tuple[str, int, str], Stat] = {}
        self._ranks: dict[str, int] = {}
        for r in df.itertuples(index=False):
            key = (str(r.metric), int(r.layer), str(r.adapter))
            self._idx[key] = Stat(
                float(r.value),
                float(r.ci_low),
                float(r.ci_high),
                float(r.null_value),
                str(r.null_name),
                int(r.rank),
                int(r.d) if math.isfinite(float(r.d)) else 0,
            )
            if r.adapter:
                self._ranks.setdefault(str(r.adapter), int(r.rank))

    def get(self, metric: str, layer: int, adapter: str = "") -> Stat | None:
        return self._idx.get((metric, int(layer), adapter))

    def value(self, metric: str, layer: int, adapter: str = "") -> float:
        s = self.get(metric, layer, adapter)
        return s.value if s is not None else math.nan

    def has(self, *metrics: str) -> bool:
        ms = set(metrics)
        return any(k[0] in ms for k in self._idx)

    def metrics(self, prefix: str = "") -> list[str]:
        return sorted({k[0] for k in self._idx if k[0].startswith(prefix)})

    def adapters(self) -> list[str]:
        """Adapter names ordered by LoRA rank (unknown rank -1 last), then name."""
        return sorted(self._ranks, key=lambda a: (self._ranks[a] < 0, self._ranks[a], a))

    def rank(self, adapter: str) -> int:
        return self._ranks.get(adapter, -1)

    def label(self, adapter: str) -> str:
        r = self.rank(adapter)
        return f"r{r}" if r >= 0 and adapter == f"rank_{r}" else adapter

    def layers(self, *metrics: str) -> list[int]:
        ms = set(metrics)
        return sorted({k[1] for k in self._idx if k[1] >= 0 and (not ms or k[0] in ms)})

    def cells(self, *metrics: str) -> list[tuple[int, str]]:
        """(layer, adapter) pairs with any of ``metrics``, ordered by layer then rank."""
        ms = set(metrics)
        have = {(k[1], k[2]) for k in self._idx if k[0] in ms and k[1] >= 0 and k[2]}
        order = {a: i for i, a in enumerate(self.adapters())}
        return sorted(have, key=lambda c: (c[0], order.get(c[1], 1 << 30), c[1]))
