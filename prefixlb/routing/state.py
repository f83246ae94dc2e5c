"""What the router knows about each replica, and how that knowledge moves.

A replica is modelled the way vLLM's scheduler runs it: one FCFS prefill queue, and a batch of
running sequences that every step must also serve.

* **Prefill backlog** is a fluid: every dispatch adds the request's uncached prompt tokens; the
  backlog drains at the replica's prefill rate. A request's tokens sit at position
  ``end = backlog_at_dispatch + uncached``; when its first token arrives (or the response ends),
  everything up to ``end`` is known done, which corrects the fluid when the replica was faster
  than modelled. Counting tokens, not requests, is what lets one 30K-token prompt weigh as
  much as it costs.
* **Running batch**: the requests on the replica and the prompt tokens they hold. Every
  step decodes one token per running sequence and attends over their context, so a replica
  decoding many long conversations takes longer per step even when its prefill queue is empty.
* **Time to first token**, with all work counted in *prefill-token equivalents* of compute:

      ttft = fixed + (1 / rate) * (work + steps * (running + kappa * context))

  ``work`` is the backlog ahead plus this request's uncached tokens, ``steps`` the prefill
  steps it spans (``ceil(work / step_tokens)``); a decoding sequence costs a step about what one
  prefill token costs (a pass of the weights per token) and attending over one context token
  about ``kappa`` = 1e-3 of it (KV bytes over memory bandwidth against FLOPs per token: ~38 ns
  vs ~40 us on an H100 with an 8B model, ~210 ns vs ~200 us on an A10G -- the ratio holds
  across hardware). One composite feature, two learned coefficients (``fixed`` and ``rate``):
  a :class:`TierModel` fits them by exponentially weighted least squares from every replica of
  the tier (replicas of a tier usually share hardware and model), regularised toward the
  configured priors. A three-coefficient fit (separate slopes for queued prefill and for
  context) was tried first: under load both grow together, the slopes traded off and swung by
  10x within a run. Each replica only learns a *speed ratio* to the tier's prediction (shrunk
  toward the tier's mean ratio and relaxed when unobserved), so a replica that has served
  nothing yet predicts exactly like its peers, while one that turns out slower than its peers
  stops attracting work.
* **Scraped load** (``vllm:num_requests_waiting`` / ``_running``) counts what this balancer did
  not send (other balancers, direct traffic). It is blended in with weight
  ``exp(-age / staleness)``: fresh scrapes count fully, stale ones fade out.

Everything is a pure function of the calls made on it and the ``now`` passed in.
"""

from __future__ import annotations

import math
import struct
from array import array
from dataclasses import dataclass

from .scoring import F_COUNT

# a row's fields after the reserved one (F_BACKLOG .. F_KV_CAP, scoring.py's order), written
# with one call: an ``array`` item assignment parses its argument each time. The order is
# tested field by field (tests/routing/test_scoring.py)
_ROW = struct.Struct(f"={F_COUNT - 1}d")

__all__ = ["CostParams", "ReplicaState", "TierModel"]

_W = 1e4  # feature unit for the regression: 10K token-equivalents


@dataclass(frozen=True, slots=True)
class CostParams:
    """Priors and constants of the cost model (per tier; from config)."""

    prefill_tokens_per_s: float = 10_000.0  # prior prefill rate of one replica
    fixed_s: float = 0.010  # prior fixed TTFT: network, tokenization, first step's base
    context_weight: float = 1e-3  # kappa: prefill-token equivalents per context token per step
    step_tokens: int = 8192  # vLLM max_num_batched_tokens: prefill tokens per step
    staleness_s: float = 2.0  # scraped load weight decays with this time constant
    prior_weight: float = 8.0  # how strongly the priors hold against few observations
    ratio_weight: float = 16.0  # pseudo-observations holding a replica's speed ratio at the tier mean
    relax_s: float = 10.0  # a replica not observed this long drifts back toward the tier mean
    forget: float = 0.99  # per-observation decay of the TTFT regression (~100 observations)
    learn_queue_share: float = 0.25  # learn from a TTFT only if the prefill queued ahead was at
    # most this share of the request's own uncached tokens (see TierRouter.first_token)
    admit_share: float = 0.75  # admission: a request waits at the balancer while the replica it
    # would go to has this share of step_tokens already sent and not yet prefilled (0: never)
    admit_max_wait_s: float = 2.0  # a request waits for room at most this long, then goes anyway

    @property
    def admit_tokens(self) -> float:
        """The admission budget in prompt tokens (0: admission off); see TierRouter.admits."""
        return self.admit_share * self.step_tokens


