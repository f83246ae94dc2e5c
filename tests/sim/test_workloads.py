"""Lazy workloads are the list workloads, one request at a time; the simulator's named workloads
are the live benchmark's (benchmarks/runner.py), so a simulated result and a live one describe
the same traffic."""

from __future__ import annotations


import pytest

from prefixlb import loadgen
from prefixlb.sim.workloads import BASE_REQUESTS, fleet_kv, sized_workload


def rows(specs):
    return [(r.at, r.path, r.body, r.group, r.shared_tokens) for r in specs]


CASES = [
    ("tenant_workload", dict(requests=300, ramp_to=30.0)),
    ("tenant_workload", dict(requests=200)),
    ("llmd_workload", dict(requests=200, groups=20)),
    ("chat_workload", dict(conversations=30)),
    ("docqa_workload", dict(questions=100, doc_tokens=500)),
    ("agent_workload", dict(agents=20)),
    ("unique_workload", dict(requests=100)),
]


@pytest.mark.parametrize(("name", "kw"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_iter_workload_yields_the_list_workload(name, kw):
    for seed in (0, 5):
        listed = getattr(loadgen, name)(seed=seed, **kw)
        lazy = getattr(loadgen, "iter_" + name)(seed=seed, **kw)
        assert not isinstance(lazy, list)
        assert rows(lazy) == rows(listed)
        ats = [r.at for r in listed]
        assert ats == sorted(ats)


def test_imix_is_mix():
    def parts():
        return (loadgen.iter_tenant_workload(requests=60), loadgen.iter_chat_workload(conversations=12),
                loadgen.iter_unique_workload(requests=30))

    assert rows(loadgen.imix(*parts())) == rows(loadgen.mix(*(list(p) for p in parts())))


@pytest.mark.parametrize("name", sorted(BASE_REQUESTS))
def test_sized_workload_has_exactly_the_requests_asked(name):
    w = sized_workload(name, 123, model="m")
    assert w.requests == 123 == sum(1 for _ in w.make())
    assert w.mean_prompt_tokens > 0
    assert (w.shared_working_set_tokens > 0) == (name != "unique")


def test_fleet_kv_follows_the_runner():
    assert fleet_kv(144_000, 4, 1.2) == (43_200, 16_384)
    assert fleet_kv(144_000, 1024, 1.2) == (20_000, 16_384)  # at least 20,000 tokens a replica
    assert fleet_kv(0, 4, 1.2) == (None, 16_384)
    assert fleet_kv(144_000, 4, 0) == (None, 16_384)
