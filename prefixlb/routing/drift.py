"""Classifier drift: is the score distribution of recent traffic still the one it was trained on?

The statistic is the population stability index over the reference's deciles::

    PSI = sum_b (r_b - q_b) * ln(r_b / q_b)

with ``q_b`` the reference share of bin ``b`` (0.1 each, by construction of the deciles) and
``r_b`` the share of the last ``window`` scores (both floored at 1e-4). Rules of thumb: < 0.1
stable, 0.1-0.25 moderate shift, > 0.25 a different population. The KS statistic (largest gap
between the two empirical CDFs, at the decile edges) is reported next to it.

The reference is the training score distribution when the model ships one; otherwise the first
``warmup`` scores seen after start become the reference (``reference_source`` says which).
Memory is bounded: a ring of ``window`` floats.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from typing import Any

__all__ = ["ScoreDrift"]

_FLOOR = 1e-4


class ScoreDrift:
    """Recent classifier scores against a reference distribution (see the module docstring)."""

    def __init__(self, reference: Sequence[float] | None = None, *, warmup: int = 1000, window: int = 2000,
                 bins: int = 10) -> None:
        if warmup < bins or window < bins or bins < 2:
            raise ValueError("need bins >= 2 and warmup, window >= bins")
        self.bins = bins
        self.warmup = warmup
        self.recent: deque[float] = deque(maxlen=window)
        self.seen = 0
        self._edges: list[float] | None = None
        self._pending: list[float] = []
        self.reference_source = "none"
        if reference is not None and len(reference) >= bins:
            self._set_reference(reference, "training")

    def _set_reference(self, scores: Sequence[float], source: str) -> None:
        s = sorted(scores)
        n = len(s)
        self._edges = [s[min(n - 1, (n * b) // self.bins)] for b in range(1, self.bins)]
        self._ref_shares = self._shares(s)
        self.reference_source = source
        self._pending = []

    def _shares(self, scores) -> list[float]:
        counts = [0] * self.bins
        edges = self._edges
        assert edges is not None
        n = 0
        for x in scores:
            counts[bisect_right(edges, x)] += 1
            n += 1
        return [c / n if n else 0.0 for c in counts]

    def observe(self, score: float) -> None:
        self.seen += 1
        self.recent.append(score)
        if self._edges is None:
            self._pending.append(score)
            if len(self._pending) >= self.warmup:
                self._set_reference(self._pending, "warmup")

    def psi(self) -> float | None:
        """PSI of the recent window against the reference; None until both exist."""
        if self._edges is None or len(self.recent) < self.bins:
            return None
        r = self._shares(self.recent)
        total = 0.0
        for rb, qb in zip(r, self._ref_shares):
            rb, qb = max(rb, _FLOOR), max(qb, _FLOOR)
            total += (rb - qb) * math.log(rb / qb)
        return total

    def ks(self) -> float | None:
        """The largest gap between the recent and reference CDFs at the reference's decile edges."""
        if self._edges is None or len(self.recent) < self.bins:
            return None
        r = self._shares(self.recent)
        gap = acc_r = acc_q = 0.0
        for rb, qb in zip(r, self._ref_shares):
            acc_r += rb
            acc_q += qb
            gap = max(gap, abs(acc_r - acc_q))
        return gap

    def describe(self) -> dict[str, Any]:
        psi, ks = self.psi(), self.ks()
        n = len(self.recent)
        return {"reference": self.reference_source, "scores_seen": self.seen, "window": n,
                "recent_mean": round(sum(self.recent) / n, 4) if n else None,
                "psi": None if psi is None else round(psi, 4), "ks": None if ks is None else round(ks, 4)}
