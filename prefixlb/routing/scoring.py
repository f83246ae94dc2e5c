"""The cost model's scoring loop over every candidate replica: the hot loop of each decision.

``score`` is the C implementation (``prefixlb.index._native.score``) when the extension is built,
else ``score_py``, its readable twin; the tests require them to agree. Both read a *slab*: one
``array('d')`` per tier holding, for each replica id, the fields below (``ReplicaState`` writes
its own row after every change), so the loop touches no Python objects.

For each candidate: uncached = P - min(P - 1, matched blocks * tokens per block);
TTFT = ratio * (fixed + inv * (work + steps * (running + kappa * context))) with work = prefill
backlog ahead (fluid, plus fresh scraped load) + uncached, steps = ceil(work / step_tokens),
running and context the sequences in flight and their prompt tokens (plus fresh scraped
sequences beyond the balancer's own); plus, when the KV blocks this request needs (uncached
prompt + output budget) do not fit beside those the requests in flight hold, the wait for
enough of them to finish: overflow / allocated x the tier's mean request duration (vLLM
admits a request only when its blocks fit, so memory, not compute, is then the queue);
cost = TTFT + congestion * uncached * inv * ratio (the prefill this request adds is time other
requests will wait: with the fleet's utilisation rho, congestion = rho / (1 - rho)) +
pressure_weight * uncached * pressure * inv * ratio, where pressure (0..1) is how full the
replica's cache is: placing uncached tokens there evicts other prefixes that will cost their
prefill again. Costs within ``tie`` of the best tie; among
ties the longest match wins, then the least *load* -- the predicted TTFT with the replica's
learned speed ratio divided out -- and only an exact tie on that (e.g. identical idle replicas)
is left to ``u`` (a uniform draw from the router's seeded RNG, or the prompt's prefix hash).
The speed ratios are estimates (a few percent of noise on identical replicas): a cost
difference within the tie band is as likely their noise as a real difference, and picking the
argmin of noisy estimates systematically picks the replica whose speed is overestimated, which
then attracts every cold request (sticky sessions pile up there). Inside the band the
replicas' loads, which the balancer knows exactly, decide instead.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping

from prefixlb import index as _index

__all__ = ["F_COUNT", "NATIVE_SCORE", "score", "score_py"]

# slab row layout (doubles); F_COUNT per replica
(F_RESERVED, F_BACKLOG, F_BACKLOG_T, F_RATIO, F_CONTEXT, F_SCRAPED_AT, F_WAITING, F_RUNNING, F_KV,
 F_AVG_UNC, F_AVG_PROMPT, F_INFLIGHT, F_KV_ALLOC, F_KV_CAP) = range(14)
F_COUNT = 14


def score_py(slab: array, candidates: array, matches: Mapping[int, int], P: float, tpb: float, now: float,
             fixed: float, inv: float, kappa: float, mean_ratio: float, step: float, stale: float, pw: float,
             tie: float, u: float, out_tokens: float = 0.0, duration: float = 0.0,
             congestion: float = 0.0) -> tuple[int, float, float, float]:
    """(replica id, cost, predicted TTFT, predicted cached tokens) of the chosen candidate."""
    if not len(candidates):
        raise ValueError("no candidates")
    costs, ttfts, cached, loads = [], [], [], []
    best = math.inf
    for rid in candidates:
        b = rid * F_COUNT
        if b + F_COUNT > len(slab):
            raise IndexError(f"replica {rid} is outside the slab")
        m = matches.get(rid, 0)
        c = min(P - 1.0, m * tpb) if m else 0.0
        uncached = P - c
        ratio = slab[b + F_RATIO] if slab[b + F_RATIO] >= 0.0 else mean_ratio
        invr = inv * ratio
        dt = now - slab[b + F_BACKLOG_T]
        own = slab[b + F_BACKLOG] - dt / invr if dt > 0.0 else slab[b + F_BACKLOG]
        own = max(own, 0.0)
        inflight = slab[b + F_INFLIGHT]
        n, ctx = inflight, slab[b + F_CONTEXT]
        age = now - slab[b + F_SCRAPED_AT]
        if age <= 8.0 * stale:
            w = math.exp(-max(age, 0.0) / stale)
            avg_unc = slab[b + F_AVG_UNC]
            extra_wait = slab[b + F_WAITING] - min(inflight, own / avg_unc)
            if extra_wait > 0.0:
                own += w * extra_wait * avg_unc
            extra_seqs = slab[b + F_RUNNING] + slab[b + F_WAITING] - inflight
            if extra_seqs > 0.0:
                n += w * extra_seqs
                ctx += w * extra_seqs * slab[b + F_AVG_PROMPT]
        work = own + uncached
        steps = math.ceil(work / step) if work > 0.0 else 1.0
        t = ratio * (fixed + inv * (work + steps * (n + kappa * ctx)))
        alloc, cap = slab[b + F_KV_ALLOC], slab[b + F_KV_CAP]
        if cap > 0.0 and alloc > 0.0:
            over = alloc + uncached + out_tokens - cap
            if over > 0.0:
                t += min(over / alloc, 1.0) * duration
        total = t
        kv = slab[b + F_KV]
        if pw != 0.0 and kv != 0.0:
            total += pw * uncached * kv * invr
        if congestion != 0.0:
            total += congestion * uncached * invr
        costs.append(total)
        ttfts.append(t)
        cached.append(c)
        loads.append(t / ratio)
        best = min(best, total)
    limit = best * (1.0 + tie) + 1e-9
    ties = [i for i, x in enumerate(costs) if x <= limit]
    if len(ties) > 1:
        longest = max(cached[i] for i in ties)
        ties = [i for i in ties if cached[i] == longest]
        least = min(loads[i] for i in ties)
        ties = [i for i in ties if loads[i] == least]
        i = ties[min(len(ties) - 1, int(u * len(ties)))] if len(ties) > 1 else ties[0]
    else:
        i = ties[0]
    return candidates[i], costs[i], ttfts[i], cached[i]


_native = getattr(_index, "_native", None)
NATIVE_SCORE = _index.NATIVE and _native is not None and hasattr(_native, "score")
score = _native.score if NATIVE_SCORE else score_py
