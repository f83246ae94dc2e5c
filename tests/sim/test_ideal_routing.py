"""benchmarks/ideal_routing.py: the pooled-ideal fleet is what it says (each request prefills
exactly what the pooled cache missed, nothing can hit), and the study runs at a toy size."""

from __future__ import annotations

import pytest

from prefixlb.loadgen import tenant_workload
from prefixlb.sim.core import SimConfig, Simulation

from . import benchmark_modules


@pytest.fixture(scope="module")
def mods():
    return benchmark_modules("bounds", "ideal_routing")


def test_pooled_misses_add_up_to_the_pooled_hit_rate(mods):
    bounds, _ = mods
    specs = tenant_workload(seed=3, tenants=4, system_tokens=600, query_tokens=40, requests=40, rate=20.0)
    b = bounds.compute_bounds(specs, profile="h100-llama3-8b", replicas=2, kv_capacity_tokens=20_000,
                              max_model_len=4096)
    assert len(b.misses) == len(specs) and all(m >= 1 for m in b.misses)
    hits = b.prompt_tokens - sum(b.misses)
    assert hits > 0  # the tenants' system prompts are shared
    assert hits / b.prompt_tokens == pytest.approx(b.pooled_hit_rate, abs=1e-9)


def test_pooled_ideal_prefills_exactly_the_misses_and_never_hits(mods):
    bounds, ir = mods
    specs = tenant_workload(seed=3, tenants=4, system_tokens=600, query_tokens=40, requests=40, rate=20.0)
    b = bounds.compute_bounds(specs, profile="h100-llama3-8b", replicas=2, kv_capacity_tokens=20_000,
                              max_model_len=4096)
    ideal = ir.pooled_ideal(specs, b.misses)
    assert [s.at for s in ideal] == [s.at for s in specs]
    assert [s.body["max_tokens"] for s in ideal] == [s.body["max_tokens"] for s in specs]
    assert [len(s.body["prompt"]) for s in ideal] == b.misses
    sim = Simulation(ideal, SimConfig(replicas=2, kv_capacity_tokens=20_000, max_model_len=4096,
                                      policy="round_robin"), record_replicas=True)
    res = sim.run()
    assert res.errors == 0 and res.hit_rate == 0.0
    assert list(res.prompt_of) == b.misses and set(res.cached_of) == {0}
    with pytest.raises(ValueError, match="miss counts"):
        ir.pooled_ideal(specs, b.misses[:-1])


def test_study_reports_the_target_and_the_verdicts(mods):
    _, ir = mods
    r = ir.study("tenants", seeds=1, jitter_ms=1.0, scale=0.05)
    f, sg, t = r["ttft_floor_ms"], r["real"]["sglang_like"], r["target_ms"]
    assert t["p90"] == pytest.approx(f["p90"] + (sg["ttft_p90_ms"] - f["p90"]) / 2, abs=0.06)
    assert set(r["ideal"]) == set(ir.IDEAL_POLICIES) and set(r["real"]) == set(ir.REAL_POLICIES)
    assert set(r["ideal_with_admission"]) == set(r["ideal"]["round_robin"])
    assert r["ideal_best_ms"]["p99"] == min(m["ttft_p99_ms"] for m in r["ideal"].values())
    assert r["ideal_best_ms"]["p90"] >= f["p90"] - 1.0  # no routing beats the floor (1 ms: network hops)
    md = ir.markdown({"command": "x", "date": "d", "wall_s": 1.0, "machine": {"cpu": "c"}, "seeds": 1,
                      "jitter_ms": 1.0, "workloads": [r]})
    assert "| tenants | pooled-ideal | least_loaded |" in md and "- tenants: pooled-ideal p90" in md
    assert "| tenants | pooled-ideal | cache_aware (admission) |" in md
