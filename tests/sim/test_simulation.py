"""The simulator's contract: a run is a pure function of workload, configuration and seed; every
request ends; no replica ever holds more than its KV cache; a lazy workload is the list."""

from __future__ import annotations

import dataclasses
import math

import pytest

from prefixlb.loadgen import RequestSpec, iter_tenant_workload, tenant_workload
from prefixlb.routing import POLICIES
from prefixlb.sim import SimConfig, Simulation, simulate
from prefixlb.sim.workloads import retimed, sized_workload

KV = 12_000  # per replica: 12 tenants x 1,000 shared tokens need most of a 4-replica fleet


def specs(n: int = 300, seed: int = 0, rate: float = 40.0) -> list[RequestSpec]:
    return tenant_workload(seed=seed, tenants=12, system_tokens=1000, query_tokens=100, requests=n, rate=rate,
                           max_tokens=16)


def cfg(**kw) -> SimConfig:
    base = dict(replicas=4, kv_capacity_tokens=KV, max_model_len=8192, seed=1)
    return SimConfig(**{**base, **kw})


def fingerprint(res):
    return (res.hit_rate, list(res.ttft_ms), list(res.e2e_ms), res.per_replica_requests, res.steps, res.events,
            res.virtual_s, res.predicted_cached_tokens, res.actual_cached_tokens)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_same_seed_same_result(policy):
    a = simulate(specs(), cfg(policy=policy))
    b = simulate(specs(), cfg(policy=policy))
    assert fingerprint(a) == fingerprint(b)


def test_another_seed_changes_the_tie_breaks_not_the_workload():
    a = simulate(specs(), cfg(policy="least_loaded", seed=1))
    b = simulate(specs(), cfg(policy="least_loaded", seed=2))
    assert a.requests == b.requests == 300
    assert a.per_replica_requests != b.per_replica_requests  # least_loaded samples two replicas at random


def test_observation_jitter_is_seeded_and_moves_only_what_the_balancer_sees():
    """With observe_jitter_s the balancer learns from first bytes seen later (an event loop's
    delay): still one result per seed, a different trajectory for cache_aware (which learns from
    TTFTs), and none for a rule that never reads a time."""
    jit = lambda **kw: cfg(observe_jitter_s=0.002, **kw)  # noqa: E731
    assert fingerprint(simulate(specs(), jit())) == fingerprint(simulate(specs(), jit()))
    assert fingerprint(simulate(specs(), jit())) != fingerprint(simulate(specs(), cfg()))
    rr = dict(policy="round_robin")
    assert fingerprint(simulate(specs(), jit(**rr))) == fingerprint(simulate(specs(), cfg(**rr)))
    with pytest.raises(ValueError, match="observe-jitter-ms"):
        cfg(observe_jitter_s=-1.0).validate()


@pytest.mark.parametrize("policy", ["cache_aware", "round_robin", "sglang_like"])
def test_every_request_finishes_once_with_a_first_token_before_its_end(policy):
    res = simulate(specs(400), cfg(policy=policy))
    assert res.requests == 400 and res.errors == 0
    assert len(res.ttft_ms) == len(res.e2e_ms) == 400
    assert not any(math.isnan(x) for x in res.ttft_ms)
    assert all(0 < t <= e for t, e in zip(res.ttft_ms, res.e2e_ms))
    assert sum(res.per_replica_requests) == 400
    assert res.virtual_s >= max(r.at for r in specs(400))


def test_kv_capacity_is_never_exceeded_under_pressure():
    """A fleet whose KV cannot hold the working set: requests wait for memory and get preempted,
    and the block accounting of every replica stays within its capacity at every step."""
    tight = cfg(kv_capacity_tokens=4_000, max_model_len=2048)
    sim = Simulation(specs(300, rate=80.0), tight, check_kv_every=1)
    res = sim.run()
    assert res.kv_checks == res.steps > 0  # check_invariants: used + free == capacity, after every step
    assert res.errors == 0 and not any(math.isnan(x) for x in res.e2e_ms)
    assert res.preemptions > 0  # the pressure was real
    for e in sim.engines:
        assert e.kv.num_free_blocks == e.num_gpu_blocks - 1  # everything was released at the end
        assert e.num_requests_running == e.num_requests_waiting == 0
    assert res.max_running <= sim.engines[0].profile.max_num_seqs


