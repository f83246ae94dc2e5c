"""What the router knows about each replica, and how that knowledge moves.

A replica is modelled as one FCFS prefill queue feeding a decode batch (vLLM's scheduler):

* **Prefill backlog** is tracked as a fluid: every dispatch adds the request's uncached prompt
  tokens; the backlog drains at the replica's prefill rate. A request's tokens sit at position
  ``end = backlog_at_dispatch + uncached``; when its first token arrives (or the response ends),
  everything up to ``end`` is known done, which corrects the fluid when the replica was faster
  than modelled. Counting tokens, not requests, is what lets one 30K-token prompt weigh as
  much as it costs.
* **Time to first token** is predicted as ``fixed + work / rate + interference`` where ``work``
  is the backlog ahead plus the request's own uncached tokens. ``fixed`` and ``1/rate`` are
  learned online from observed TTFTs by exponentially weighted least squares, regularised
  toward the configured prior, so a replica that turns out slower stops attracting work.
* **Decode interference**: every running sequence adds ``decode_s`` to each prefill step, and
  a prefill of ``work`` tokens spans ``ceil(work / step_tokens)`` steps.
* **Scraped load** (``vllm:num_requests_waiting`` / ``_running``) counts what this balancer did
  not send (other balancers, direct traffic). It is blended in with weight
  ``exp(-age / staleness)``: fresh scrapes count fully, stale ones fade out.

Everything is a pure function of the calls made on it and the ``now`` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CostParams", "ReplicaState"]


@dataclass(frozen=True, slots=True)
class CostParams:
    """Priors and constants of the cost model (per tier; from config)."""

    prefill_tokens_per_s: float = 10_000.0  # prior prefill rate of one replica
    fixed_s: float = 0.010  # prior fixed TTFT: network, tokenization, first step base
    decode_s: float = 0.0002  # added to a prefill step per running sequence
    step_tokens: int = 8192  # vLLM max_num_batched_tokens: prefill tokens per step
    staleness_s: float = 2.0  # scraped load weight decays with this time constant
    prior_weight: float = 8.0  # how many observations the prior is worth
    forget: float = 0.97  # per-observation decay of the TTFT regression


class ReplicaState:
    """The router's model of one replica (mutated by the router's hooks and by scrapes)."""

    __slots__ = (
        "id",
        "url",
        "eligible",
        "draining",
        "inflight",
        "_backlog",
        "_backlog_t",
        "_fixed",
        "_inv_rate",
        "_sw",
        "_sx",
        "_sy",
        "_sxx",
        "_sxy",
        "params",
        "scraped_waiting",
        "scraped_running",
        "scraped_kv_usage",
        "scraped_at",
        "avg_uncached",
        "capacity_tokens",
        "capacity_scale",
    )

    def __init__(self, replica_id: int, url: str = "", params: CostParams | None = None) -> None:
        self.id = replica_id
        self.url = url
        self.eligible = True  # healthy, breaker closed
        self.draining = False  # admin: no new work, in-flight finishes
        self.inflight = 0
        self.params = params or CostParams()
        self._backlog = 0.0
        self._backlog_t = 0.0
        self._fixed = self.params.fixed_s
        self._inv_rate = 1.0 / self.params.prefill_tokens_per_s
        self._sw = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self.scraped_waiting = 0.0
        self.scraped_running = 0.0
        self.scraped_kv_usage = 0.0
        self.scraped_at = -math.inf
        self.avg_uncached = 512.0
        self.capacity_tokens: int | None = None
        self.capacity_scale = 1.0

    # -- reading ---------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self.eligible and not self.draining

    @property
    def prefill_rate(self) -> float:
        return 1.0 / self._inv_rate

    @property
    def fixed_s(self) -> float:
        return self._fixed

    def backlog(self, now: float) -> float:
        """Prefill tokens ahead of a request dispatched now (own fluid + fresh scraped)."""
        own = self._backlog - self._drained(now)
        own = own if own > 0.0 else 0.0
        w = self._freshness(now)
        if w > 0.0:
            own_waiting = min(self.inflight, own / self.avg_uncached)
            extra = self.scraped_waiting - own_waiting
            if extra > 0.0:
                own += w * extra * self.avg_uncached
        return own

    def running(self, now: float) -> float:
        """Sequences decoding on the replica (own in-flight, or more if a fresh scrape says so)."""
        w = self._freshness(now)
        if w > 0.0 and self.scraped_running > self.inflight:
            return self.inflight + w * (self.scraped_running - self.inflight)
        return float(self.inflight)

    def predict_ttft(self, uncached_tokens: float, now: float) -> float:
        """Predicted seconds to first token for a request with this many uncached tokens.

        The hot path of every decision (called once per candidate replica), so the common
        case -- no fresh scrape to blend in -- is computed inline.
        """
        dt = now - self._backlog_t
        own = self._backlog - dt / self._inv_rate if dt > 0.0 else self._backlog
        if own < 0.0:
            own = 0.0
        running = self.inflight
        if now - self.scraped_at <= 8 * self.params.staleness_s:
            w = self._freshness(now)
            extra = self.scraped_waiting - min(self.inflight, own / self.avg_uncached)
            if extra > 0.0:
                own += w * extra * self.avg_uncached
            if self.scraped_running > running:
                running = running + w * (self.scraped_running - running)
        work = own + uncached_tokens
        p = self.params
        steps = -(-work // p.step_tokens) if work > 0 else 1
        return self._fixed + work * self._inv_rate + running * p.decode_s * steps

    def load(self, now: float) -> float:
        """Seconds of queued work, cache-blind (the least-loaded baseline's measure)."""
        return self.backlog(now) * self._inv_rate + self.running(now) * self.params.decode_s

    def _drained(self, now: float) -> float:
        """Prefill tokens the replica worked through since the backlog was last set."""
        dt = now - self._backlog_t
        return dt / self._inv_rate if dt > 0.0 else 0.0

    def _freshness(self, now: float) -> float:
        age = now - self.scraped_at
        if age == math.inf or age > 8 * self.params.staleness_s:
            return 0.0
        return math.exp(-max(0.0, age) / self.params.staleness_s)

    # -- writing (called through the router's hooks) -----------------------------------------

    def on_dispatch(self, uncached_tokens: float, now: float) -> float:
        """Queue a request's prefill; returns its end position in the backlog (tokens)."""
        own = self._backlog - self._drained(now)
        own = own if own > 0.0 else 0.0
        self._backlog = own + uncached_tokens
        self._backlog_t = now
        self.inflight += 1
        self.avg_uncached += 0.05 * (max(uncached_tokens, 1.0) - self.avg_uncached)
        return self._backlog

    def on_prefill_done(self, end: float, dispatched_at: float, now: float) -> None:
        """Everything up to backlog position ``end`` (at ``dispatched_at``) has been prefilled."""
        own = self._backlog - self._drained(now)
        own = own if own > 0.0 else 0.0
        # the fluid had drained (now - dispatched_at) * rate of that `end` already
        left = end - max(0.0, now - dispatched_at) / self._inv_rate
        if left > 0.0:
            own = max(0.0, own - left)
        self._backlog = own
        self._backlog_t = now

    def on_finish(self) -> None:
        self.inflight = max(0, self.inflight - 1)

    def on_cancel(self, uncached_tokens: float, now: float) -> None:
        """A dispatched request never reached the replica: take its work back."""
        own = self._backlog - self._drained(now)
        self._backlog = max(0.0, own - uncached_tokens)
        self._backlog_t = now
        self.inflight = max(0, self.inflight - 1)

    def observe_ttft(self, work_tokens: float, ttft_s: float) -> None:
        """Learn ``ttft = fixed + work / rate`` from one observation.

        Exponentially weighted least squares on centred data: the mean prediction (the
        operating point) comes from the observations with a light prior; the slope (1/rate) is
        regularised toward the prior only as far as the spread of prompt sizes cannot pin it
        down. (Regularising intercept and slope alike let a wrong prior drag the slope.)
        """
        if not (ttft_s > 0.0 and work_tokens >= 0.0) or ttft_s > 600.0:
            return
        p = self.params
        g = p.forget
        x = work_tokens / 1e4  # scaled so both coefficients are O(1)
        self._sw = g * self._sw + 1.0
        self._sx = g * self._sx + x
        self._sy = g * self._sy + ttft_s
        self._sxx = g * self._sxx + x * x
        self._sxy = g * self._sxy + x * ttft_s
        a0 = p.fixed_s
        b0 = 1e4 / p.prefill_tokens_per_s
        xb = self._sx / self._sw
        yb = self._sy / self._sw
        sxx = self._sxx - self._sw * xb * xb
        sxy = self._sxy - self._sw * xb * yb
        lam_b = 0.0025 * p.prior_weight  # a spread of ~500 tokens over a few requests outweighs it
        b = (sxy + lam_b * b0) / (sxx + lam_b)
        lam_c = 0.25 * p.prior_weight
        c = (self._sw * yb + lam_c * (a0 + b0 * xb)) / (self._sw + lam_c)
        # keep within a sane band around the prior (a misconfigured prior is corrected, a
        # burst of outliers cannot make a replica look free or infinitely slow)
        b = min(max(b, 0.05 * b0), 20 * b0)
        self._inv_rate = b / 1e4
        self._fixed = min(max(c - b * xb, 0.0), max(5.0, 20 * a0))

    def observe_scrape(self, waiting: float, running: float, kv_usage: float, now: float) -> None:
        self.scraped_waiting = max(0.0, waiting)
        self.scraped_running = max(0.0, running)
        self.scraped_kv_usage = min(max(kv_usage, 0.0), 1.0)
        self.scraped_at = now

    def __repr__(self) -> str:
        return (
            f"ReplicaState(id={self.id}, url={self.url!r}, available={self.available}, "
            f"inflight={self.inflight}, rate={self.prefill_rate:.0f} tok/s, fixed={self._fixed * 1e3:.1f} ms)"
        )
