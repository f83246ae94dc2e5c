"""Router evaluation metrics, pure Python (no numpy, no torch), so tests and tools can use them
anywhere.

Definitions (RouteLLM's, generalised to N tiers by cost):

* A router is a family of policies indexed by one knob. Each policy sends every prompt to a tier;
  its **cost** is the mean price of the tiers chosen and its **quality** the mean correctness of
  the tier chosen for each prompt.
* **Call fraction** ``c`` = (cost − cost of all-cheapest) / (cost of all-strongest − cost of
  all-cheapest). With two tiers this is exactly the fraction of calls sent to the strong tier,
  whatever the prices; with N tiers it is the cost-weighted share of the spend range.
* **PGR(c)** = (quality(c) − quality(all-cheapest)) / (quality(all-strongest) − quality(all-cheapest)).
  It is not capped: a router that keeps the prompts the strongest tier gets wrong on a cheaper
  tier that gets them right can exceed 1.
* **APGR** = ∫₀¹ PGR(c) dc over the piecewise-linear curve through every distinct policy
  (trapezoids). A random router has APGR 0.5 in expectation; a constant score gives exactly 0.5
  (tied prompts move together, which is the expectation over random tie-breaking).
* **CPT(x)** = the smallest c at which PGR reaches x (linear interpolation between points).
* **AUC** = ROC AUC of the score against the binary label "a more expensive tier is needed"
  (ties count one half). Note RouteLLM's code also uses "AUC" for the area under the quality
  curve; here that area is APGR's numerator and AUC is the classifier's ROC AUC.
* **cost saved at 95%** = 1 − cost / cost(all-strongest) at the cheapest point of the curve whose
  quality reaches 95% of the strongest tier's quality.

The N-tier policy family: the ordinal model gives, for each prompt, ``p[k]`` = P(a tier above k
is needed), non-increasing in k. With threshold t a prompt climbs from the cheapest tier while
``p[k] >= t``. Sweeping t from 1 down to 0 moves each prompt up one tier at each of its
``p[k]``; sorting those events by p gives the whole curve exactly. With two tiers this is the
usual "send the top-scored fraction to the strong model".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

__all__ = [
    "CurvePoint",
    "RouterReport",
    "apgr",
    "cpt",
    "quality_curve",
    "report",
    "roc_auc",
    "two_tier_probs",
]


@dataclass(frozen=True)
class CurvePoint:
    """One routing policy on the cost–quality curve."""

    threshold: float  # the score threshold that yields this policy (+inf: all cheapest)
    call_fraction: float  # cost-normalised strong-call fraction in [0, 1]
    cost: float  # mean price per prompt
    quality: float  # mean correctness
    pgr: float


@dataclass
class RouterReport:
    """The metrics of one router on one labelled set (fractions, not percents)."""

    n: int
    tiers: list[str]
    prices: list[float]
    auc: float
    apgr: float
    cpt50: float
    cpt80: float
    cost_saved_at_95: float
    call_fraction_at_95: float
    quality_by_tier: dict[str, float]
    curve: list[CurvePoint] = field(repr=False)

    def as_dict(self, curve: bool = False) -> dict:
        d = {
            "n": self.n,
            "tiers": self.tiers,
            "prices": self.prices,
            "auc": _round(self.auc),
            "apgr": _round(self.apgr),
            "cpt50": _round(self.cpt50),
            "cpt80": _round(self.cpt80),
            "cost_saved_at_95": _round(self.cost_saved_at_95),
            "call_fraction_at_95": _round(self.call_fraction_at_95),
            "quality_by_tier": {k: _round(v) for k, v in self.quality_by_tier.items()},
        }
        if curve:
            d["curve"] = [
                {"call_fraction": _round(p.call_fraction), "quality": _round(p.quality), "pgr": _round(p.pgr)}
                for p in _thin(self.curve, 201)
            ]
        return d


def _round(x: float) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), 6)


def _thin(points: list[CurvePoint], k: int) -> list[CurvePoint]:
    if len(points) <= k:
        return points
    step = (len(points) - 1) / (k - 1)
    return [points[round(i * step)] for i in range(k)]


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (Mann–Whitney; ties count 1/2).

    NaN when one class is absent.
    """
    if len(scores) != len(labels):
        raise ValueError("scores and labels differ in length")
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum = 0.0
    i = 0
    n = len(order)
    while i < n:
        j = i
        while j + 1 < n and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg_rank = (i + j) / 2 + 1  # 1-based mid-rank of the tie group
        rank_sum += avg_rank * sum(1 for k in range(i, j + 1) if labels[order[k]])
        i = j + 1
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def two_tier_probs(scores: Sequence[float]) -> list[list[float]]:
    """Wrap one score per prompt as the ``probs`` argument of :func:`quality_curve` (two tiers)."""
    return [[float(s)] for s in scores]