def test_a_lazy_workload_is_the_same_run_as_its_list():
    kw = dict(seed=4, tenants=12, system_tokens=1000, query_tokens=100, requests=250, rate=40.0, max_tokens=16)
    a = simulate(tenant_workload(**kw), cfg())
    b = simulate(iter_tenant_workload(**kw), cfg())
    assert fingerprint(a) == fingerprint(b)


def test_sized_workload_streams_are_repeatable_and_retimed_to_the_rate():
    w = sized_workload("tenants", 500)
    a = list(w.at_rate(25.0))
    b = list(w.at_rate(25.0))
    assert len(a) == w.requests == 500
    assert [(r.at, r.body) for r in a] == [(r.at, r.body) for r in b]
    assert len(a) / a[-1].at == pytest.approx(25.0)
    assert list(retimed(iter(a), len(a), a[-1].at, 50.0))[-1].at == pytest.approx(a[-1].at / 2)


def test_requests_out_of_arrival_order_are_refused():
    s = specs(20)
    s[5], s[6] = s[6], s[5]
    with pytest.raises(ValueError, match="arrival order"):
        simulate(s, cfg())


def test_a_prompt_longer_than_max_model_len_is_an_error_not_a_crash():
    s = specs(30)
    long = dataclasses.replace(s[10], body={**s[10].body, "messages": [{"role": "user", "content": "x " * 20_000}]})
    s[10] = long
    res = simulate(s, cfg(max_model_len=8192))
    assert res.errors == 1 and math.isnan(res.ttft_ms[10])
    assert sum(not math.isnan(x) for x in res.ttft_ms) == 29


def test_several_balancers_each_route_their_share():
    res = simulate(specs(), cfg(balancers=3))
    assert res.requests == 300 and res.errors == 0
    assert not any(math.isnan(x) for x in res.e2e_ms)


def test_time_scale_is_the_balancers_clock_only():
    """The replicas' timings do not depend on how fast the balancer's clock runs; with round_robin
    (which reads no timing) the runs are identical, and only the router's view is scaled."""
    a = simulate(specs(), cfg(policy="round_robin"))
    b = simulate(specs(), cfg(policy="round_robin", time_scale=4.0, scrape_interval=0.25, maintain_interval=0.0625))
    assert list(a.ttft_ms) == list(b.ttft_ms)


def test_summary_has_the_live_benchmarks_metrics():
    s = simulate(specs(), cfg()).summary()
    for k in ("hit_rate", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "throughput_rps", "errors", "requests",
              "busiest_replica_share", "e2e_p50_ms", "ttft_mean_ms"):
        assert k in s, k
    assert 0 < s["hit_rate"] < 1 and s["ttft_p50_ms"] <= s["ttft_p90_ms"] <= s["ttft_p99_ms"]


def test_admission_holds_requests_within_the_budget_and_every_one_finishes():
    """cache_aware's admission in the simulator, as in the server: a request whose replica has
    its budget of prefill outstanding waits at the balancer; when it goes, the replica's pending
    prefill is within the budget (or it is the only one), and nothing is lost or left behind."""
    from prefixlb.routing import CostParams

    params = CostParams(admit_share=0.02, admit_max_wait_s=60.0)  # 164 tokens: one query at a time
    sim = Simulation(specs(300, rate=80.0), cfg(params=params))
    budget = params.admit_tokens
    seen = {"held": 0, "sent": 0}
    send, retry = sim._send, sim._retry_held

    def checked_send(*args):
        send(*args)
        d = args[-1]
        seen["sent"] += 1
        r = d.replica
        assert r.pending_prefill <= budget + 1e-6 or r.pending_prefill == pytest.approx(d.pending)

    def counted_retry():
        seen["held"] = max(seen["held"], sim.held)
        retry()

    sim._send, sim._retry_held = checked_send, counted_retry
    res = sim.run()
    assert seen["sent"] == 300 and seen["held"] >= 2  # requests were held, then all sent
    assert res.errors == 0 and not any(math.isnan(x) for x in res.e2e_ms)
    assert not sim.held and not sim._inflight
    assert all(r.pending_prefill == 0 and r.inflight == 0 for r in sim.router.replicas.values())
    # the budget off: nothing is ever held (the run is the immediate-dispatch one)
    off = Simulation(specs(300, rate=80.0), cfg(params=CostParams(admit_share=0.0)))
    off.run()
    assert not off.held and all(r.pending_prefill == 0 for r in off.router.replicas.values())
