"""The live benchmark's named workloads as lazy streams, and the fleet sizing it derives from them.

``workload_stream(name, scale=s)`` yields the named workload one request at a time; the live
benchmark (``benchmarks/runner.py``'s ``make_workload``) takes the same stream as a list.
:func:`sized_workload` cuts a stream at ``requests`` and surveys it in one pass (count, span,
mean prompt, shared working set), so a million-request workload is never held in memory; the
simulation then regenerates it (generation is seeded, so the second pass is the same stream)
and :func:`retimed` spreads it at the offered load, as the runner's ``retime`` does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prefixlb.engine import Engine, EngineRequest, request_prompt_ids
from prefixlb.engine.tokenizer import default_tokenizer
from prefixlb.loadgen import (
    RequestSpec,
    imix,
    iter_agent_workload,
    iter_chat_workload,
    iter_docqa_workload,
    iter_llmd_workload,
    iter_tenant_workload,
    iter_unique_workload,
)

__all__ = ["WORKLOAD_NAMES", "SizedWorkload", "bench_workload", "fleet_kv", "prefill_capacity", "retimed",
           "sized_workload", "workload_names", "workload_stream"]

#: requests of each named workload at scale 1 (the runner's full benchmark; chat, agent and
#: mixed draw their number of turns at random, so theirs is the expected count)
BASE_REQUESTS = {"tenants": 600, "llmd": 900, "chat": 440, "docqa": 500, "agent": 400, "unique": 400,
                 "mixed": 620}
WORKLOAD_NAMES = tuple(BASE_REQUESTS)
#: workloads whose request count follows from their parameters only on average
_RANDOM_COUNT = {"chat", "agent", "mixed"}


def workload_stream(name: str, *, seed: int = 0, scale: float = 1.0, model: str = "auto",
                    requests: int | None = None) -> Iterator[RequestSpec]:
    """The runner's workload ``name`` at ``scale``, lazily (arrival times are rescaled later).
    ``requests`` sets the request count of the workloads that have one parameter for it
    (tenants, llmd, docqa, unique) instead of deriving it from ``scale``."""
    n = lambda k: max(8, int(k * scale))  # noqa: E731 - the runner's rule
    m = lambda k: requests if requests is not None else n(k)  # noqa: E731
    if name == "tenants":
        return iter_tenant_workload(seed=seed, tenants=48, system_tokens=3000, query_tokens=200, requests=m(600),
                                    rate=1.0, model=model)
    if name == "llmd":  # llm-d's setup at the fleet's scale (groups scale with the requests)
        return iter_llmd_workload(seed=seed, groups=n(60), requests=m(900), qps_start=1.0, qps_end=20.0, model=model)
    if name == "chat":
        return iter_chat_workload(seed=seed, conversations=n(80), rate=1.0, model=model)
    if name == "docqa":
        return iter_docqa_workload(seed=seed, documents=8, questions=m(500), rate=1.0, model=model)
    if name == "agent":
        return iter_agent_workload(seed=seed, agents=n(50), rate=1.0, model=model)
    if name == "unique":
        return iter_unique_workload(seed=seed, requests=m(400), rate=1.0, model=model)
    if name == "mixed":
        return imix(iter_tenant_workload(seed=seed, tenants=32, system_tokens=3000, query_tokens=200,
                                         requests=n(300), rate=1.0, model=model),
                    iter_chat_workload(seed=seed + 1, conversations=n(40), rate=1.0, model=model),
                    iter_unique_workload(seed=seed + 2, requests=n(100), prompt_tokens=1500, rate=1.0, model=model))
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOAD_NAMES)}")


@dataclass(frozen=True)
class SizedWorkload:
    """A named workload cut at a request count, and what one pass over it found."""

    name: str
    make: Callable[[], Iterator[RequestSpec]]  # a fresh stream (seeded: the same every time)
    requests: int
    span_s: float  # arrival of the last request, before retiming
    mean_prompt_tokens: float  # over the first 200 requests, as the runner computes it
    shared_working_set_tokens: int  # loadgen.shared_working_set of the whole stream
    groups: int  # groups that share a prefix

    def at_rate(self, rate: float) -> Iterator[RequestSpec]:
        """A fresh stream whose mean arrival rate is ``rate`` requests per second."""
        return retimed(self.make(), self.requests, self.span_s, rate)


def workload_names(text: str) -> list[str]:
    """A comma-separated list of workload names; ValueError names an unknown one."""
    names = [x for x in text.split(",") if x]
    for x in names:
        if x not in BASE_REQUESTS:
            raise ValueError(f"unknown workload {x!r}; known: {', '.join(WORKLOAD_NAMES)}")
    return names


def bench_workload(name: str, scale: float = 1.0) -> SizedWorkload:
    """``prefixlb bench``'s workload ``name`` at ``scale`` (seed 0), every request of it, surveyed
    (what the simulator-side benchmarks compare with the live runs)."""
    n = sum(1 for _ in workload_stream(name, seed=0, scale=scale))
    return sized_workload(name, n, stream=lambda: workload_stream(name, seed=0, scale=scale))


def sized_workload(name: str, requests: int, *, seed: int = 0, model: str = "auto",
                   stream: Callable[[], Iterable[RequestSpec]] | None = None) -> SizedWorkload:
    """Workload ``name`` with ``requests`` requests (its other sizes scaled to match, as the
    runner's ``--scale`` does), surveyed in one pass; ``stream`` replaces the named workload
    (e.g. a trace). Workloads whose count is random are generated a little larger and cut."""
    if stream is not None:
        return _survey(name, lambda: itertools.islice(iter(stream()), requests))
    if name not in BASE_REQUESTS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOAD_NAMES)}")
    scale = requests / BASE_REQUESTS[name]
    if name not in _RANDOM_COUNT:
        return _survey(name, lambda: itertools.islice(
            workload_stream(name, seed=seed, scale=scale, model=model, requests=requests), requests))
    # the turns per conversation (agent steps) are drawn at random: draw enough, then cut
    for _ in range(8):
        scale *= 1.25
        w = _survey(name, lambda s=scale: itertools.islice(  # type: ignore[misc]
            workload_stream(name, seed=seed, scale=s, model=model), requests))
        if w.requests == requests:
            return w
    return w


def _survey(name: str, make: Callable[[], Iterator[RequestSpec]]) -> SizedWorkload:
    tok = default_tokenizer()
    count = 0
    last = 0.0
    prompt = 0
    best: dict[str, int] = {}
    for r in make():
        if count < 200:
            prompt += len(request_prompt_ids(tok, r.body, r.chat))
        count += 1
        last = r.at
        if r.group and r.shared_tokens > best.get(r.group, 0):  # loadgen.shared_working_set
            best[r.group] = r.shared_tokens
    if not count:
        raise ValueError(f"workload {name!r} has no requests")
    return SizedWorkload(name, make, count, last, prompt / min(count, 200), sum(best.values()), len(best))


def retimed(specs: Iterable[RequestSpec], count: int, span_s: float, rate: float) -> Iterator[RequestSpec]:
    """The runner's ``retime`` on a stream: arrival times scaled so that ``count`` requests over
    ``span_s`` arrive at a mean ``rate`` per second, keeping each workload's own structure."""
    if span_s <= 0 or rate <= 0:
        yield from specs
        return
    f = (count / rate) / span_s
    for r in specs:
        yield RequestSpec(r.at * f, r.path, r.body, r.group, r.shared_tokens)


def prefill_capacity(profile: str, prompt_tokens: int, max_model_len: int) -> float:
    """Prompt tokens per second one replica prefills (a lone request of the mean size), as the
    runner measures it to set the offered load."""
    e = Engine(profile, max_model_len=max_model_len, enable_kv_events=False, grade_quality=False, hash_algo="fast")
    e.add_request(EngineRequest("probe", list(range(3, 3 + prompt_tokens)), max_tokens=1, ignore_eos=True), 0.0)
    t = 0.0
    while e.has_unfinished():
        t = e.step(t).end
    return prompt_tokens / t


def fleet_kv(working_set_tokens: int, replicas: int, pressure: float, max_model_len: int = 16_384,
             floor: int = 20_000) -> tuple[int | None, int]:
    """(KV tokens per replica, max_model_len) as the runner sizes an emulated fleet: the fleet's
    KV at ``pressure`` times the workload's shared working set (at least ``floor`` a replica),
    or the profile's capacity (None) when ``pressure`` is 0 or nothing is shared."""
    if not pressure or not working_set_tokens:
        return None, max_model_len
    kv = max(int(pressure * working_set_tokens / replicas), floor)
    return kv, min(max_model_len, kv - 256)