class _Regression:
    """``y = a + b x`` by exponentially weighted least squares on the centred feature, the slope
    regularised toward a prior mean (weight ``lam``), the mean prediction toward the prior's
    (``lam_c`` pseudo-observations)."""

    __slots__ = ("s", "forget", "n")

    def __init__(self, forget: float) -> None:
        self.s = [0.0] * 5  # w, x, y, xx, xy
        self.forget = forget
        self.n = 0

    def add(self, x: float, y: float) -> None:
        g, s = self.forget, self.s
        s[0] = g * s[0] + 1.0
        s[1] = g * s[1] + x
        s[2] = g * s[2] + y
        s[3] = g * s[3] + x * x
        s[4] = g * s[4] + x * y
        self.n += 1

    def solve(self, a0: float, b0: float, lam: float, lam_c: float) -> tuple[float, float, float] | None:
        """(a, b, mean x), or None before any observation."""
        sw, sx, sy, sxx, sxy = self.s
        if sw <= 0.0:
            return None
        mx, my = sx / sw, sy / sw
        b = (sxy - sw * mx * my + lam * b0) / (sxx - sw * mx * mx + lam)
        c = (sw * my + lam_c * (a0 + b0 * mx)) / (sw + lam_c)
        return c - b * mx, b, mx


def _clamp(p: CostParams, a: float, b: float, mx: float) -> tuple[float, float]:
    """Keep the coefficients in a sane band around the configured priors (a misconfigured prior
    is corrected; a burst of outliers cannot make a replica look free or infinitely slow) while
    keeping the prediction at the observed operating point, which the data pins down best: an
    intercept that would go negative is set to 0 by scaling the slope, not by shifting the line
    (which biased every prediction upward while a wrong prior still held the slope)."""
    c = a + b * mx
    b0 = _W / p.prefill_tokens_per_s
    b = min(max(b, 0.02 * b0), 50 * b0)
    a = c - b * mx
    if a < 0.0:
        if c > 0.0 and mx > 0.0:
            b = max(c / mx, 0.02 * b0)
        a = 0.0
    return min(a, max(5.0, 20 * p.fixed_s)), b


class TierModel:
    """The TTFT coefficients of a tier, learned from all its replicas' observations."""

    __slots__ = ("params", "fixed", "inv_rate", "_reg", "mean_ratio", "duration")

    def __init__(self, params: CostParams | None = None) -> None:
        self.params = p = params or CostParams()
        self.fixed = p.fixed_s
        self.inv_rate = 1.0 / p.prefill_tokens_per_s
        self._reg = _Regression(p.forget)
        self.mean_ratio = 1.0  # what an observed replica's TTFT is, on average, over predict()
        self.duration = 0.0  # EW mean seconds from dispatch to the end of a request (0: none seen)

    def observe_duration(self, seconds: float) -> None:
        if seconds > 0.0:
            self.duration = seconds if self.duration == 0.0 else self.duration + 0.05 * (seconds - self.duration)

    def observe(self, x: float, y: float) -> None:
        """One observation: ``x`` token-equivalents of work (see the module doc), ``y`` seconds."""
        p = self.params
        self._reg.add(x / _W, y)
        fit = self._reg.solve(p.fixed_s, _W / p.prefill_tokens_per_s, 0.0025 * p.prior_weight, 0.1 * p.prior_weight)
        if fit is None:
            return
        a, b = _clamp(p, *fit)
        self.fixed, self.inv_rate = a, b / _W

    def predict(self, x: float) -> float:
        return self.fixed + x * self.inv_rate

    @property
    def observations(self) -> int:
        return self._reg.n


