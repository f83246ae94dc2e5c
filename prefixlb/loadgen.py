"""Load generation for the demo and the benchmarks: seeded workloads, an open-loop driver
that streams every request and times its first byte, and the replicas' own counters.

Times are *emulated* seconds when the fleet runs with ``--time-scale X``: the driver sleeps
``arrival / X`` wall seconds and multiplies what it measures by ``X``, so a result reads as
if it came from the hardware the profile models.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

from prefixlb.fleet.scrape import parse_vllm_metrics

__all__ = [
    "Outcome",
    "RequestSpec",
    "Summary",
    "drive",
    "replica_counters",
    "summarize",
    "tenant_workload",
    "text_of_tokens",
]

_WORDS = (
    "the of and to in is for that on with as it by this be are from at or an was have not but can all "
    "system policy customer account order return refund shipping invoice product support contract clause "
    "section party agreement shall must data model request cache prefix router replica token latency"
).split()


def text_of_tokens(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of text (4 bytes a token, the emulator's default tokenizer)."""
    out, n = [], 0
    target = tokens * 4
    while n < target:
        w = rng.choice(_WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:target]


@dataclass(frozen=True, slots=True)
class RequestSpec:
    at: float  # arrival, emulated seconds from the start
    path: str  # /v1/chat/completions or /v1/completions
    body: dict
    group: str = ""  # tenant / conversation / document, for per-group analysis
    shared_tokens: int = 0  # leading tokens shared with other requests of the group


def tenant_workload(
    *,
    seed: int = 0,
    tenants: int = 32,
    system_tokens: int = 2048,
    query_tokens: int = 128,
    requests: int = 400,
    rate: float = 10.0,
    zipf: float = 1.1,
    max_tokens: int = 32,
    model: str = "auto",
) -> list[RequestSpec]:
    """Tenants with a shared system prompt each, Zipf popularity, Poisson arrivals."""
    rng = random.Random(seed)
    systems = [f"[tenant {t}] " + text_of_tokens(rng, system_tokens) for t in range(tenants)]
    weights = [1.0 / (k + 1) ** zipf for k in range(tenants)]
    out, t = [], 0.0
    for i in range(requests):
        t += rng.expovariate(rate)
        k = rng.choices(range(tenants), weights)[0]
        body = {
            "model": model,
            "messages": [{"role": "system", "content": systems[k]},
                         {"role": "user", "content": f"({i}) " + text_of_tokens(rng, query_tokens)}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        out.append(RequestSpec(t, "/v1/chat/completions", body, group=f"tenant-{k}", shared_tokens=system_tokens))
    return out


@dataclass(slots=True)
class Outcome:
    ok: bool
    status: int
    ttft: float | None  # emulated seconds to the first streamed event
    e2e: float
    replica: str = ""
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    error: str = ""


async def _one(session: aiohttp.ClientSession, base: str, spec: RequestSpec, scale: float) -> Outcome:
    t0 = time.perf_counter()
    ttft = None
    usage = None
    try:
        async with session.post(base + spec.path, data=orjson.dumps(spec.body),
                                headers={"content-type": "application/json"}) as r:
            replica = r.headers.get("x-prefixlb-replica", "")
            if r.status != 200:
                return Outcome(False, r.status, None, (time.perf_counter() - t0) * scale, replica,
                               error=(await r.text())[:200])
            buf = b""
            async for chunk in r.content.iter_any():
                if ttft is None and b"data:" in chunk:
                    ttft = (time.perf_counter() - t0) * scale
                buf = (buf + chunk)[-4096:]
            if b'"usage"' in buf:
                for line in reversed(buf.split(b"\n")):
                    if line.startswith(b"data: {") and b'"usage"' in line:
                        try:
                            usage = orjson.loads(line[6:]).get("usage")
                        except orjson.JSONDecodeError:
                            pass
                        break
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return Outcome(False, 0, None, (time.perf_counter() - t0) * scale, error=f"{type(exc).__name__}: {exc}")
    e2e = (time.perf_counter() - t0) * scale
    o = Outcome(True, 200, ttft, e2e, replica)
    if isinstance(usage, dict):
        o.prompt_tokens = usage.get("prompt_tokens") or 0
        d = usage.get("prompt_tokens_details") or {}
        o.cached_tokens = d.get("cached_tokens") if isinstance(d, dict) else None
    return o


async def drive(
    base: str,
    specs: Sequence[RequestSpec],
    *,
    time_scale: float = 1.0,
    timeout: float = 600.0,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Outcome], float]:
    """Send ``specs`` open-loop at their arrival times; returns outcomes and the wall seconds taken."""
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    outcomes: list[Outcome | None] = [None] * len(specs)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        start = time.perf_counter()

        async def fire(i: int, spec: RequestSpec) -> None:
            delay = spec.at / time_scale - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            outcomes[i] = await _one(s, base, spec, time_scale)
            if progress:
                progress(1)

        await asyncio.gather(*(fire(i, sp) for i, sp in enumerate(specs)))
        wall = time.perf_counter() - start
    return [o for o in outcomes if o is not None], wall


async def replica_counters(urls: Sequence[str], timeout: float = 5.0) -> dict[str, tuple[float, float]]:
    """``{url: (prefix_cache_queries, prefix_cache_hits)}`` from each replica's ``/metrics``."""
    out = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        for u in urls:
            async with s.get(u + "/metrics") as r:
                m = parse_vllm_metrics(await r.text())
            out[u] = (m.prefix_queries, m.prefix_hits)
    return out


@dataclass
class Summary:
    requests: int
    errors: int
    hit_rate: float  # from the replicas' counters
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    throughput_rps: float  # emulated
    busiest_share: float  # the busiest replica's share of requests
    per_replica: dict[str, int] = field(default_factory=dict)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def summarize(outcomes: Sequence[Outcome], wall: float, time_scale: float,
              before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> Summary:
    ok = [o for o in outcomes if o.ok]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    dq = sum(after[u][0] - before.get(u, (0, 0))[0] for u in after)
    dh = sum(after[u][1] - before.get(u, (0, 0))[1] for u in after)
    per: dict[str, int] = {}
    for o in ok:
        per[o.replica] = per.get(o.replica, 0) + 1
    return Summary(
        requests=len(outcomes),
        errors=len(outcomes) - len(ok),
        hit_rate=dh / dq if dq else 0.0,
        ttft_p50_ms=_pct(ttfts, 0.50) * 1e3,
        ttft_p90_ms=_pct(ttfts, 0.90) * 1e3,
        ttft_p99_ms=_pct(ttfts, 0.99) * 1e3,
        e2e_p50_ms=statistics.median([o.e2e for o in ok]) * 1e3 if ok else math.nan,
        throughput_rps=len(ok) / (wall * time_scale) if wall else 0.0,
        busiest_share=max(per.values()) / len(ok) if ok else 0.0,
        per_replica=per,
    )