def quality_curve(
    probs: Sequence[Sequence[float]],
    correct: Sequence[Sequence[float]],
    prices: Sequence[float],
) -> list[CurvePoint]:
    """The router's cost–quality curve, one point per distinct threshold.

    ``probs[i][k]`` is P(prompt i needs a tier above k), k = 0..K-2 (made non-increasing in k
    here); ``correct[i][k]`` the correctness (0/1 or a quality in [0, 1]) of tier k on prompt i;
    ``prices[k]`` the price of tier k, cheapest first. The first point is all-cheapest, the last
    all-strongest.
    """
    n = len(correct)
    if n == 0:
        raise ValueError("no prompts to evaluate")
    K = len(prices)
    if K < 2:
        raise ValueError("need at least two tiers")
    if any(prices[k] > prices[k + 1] for k in range(K - 1)):
        raise ValueError("tiers must be ordered cheapest first")
    if len(probs) != n:
        raise ValueError("probs and correct differ in length")
    events: list[tuple[float, int, int]] = []  # (p, prompt, step k -> k+1)
    for i in range(n):
        p = probs[i]
        if len(p) != K - 1 or len(correct[i]) != K:
            raise ValueError(f"prompt {i}: expected {K - 1} probabilities and {K} correctness values")
        running = math.inf
        for k in range(K - 1):
            running = min(running, float(p[k]))
            events.append((running, i, k))
    # Highest p first; for equal p, lower tiers first so every prompt climbs in order.
    events.sort(key=lambda e: (-e[0], e[2], e[1]))
    q = sum(c[0] for c in correct) / n
    cost = prices[0]
    q_lo = q
    q_hi = sum(c[K - 1] for c in correct) / n
    c_lo, c_hi = prices[0], prices[K - 1]
    gap = q_hi - q_lo
    span = c_hi - c_lo

    def point(t: float) -> CurvePoint:
        frac = (cost - c_lo) / span if span > 0 else 0.0
        pgr = (q - q_lo) / gap if gap != 0 else float("nan")
        return CurvePoint(t, min(1.0, max(0.0, frac)), cost, q, pgr)

    curve = [point(math.inf)]
    j = 0
    while j < len(events):
        t = events[j][0]
        while j < len(events) and events[j][0] == t:
            _, i, k = events[j]
            q += (correct[i][k + 1] - correct[i][k]) / n
            cost += (prices[k + 1] - prices[k]) / n
            j += 1
        curve.append(point(t))
    # Pin the end exactly (no float drift): all-strongest.
    last = curve[-1]
    curve[-1] = CurvePoint(last.threshold, 1.0 if span > 0 else 0.0, c_hi, q_hi, 1.0 if gap != 0 else float("nan"))
    return curve


def apgr(curve: Sequence[CurvePoint]) -> float:
    """Area under PGR over the call fraction [0, 1] (trapezoids through every point)."""
    area = 0.0
    for a, b in pairwise(curve):
        area += (b.call_fraction - a.call_fraction) * (a.pgr + b.pgr) / 2
    return area


def cpt(curve: Sequence[CurvePoint], target: float) -> float:
    """Smallest call fraction at which PGR reaches ``target`` (interpolated); 1.0 if never before the end."""
    if curve[0].pgr >= target:
        return curve[0].call_fraction
    for a, b in pairwise(curve):
        if b.pgr >= target:
            if b.pgr == a.pgr:
                return b.call_fraction
            w = (target - a.pgr) / (b.pgr - a.pgr)
            return a.call_fraction + w * (b.call_fraction - a.call_fraction)
    return 1.0


def _cost_at_quality(curve: Sequence[CurvePoint], q_target: float) -> tuple[float, float]:
    """(cost, call fraction) of the cheapest point (interpolated) whose quality reaches q_target."""
    if curve[0].quality >= q_target:
        return curve[0].cost, curve[0].call_fraction
    for a, b in pairwise(curve):
        if b.quality >= q_target:
            if b.quality == a.quality:
                return b.cost, b.call_fraction
            w = (q_target - a.quality) / (b.quality - a.quality)
            return a.cost + w * (b.cost - a.cost), a.call_fraction + w * (b.call_fraction - a.call_fraction)
    return curve[-1].cost, curve[-1].call_fraction


def report(
    probs: Sequence[Sequence[float]],
    correct: Sequence[Sequence[float]],
    tiers: Sequence[str],
    prices: Sequence[float],
) -> RouterReport:
    """All metrics of a router given its per-prompt probabilities and the tiers' correctness."""
    curve = quality_curve(probs, correct, prices)
    K = len(tiers)
    n = len(correct)
    # "A tier above the cheapest is needed": the cheapest tier is wrong and some tier is right.
    labels = [(not correct[i][0]) and any(correct[i][k] for k in range(1, K)) for i in range(n)]
    auc = roc_auc([float(p[0]) for p in probs], labels)
    q_strong = curve[-1].quality
    cost95, frac95 = _cost_at_quality(curve, 0.95 * q_strong)
    saved = 1.0 - cost95 / prices[-1] if prices[-1] > 0 else float("nan")
    return RouterReport(
        n=n,
        tiers=list(tiers),
        prices=[float(p) for p in prices],
        auc=auc,
        apgr=apgr(curve),
        cpt50=cpt(curve, 0.5),
        cpt80=cpt(curve, 0.8),
        cost_saved_at_95=saved,
        call_fraction_at_95=frac95,
        quality_by_tier={t: sum(c[k] for c in correct) / n for k, t in enumerate(tiers)},
        curve=curve,
    )