class ReplicaState:
    """The router's model of one replica (mutated by the router's hooks and by scrapes)."""

    __slots__ = (
        "id",
        "url",
        "_eligible",
        "_draining",
        "_slab",
        "_on_availability",
        "inflight",
        "context",
        "kv_alloc",
        "_backlog",
        "_backlog_t",
        "ratio",
        "_num",
        "_den",
        "_last_obs",
        "tier",
        "params",
        "scraped_waiting",
        "scraped_running",
        "scraped_kv_usage",
        "index_fullness",
        "scraped_at",
        "avg_uncached",
        "avg_prompt",
        "capacity_tokens",
        "capacity_scale",
        "observations",
        "pending_prefill",
    )

    def __init__(self, replica_id: int, url: str = "", params: CostParams | None = None,
                 tier: TierModel | None = None, slab: array | None = None, on_availability=None) -> None:
        self.id = replica_id
        self.url = url
        self._eligible = True  # healthy, breaker closed
        self._draining = False  # admin: no new work, in-flight finishes
        self._on_availability = on_availability
        if slab is None:
            slab = array("d", bytes(8 * F_COUNT * (replica_id + 1)))
        self._slab = slab
        self.inflight = 0
        self.context = 0.0  # prompt tokens of the requests in flight
        self.kv_alloc = 0.0  # KV tokens the requests in flight allocated: uncached prompt + output budget
        self.params = p = params or CostParams()
        self._backlog = 0.0
        self._backlog_t = 0.0
        self.ratio = 1.0  # this replica's TTFT / the tier model's prediction (learned)
        self._num = self._den = 0.0
        self._last_obs = 0.0
        self.observations = 0
        self.tier = tier if tier is not None else TierModel(p)
        self.scraped_waiting = 0.0
        self.scraped_running = 0.0
        self.scraped_kv_usage = 0.0
        self.index_fullness = 0.0  # blocks the index believes held / its capacity for this replica
        self.scraped_at = -math.inf
        self.avg_uncached = 512.0
        self.avg_prompt = 1024.0
        self.capacity_tokens: int | None = None
        self.capacity_scale = 1.0
        self.pending_prefill = 0.0  # uncached tokens sent (streamed requests) whose first byte is not back
        self._sync()

    # -- the scoring slab ------------------------------------------------------------------

    def _sync(self) -> None:
        """Write this replica's row of the tier's slab (what the native scoring loop reads), in
        slab order: backlog, its time, ratio, context, scraped_at, waiting, running, KV pressure,
        avg uncached, avg prompt, inflight, KV allocated, KV capacity."""
        # cache pressure (F_KV): vLLM's kv_cache_usage_perc counts cached-but-idle blocks as free,
        # so it reads low exactly when the prefix cache is full; the index's own fullness does not
        kv = self.scraped_kv_usage if self.scraped_kv_usage > self.index_fullness else self.index_fullness
        _ROW.pack_into(self._slab, (self.id * F_COUNT + 1) * 8, self._backlog, self._backlog_t,
                       self.ratio if self.observations else -1.0, self.context, self.scraped_at,
                       self.scraped_waiting, self.scraped_running, kv, self.avg_uncached, self.avg_prompt,
                       self.inflight, self.kv_alloc, self.capacity_tokens or 0.0)

    def rebind(self, slab: array) -> None:
        """Move to another slab (the router grows it when a replica with a larger id joins)."""
        self._slab = slab
        self._sync()

    @property
    def eligible(self) -> bool:
        return self._eligible

    @eligible.setter
    def eligible(self, value: bool) -> None:
        if value != self._eligible:
            self._eligible = value
            if self._on_availability:
                self._on_availability()

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        if value != self._draining:
            self._draining = value
            if self._on_availability:
                self._on_availability()

    # -- reading ---------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._eligible and not self._draining

    @property
    def speed_ratio(self) -> float:
        """This replica's TTFT over the tier model's prediction (an untried one: the tier's mean)."""
        return self.ratio if self.observations else self.tier.mean_ratio

    @property
    def _inv_rate(self) -> float:
        return self.tier.inv_rate * self.speed_ratio

    @property
    def prefill_rate(self) -> float:
        return 1.0 / self._inv_rate

    @property
    def fixed_s(self) -> float:
        return self.tier.fixed * self.speed_ratio

    def loads(self, now: float) -> tuple[float, float, float]:
        """(prefill tokens queued ahead of a request dispatched now, sequences running, context
        tokens they hold): own accounting plus whatever a fresh scrape shows beyond it."""
        own = self._backlog - self._drained(now)
        if own < 0.0:
            own = 0.0
        n, ctx = float(self.inflight), self.context
        if now - self.scraped_at <= 8 * self.params.staleness_s:
            w = self._freshness(now)
            queued = own / self.avg_uncached
            extra_wait = self.scraped_waiting - (queued if queued < self.inflight else self.inflight)
            if extra_wait > 0.0:
                own += w * extra_wait * self.avg_uncached
            extra_seqs = self.scraped_running + self.scraped_waiting - self.inflight
            if extra_seqs > 0.0:
                n += w * extra_seqs
                ctx += w * extra_seqs * self.avg_prompt
        return own, n, ctx

    def backlog(self, now: float) -> float:
        return self.loads(now)[0]

    def feature(self, uncached_tokens: float, now: float) -> tuple[float, float]:
        """(token-equivalents of work before this request's first token (see the module doc),
        prefill tokens queued ahead of it): what a request dispatched now is learned against."""
        own, n, ctx = self.loads(now)
        work = own + uncached_tokens
        steps = math.ceil(work / self.params.step_tokens) if work > 0.0 else 1.0
        return work + steps * (n + self.params.context_weight * ctx), own

    def predict_ttft(self, uncached_tokens: float, now: float, out_tokens: float = 0.0) -> float:
        """Predicted seconds to first token for a request with this many uncached tokens.

        The hot path of every decision (once per candidate replica); kept to plain arithmetic.
        """
        t = self.tier
        ratio = self.ratio if self.observations else t.mean_ratio
        inv = t.inv_rate * ratio
        dt = now - self._backlog_t
        own = self._backlog - dt / inv if dt > 0.0 else self._backlog
        if own < 0.0:
            own = 0.0
        n, ctx = float(self.inflight), self.context
        if now - self.scraped_at <= 8 * self.params.staleness_s:
            own, n, ctx = self.loads(now)
        work = own + uncached_tokens
        steps = math.ceil(work / self.params.step_tokens) if work > 0.0 else 1.0
        ttft = ratio * (t.fixed + t.inv_rate * (work + steps * (n + self.params.context_weight * ctx)))
        return ttft + self.memory_wait(uncached_tokens + out_tokens)

    def memory_wait(self, need_tokens: float) -> float:
        """Seconds until ``need_tokens`` of KV fit beside what the requests in flight hold: the
        share of them that must finish first, times the tier's mean request duration."""
        cap, alloc = self.capacity_tokens or 0.0, self.kv_alloc
        if cap <= 0.0 or alloc <= 0.0:
            return 0.0
        over = alloc + need_tokens - cap
        return min(over / alloc, 1.0) * self.tier.duration if over > 0.0 else 0.0

    def load(self, now: float) -> float:
        """Seconds of queued work, cache-blind (the least-loaded baseline's measure)."""
        own, n, ctx = self.loads(now)
        return self.speed_ratio * self.tier.inv_rate * (own + n + self.params.context_weight * ctx)

    def _freshness(self, now: float) -> float:
        age = now - self.scraped_at
        if age == math.inf or age > 8 * self.params.staleness_s:
            return 0.0
        return math.exp(-age / self.params.staleness_s) if age > 0.0 else 1.0

    def _drained(self, now: float) -> float:
        dt = now - self._backlog_t
        if dt <= 0.0:
            return 0.0
        t = self.tier
        return dt / (t.inv_rate * (self.ratio if self.observations else t.mean_ratio))  # self._inv_rate

    # -- writing (called through the router's hooks) -----------------------------------------

    def queue_prefill(self, uncached_tokens: float, now: float) -> float:
        """Add a prefill to the modelled backlog; returns its end position there (tokens).
        Admission's held requests are queued this way too (TierRouter.hold): nothing was sent,
        but the queue others would join is real, and a hot prefix is replicated when it grows."""
        end = self._queue(uncached_tokens, now)
        self._sync()
        return end

    def unqueue_prefill(self, uncached_tokens: float, now: float) -> None:
        """Take a prefill that will not run here back out of the modelled backlog."""
        self._unqueue(uncached_tokens, now)
        self._sync()

    def _queue(self, uncached_tokens: float, now: float) -> float:
        own = self._backlog - self._drained(now)
        self._backlog = (own if own > 0.0 else 0.0) + uncached_tokens
        self._backlog_t = now
        return self._backlog

    def _unqueue(self, uncached_tokens: float, now: float) -> None:
        own = self._backlog - self._drained(now)
        self._backlog = own - uncached_tokens if own > uncached_tokens else 0.0
        self._backlog_t = now

    def on_dispatch(self, uncached_tokens: float, prompt_tokens: float, now: float, kv_tokens: float = 0.0) -> float:
        """Queue a request's prefill; returns its end position in the backlog (tokens)."""
        end = self._queue(uncached_tokens, now)  # synced below with the rest
        self.inflight += 1
        self.context += prompt_tokens
        self.kv_alloc += kv_tokens
        # (two-argument max() costs ~8x a comparison in CPython: this runs for every request)
        self.avg_uncached += 0.05 * ((uncached_tokens if uncached_tokens > 1.0 else 1.0) - self.avg_uncached)
        self.avg_prompt += 0.05 * ((prompt_tokens if prompt_tokens > 1.0 else 1.0) - self.avg_prompt)
        self._sync()
        return end

    def on_prefill_done(self, end: float, dispatched_at: float, now: float, sync: bool = True) -> None:
        """Everything up to backlog position ``end`` (at ``dispatched_at``) has been prefilled.
        ``sync=False``: the caller writes the slab row next (``on_finish``)."""
        own = self._backlog - self._drained(now)
        own = own if own > 0.0 else 0.0
        # the fluid had drained (now - dispatched_at) * rate of that `end` already
        dt = now - dispatched_at
        left = end - dt / self._inv_rate if dt > 0.0 else end
        if left > 0.0:
            own = own - left if own > left else 0.0
        self._backlog = own
        self._backlog_t = now
        if sync:
            self._sync()

    def on_finish(self, prompt_tokens: float, kv_tokens: float = 0.0) -> None:
        if self.inflight > 1:
            self.inflight -= 1
            self.context = self.context - prompt_tokens if self.context > prompt_tokens else 0.0
            self.kv_alloc = self.kv_alloc - kv_tokens if self.kv_alloc > kv_tokens else 0.0
        else:
            self.inflight, self.context, self.kv_alloc = 0, 0.0, 0.0
        self._sync()

    def on_cancel(self, uncached_tokens: float, prompt_tokens: float, now: float, kv_tokens: float = 0.0) -> None:
        """A dispatched request never reached the replica: take its work back."""
        self._unqueue(uncached_tokens, now)
        self.on_finish(prompt_tokens, kv_tokens)  # syncs

    def observe_ttft(self, x: float, ttft_s: float, now: float | None = None) -> None:
        """Learn from one observed TTFT: the tier's coefficients, and this replica's ratio to them.

        The ratio is an exponentially weighted ratio of sums (observed / predicted), with
        ``prior_weight`` pseudo-observations at 1, so a few slow answers move it, noise does not.
        """
        if not (ttft_s > 0.0 and x >= 0.0) or ttft_s > 600.0:
            return
        t = self.tier
        t.observe(x, ttft_s)
        pred = t.predict(x)
        if pred <= 0.0:
            return
        g = self.params.forget
        t.mean_ratio += (1.0 - g) * (min(4.0, max(0.25, ttft_s / pred)) - t.mean_ratio)
        self._num = g * self._num + ttft_s
        self._den = g * self._den + pred
        self.observations += 1
        if now is not None:
            self._last_obs = now
        self._update_ratio()

    def _update_ratio(self) -> None:
        # ratio_weight pseudo-observations at the tier's mean ratio: a replica is called slower or
        # faster than its peers only on consistent evidence, never on a couple of unlucky answers
        t = self.tier
        n = min(self.observations, 1.0 / (1.0 - self.params.forget))
        k = self.params.ratio_weight * self._den / max(n, 1.0)
        self.ratio = min(4.0, max(0.25, (self._num + k * t.mean_ratio) / (self._den + k)))
        self._sync()

    def relax(self, now: float) -> None:
        """Evidence fades: a replica not observed for ``relax_s`` (often because it was judged
        slow and avoided) drifts back toward its peers, so it is tried again and re-measured."""
        if self.observations and now - self._last_obs > self.params.relax_s:
            self._num *= 0.5
            self._den *= 0.5
            self._last_obs = now
            self._update_ratio()

    def observe_fullness(self, fullness: float) -> None:
        self.index_fullness = min(max(fullness, 0.0), 1.0)
        self._sync()

    def observe_scrape(self, waiting: float, running: float, kv_usage: float, now: float) -> None:
        self.scraped_waiting = max(0.0, waiting)
        self.scraped_running = max(0.0, running)
        self.scraped_kv_usage = min(max(kv_usage, 0.0), 1.0)
        self.scraped_at = now
        self._sync()

    def __repr__(self) -> str:
        return (
            f"ReplicaState(id={self.id}, url={self.url!r}, available={self.available}, inflight={self.inflight}, "
            f"rate={self.prefill_rate:.0f} tok/s, fixed={self.fixed_s * 1e3:.1f} ms, ratio={self.speed_ratio:.2f})"
        )
