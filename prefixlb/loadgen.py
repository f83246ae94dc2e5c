"""Load generation for the demo and the benchmarks: seeded workloads, an open-loop driver
that streams every request and times its first byte, and the replicas' own counters.

Times are *emulated* seconds when the fleet runs with ``--time-scale X``: the driver sleeps
``arrival / X`` wall seconds and multiplies what it measures by ``X``, so a result reads as
if it came from the hardware the profile models.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import statistics
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

from prefixlb.fleet.scrape import parse_vllm_metrics

__all__ = [
    "WORKLOADS",
    "Outcome",
    "RequestSpec",
    "Summary",
    "agent_workload",
    "arrival_times",
    "chat_workload",
    "docqa_workload",
    "drive",
    "imix",
    "iter_agent_workload",
    "iter_chat_workload",
    "iter_docqa_workload",
    "iter_llmd_workload",
    "iter_tenant_workload",
    "iter_unique_workload",
    "llmd_workload",
    "mix",
    "replica_counters",
    "shared_working_set",
    "summarize",
    "tenant_workload",
    "text_of_tokens",
    "trace_workload",
    "unique_workload",
]

_WORDS = (
    "the of and to in is for that on with as it by this be are from at or an was have not but can all "
    "system policy customer account order return refund shipping invoice product support contract clause "
    "section party agreement shall must data model request cache prefix router replica token latency"
).split()


_POOL: str | None = None
_POOL_BYTES = 1 << 22


def _text_pool() -> str:
    """4 MB of word salad, generated once (fixed seed): text is sliced out of it in O(1)."""
    global _POOL
    if _POOL is None:
        rng = random.Random(0x5EED)
        words = [rng.choice(_WORDS) for _ in range(_POOL_BYTES // 5)]
        _POOL = " ".join(words)[:_POOL_BYTES]
    return _POOL


def text_of_tokens(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of text (4 bytes a token, the emulator's default tokenizer): a
    slice of a fixed text pool at an offset drawn from ``rng`` (deterministic, O(1) per call,
    so million-request workloads generate in seconds)."""
    pool = _text_pool()
    n = max(0, tokens * 4)
    if n >= len(pool):
        return (pool * (n // len(pool) + 1))[:n]
    o = rng.randrange(len(pool) - n)
    return pool[o : o + n]


@dataclass(frozen=True, slots=True)
class RequestSpec:
    at: float  # arrival, emulated seconds from the start
    path: str  # /v1/chat/completions or /v1/completions
    body: dict
    group: str = ""  # tenant / conversation / document, for per-group analysis
    shared_tokens: int = 0  # leading tokens shared with other requests of the group

    @property
    def chat(self) -> bool:
        return self.path.endswith("chat/completions")


def arrival_times(rng: random.Random, n: int, rate: float, ramp_to: float | None = None) -> list[float]:
    """``n`` Poisson arrival times at ``rate`` per second, or with the rate ramping linearly from
    ``rate`` to ``ramp_to`` over the run (thinning a Poisson process at the peak rate)."""
    if ramp_to is None or ramp_to == rate:
        t, out = 0.0, []
        for _ in range(n):
            t += rng.expovariate(rate)
            out.append(t)
        return out
    lo, hi = rate, ramp_to
    peak = max(lo, hi)
    duration = 2.0 * n / (lo + hi)  # the mean rate times the duration gives n
    out, t = [], 0.0
    while len(out) < n:
        t += rng.expovariate(peak)
        r = lo + (hi - lo) * min(t / duration, 1.0)
        if rng.random() < r / peak:
            out.append(t)
    return out


def _chat_body(messages: list[dict], max_tokens: int, model: str) -> dict:
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


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
    ramp_to: float | None = None,
) -> list[RequestSpec]:
    """Tenants with a shared system prompt each, Zipf popularity, Poisson arrivals."""
    return list(iter_tenant_workload(seed=seed, tenants=tenants, system_tokens=system_tokens,
                                     query_tokens=query_tokens, requests=requests, rate=rate, zipf=zipf,
                                     max_tokens=max_tokens, model=model, ramp_to=ramp_to))


def iter_tenant_workload(*, seed: int = 0, tenants: int = 32, system_tokens: int = 2048, query_tokens: int = 128,
                         requests: int = 400, rate: float = 10.0, zipf: float = 1.1, max_tokens: int = 32,
                         model: str = "auto", ramp_to: float | None = None) -> Iterator[RequestSpec]:
    """:func:`tenant_workload` one request at a time (the same requests, in the same order)."""
    rng = random.Random(seed)
    systems = [f"[tenant {t}] " + text_of_tokens(rng, system_tokens) for t in range(tenants)]
    weights = [1.0 / (k + 1) ** zipf for k in range(tenants)]
    population = range(tenants)
    for i, t in enumerate(array("d", arrival_times(rng, requests, rate, ramp_to))):
        k = rng.choices(population, weights)[0]
        msgs = [{"role": "system", "content": systems[k]},
                {"role": "user", "content": f"({i}) " + text_of_tokens(rng, query_tokens)}]
        yield RequestSpec(t, "/v1/chat/completions", _chat_body(msgs, max_tokens, model),
                          group=f"tenant-{k}", shared_tokens=system_tokens)


def llmd_workload(*, seed: int = 0, groups: int = 150, prefix_tokens: int = 6000, users: int = 5,
                  query_tokens: int = 1200, requests: int = 3000, qps_start: float = 3.0, qps_end: float = 60.0,
                  max_tokens: int = 32, model: str = "auto") -> list[RequestSpec]:
    """llm-d's published "KV-cache wins" setup (field.md): 150 groups sharing a 6K-token prefix,
    5 users each asking 1.2K-token questions, load ramped from 3 to 60 QPS."""
    return list(iter_llmd_workload(seed=seed, groups=groups, prefix_tokens=prefix_tokens, users=users,
                                   query_tokens=query_tokens, requests=requests, qps_start=qps_start,
                                   qps_end=qps_end, max_tokens=max_tokens, model=model))


def iter_llmd_workload(*, seed: int = 0, groups: int = 150, prefix_tokens: int = 6000, users: int = 5,
                       query_tokens: int = 1200, requests: int = 3000, qps_start: float = 3.0, qps_end: float = 60.0,
                       max_tokens: int = 32, model: str = "auto") -> Iterator[RequestSpec]:
    """:func:`llmd_workload` one request at a time (the same requests, in the same order)."""
    rng = random.Random(seed)
    prefixes = [f"[group {g}] " + text_of_tokens(rng, prefix_tokens) for g in range(groups)]
    for i, t in enumerate(array("d", arrival_times(rng, requests, qps_start, qps_end))):
        g, u = rng.randrange(groups), rng.randrange(users)
        msgs = [{"role": "system", "content": prefixes[g]},
                {"role": "user", "content": f"[user {u}] ({i}) " + text_of_tokens(rng, query_tokens)}]
        yield RequestSpec(t, "/v1/chat/completions", _chat_body(msgs, max_tokens, model),
                          group=f"group-{g}", shared_tokens=prefix_tokens)


def chat_workload(*, seed: int = 0, conversations: int = 40, turns: tuple[int, int] = (3, 8),
                  system_tokens: int = 300, user_tokens: int = 200, answer_tokens: int = 250,
                  think_s: float = 4.0, rate: float = 2.0, max_tokens: int = 64,
                  model: str = "auto") -> list[RequestSpec]:
    """Multi-turn chat: each turn resends the whole history (system prompt, earlier turns and
    answers) plus a new user message; turns of a conversation are ``think_s`` (exponential) apart,
    conversations start as a Poisson process at ``rate``."""
    return list(iter_chat_workload(seed=seed, conversations=conversations, turns=turns,
                                   system_tokens=system_tokens, user_tokens=user_tokens,
                                   answer_tokens=answer_tokens, think_s=think_s, rate=rate,
                                   max_tokens=max_tokens, model=model))


def iter_chat_workload(*, seed: int = 0, conversations: int = 40, turns: tuple[int, int] = (3, 8),
                       system_tokens: int = 300, user_tokens: int = 200, answer_tokens: int = 250,
                       think_s: float = 4.0, rate: float = 2.0, max_tokens: int = 64,
                       model: str = "auto") -> Iterator[RequestSpec]:
    """:func:`chat_workload` one request at a time, in arrival order (the same requests, in the
    same order: conversations overlap in time, so only those still running are held)."""
    rng = random.Random(seed)
    starts = arrival_times(rng, conversations, rate)

    def conversation(c: int, t0: float) -> list[RequestSpec]:
        out = []
        history = [{"role": "system", "content": f"[conversation {c}] " + text_of_tokens(rng, system_tokens)}]
        t = t0
        shared = system_tokens
        for turn in range(rng.randint(*turns)):
            history = history + [{"role": "user", "content": text_of_tokens(rng, user_tokens)}]
            out.append(RequestSpec(t, "/v1/chat/completions", _chat_body(history, max_tokens, model),
                                   group=f"conv-{c}", shared_tokens=shared))
            # what the model "answered" comes back in the next turn's history
            history = history + [{"role": "assistant", "content": text_of_tokens(rng, answer_tokens)}]
            shared += user_tokens + answer_tokens
            t += rng.expovariate(1.0 / think_s)
        return out

    return _in_arrival_order(conversation(c, t0) for c, t0 in enumerate(starts))


def docqa_workload(*, seed: int = 0, documents: int = 8, doc_tokens: int = 8000, questions: int = 300,
                   question_tokens: int = 60, zipf: float = 0.8, rate: float = 6.0, max_tokens: int = 48,
                   model: str = "auto") -> list[RequestSpec]:
    """Long-document QA: many short questions over a few long documents (Zipf popularity)."""
    return list(iter_docqa_workload(seed=seed, documents=documents, doc_tokens=doc_tokens, questions=questions,
                                    question_tokens=question_tokens, zipf=zipf, rate=rate, max_tokens=max_tokens,
                                    model=model))


def iter_docqa_workload(*, seed: int = 0, documents: int = 8, doc_tokens: int = 8000, questions: int = 300,
                        question_tokens: int = 60, zipf: float = 0.8, rate: float = 6.0, max_tokens: int = 48,
                        model: str = "auto") -> Iterator[RequestSpec]:
    """:func:`docqa_workload` one request at a time (the same requests, in the same order)."""
    rng = random.Random(seed)
    docs = [f"[document {d}] " + text_of_tokens(rng, doc_tokens) for d in range(documents)]
    weights = [1.0 / (k + 1) ** zipf for k in range(documents)]
    population = range(documents)
    for i, t in enumerate(array("d", arrival_times(rng, questions, rate))):
        d = rng.choices(population, weights)[0]
        msgs = [{"role": "user", "content": docs[d] + f"\n\nQuestion {i}: " + text_of_tokens(rng, question_tokens)}]
        yield RequestSpec(t, "/v1/chat/completions", _chat_body(msgs, max_tokens, model),
                          group=f"doc-{d}", shared_tokens=doc_tokens)


def agent_workload(*, seed: int = 0, agents: int = 30, steps: tuple[int, int] = (4, 12), system_tokens: int = 1500,
                   tool_tokens: tuple[int, int] = (150, 900), step_gap_s: float = 1.0, rate: float = 1.5,
                   max_tokens: int = 64, model: str = "auto") -> list[RequestSpec]:
    """Agent loops: a system prompt and task, then each step appends the model's tool call and the
    tool's output and asks again, ``step_gap_s`` (exponential) apart."""
    return list(iter_agent_workload(seed=seed, agents=agents, steps=steps, system_tokens=system_tokens,
                                    tool_tokens=tool_tokens, step_gap_s=step_gap_s, rate=rate,
                                    max_tokens=max_tokens, model=model))


def iter_agent_workload(*, seed: int = 0, agents: int = 30, steps: tuple[int, int] = (4, 12),
                        system_tokens: int = 1500, tool_tokens: tuple[int, int] = (150, 900),
                        step_gap_s: float = 1.0, rate: float = 1.5, max_tokens: int = 64,
                        model: str = "auto") -> Iterator[RequestSpec]:
    """:func:`agent_workload` one request at a time, in arrival order (the same requests, in the
    same order)."""
    rng = random.Random(seed)

    def agent(a: int, t0: float) -> list[RequestSpec]:
        out = []
        history = [{"role": "system", "content": f"[agent {a}] " + text_of_tokens(rng, system_tokens)},
                   {"role": "user", "content": "Task: " + text_of_tokens(rng, 120)}]
        t, shared = t0, system_tokens
        for step in range(rng.randint(*steps)):
            out.append(RequestSpec(t, "/v1/chat/completions", _chat_body(history, max_tokens, model),
                                   group=f"agent-{a}", shared_tokens=shared))
            tool = rng.randint(*tool_tokens)
            # as OpenAI's schema has it (sglang-router rejects a tool message without its call id)
            call = f"call_{a}_{step}"
            args = text_of_tokens(rng, 30)
            history = history + [{"role": "assistant", "content": f"call tool_{step}(" + args + ")",
                                  "tool_calls": [{"id": call, "type": "function",
                                                  "function": {"name": f"tool_{step}",
                                                               "arguments": '{"query": "' + args[:200] + '"}'}}]},
                                 {"role": "tool", "tool_call_id": call, "content": text_of_tokens(rng, tool)}]
            shared += 150 + tool
            t += rng.expovariate(1.0 / step_gap_s)
        return out

    return _in_arrival_order(agent(a, t0) for a, t0 in enumerate(arrival_times(rng, agents, rate)))


def _in_arrival_order(sessions: Iterable[list[RequestSpec]]) -> Iterator[RequestSpec]:
    """Merge sessions (each in time order, starting in time order) into one stream in arrival
    order, as a stable sort of all their requests would: a session is generated only when the
    stream reaches its start, and requests wait in a heap until no later session can precede them."""
    heap: list[tuple[float, int, RequestSpec]] = []
    seq = 0
    for session in sessions:
        if not session:
            continue
        start = session[0].at
        while heap and heap[0][0] <= start:  # every later request is at >= start, and was made later
            yield heapq.heappop(heap)[2]
        for r in session:
            heapq.heappush(heap, (r.at, seq, r))
            seq += 1
    while heap:
        yield heapq.heappop(heap)[2]


def unique_workload(*, seed: int = 0, requests: int = 300, prompt_tokens: int = 2000, rate: float = 8.0,
                    max_tokens: int = 32, model: str = "auto") -> list[RequestSpec]:
    """The no-sharing control: every prompt is unique from its first token."""
    return list(iter_unique_workload(seed=seed, requests=requests, prompt_tokens=prompt_tokens, rate=rate,
                                     max_tokens=max_tokens, model=model))


def iter_unique_workload(*, seed: int = 0, requests: int = 300, prompt_tokens: int = 2000, rate: float = 8.0,
                         max_tokens: int = 32, model: str = "auto") -> Iterator[RequestSpec]:
    """:func:`unique_workload` one request at a time (the same requests, in the same order)."""
    rng = random.Random(seed)
    for i, t in enumerate(array("d", arrival_times(rng, requests, rate))):
        yield RequestSpec(t, "/v1/chat/completions",
                          _chat_body([{"role": "user", "content": f"<{i}> " + text_of_tokens(rng, prompt_tokens)}],
                                     max_tokens, model), group=f"unique-{i}")


def trace_workload(path: str, *, model: str | None = None, limit: int | None = None) -> list[RequestSpec]:
    """Replay a JSONL trace: one object per line, ``{"at": seconds from start, "endpoint":
    "/v1/chat/completions" | "/v1/completions", "body": {...}}`` (optional ``"group"``). Bodies
    are sent as given (``model`` overrides theirs when set; streaming is forced on so TTFT can
    be measured, with ``stream_options.include_usage``)."""
    out = []
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                at, endpoint, body = float(rec["at"]), rec.get("endpoint", "/v1/chat/completions"), dict(rec["body"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: not a trace record ({exc}); expected "
                                 '{"at": seconds, "endpoint": "/v1/...", "body": {...}}') from None
            if endpoint not in ("/v1/chat/completions", "/v1/completions"):
                raise ValueError(f"{path}:{n}: endpoint must be /v1/chat/completions or /v1/completions")
            if model is not None:
                body["model"] = model
            body["stream"] = True
            body.setdefault("stream_options", {"include_usage": True})
            out.append(RequestSpec(at, endpoint, body, group=str(rec.get("group", ""))))
            if limit and len(out) >= limit:
                break
    out.sort(key=lambda r: r.at)
    return out


def mix(*workloads: list[RequestSpec]) -> list[RequestSpec]:
    """Interleave workloads by arrival time."""
    return sorted((r for w in workloads for r in w), key=lambda r: r.at)


def imix(*workloads: Iterable[RequestSpec]) -> Iterator[RequestSpec]:
    """:func:`mix` over streams already in arrival order, lazily (the same order: on equal arrival
    times, earlier workloads first, as the stable sort in ``mix`` orders them)."""
    return heapq.merge(*workloads, key=_at)


def _at(r: RequestSpec) -> float:
    return r.at


def shared_working_set(specs: Sequence[RequestSpec]) -> int:
    """Tokens of distinct shared prefixes: per group, the longest prefix its requests share."""
    best: dict[str, int] = {}
    for r in specs:
        if r.group and r.shared_tokens:
            best[r.group] = max(best.get(r.group, 0), r.shared_tokens)
    return sum(best.values())


WORKLOADS: dict[str, Callable[..., list[RequestSpec]]] = {
    "tenants": tenant_workload,
    "llmd": llmd_workload,
    "chat": chat_workload,
    "docqa": docqa_workload,
    "agent": agent_workload,
    "unique": unique_workload,
}


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
    bypassed: bool = False  # sent straight to a replica (``drive(direct=...)``), not through the target


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
    closed_loop: int | None = None,
    fresh_connections: bool = False,
    direct: Sequence[str | None] | None = None,
) -> tuple[list[Outcome], float]:
    """Send ``specs`` open-loop at their arrival times (or, with ``closed_loop=N``, by N clients
    each sending its next request when the previous one ends); returns outcomes and the wall
    seconds taken. Connections are kept alive and reused, as OpenAI clients do, unless
    ``fresh_connections``. ``direct[i]``, when given and not None, is a URL request ``i`` goes to
    instead of ``base`` (traffic that bypasses the balancer; its outcome is marked ``bypassed``)."""
    if direct is not None and len(direct) != len(specs):
        raise ValueError(f"direct: {len(direct)} entries for {len(specs)} requests")
    conn = aiohttp.TCPConnector(limit=0, force_close=fresh_connections)
    outcomes: list[Outcome | None] = [None] * len(specs)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        start = time.perf_counter()

        async def fire(i: int, spec: RequestSpec) -> None:
            delay = spec.at / time_scale - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            url = direct[i] if direct is not None else None
            o = await _one(s, url or base, spec, time_scale)
            o.bypassed = url is not None
            outcomes[i] = o
            if progress:
                progress(1)

        if closed_loop:
            nxt = iter(range(len(specs)))

            async def client() -> None:
                for i in nxt:
                    url = direct[i] if direct is not None else None
                    o = await _one(s, url or base, specs[i], time_scale)
                    o.bypassed = url is not None
                    outcomes[i] = o
                    if progress:
                        progress(1)

            await asyncio.gather(*(client() for _ in range(closed_loop)))
        else:
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
