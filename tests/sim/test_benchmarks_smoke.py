"""benchmarks/bench_sim.py and benchmarks/sim_questions.py import and run at toy sizes (the numbers
are the benchmarks' job; this only keeps their code from rotting)."""

from __future__ import annotations

import pytest

from . import benchmark_modules


@pytest.fixture(scope="module")
def bench_modules():
    return benchmark_modules("bench_sim", "sim_questions")


def test_bench_sim_runs_and_reports(bench_modules):
    bench_sim, _ = bench_modules
    scale = bench_sim.scale_target(8, 200, 100, progress=False)
    assert scale["requests"] == 200 and scale["sim_wall_s"] > 0 and not scale["met"]
    comps = bench_sim.comparisons([(4, 120)], ["tenants"], progress=False)
    assert [t["name"] for t in comps[0]["targets"]] == list(bench_sim.POLICIES)
    md = bench_sim.to_md({"machine": comps[0]["setup"]["machine"], "command": "x", "scale": scale,
                          "comparisons": comps})
    assert "Scale target" in md and "| 4 | tenants | 120 |" in md


def test_sim_questions_answer_at_toy_sizes(bench_modules):
    _, q = bench_modules
    doc = {"machine": {"date": "d", "cpu": "c", "cores": 2, "python": "3"}, "command": "x", "wall_s": 1.0,
           "replicas": q.q_replicas([2, 4], 20), "index": q.q_index(4, 120, [0.5, 2.0]),
           "scrape": q.q_scrape(4, 120, [1.0, 0.0], [1, 2], 0.8),
           "burst": q.q_burst(4, 200, ["cache_aware"])}
    doc["answers"] = q._answers(doc)
    md = q.to_md(doc)
    for title in ("1. Hit rate and TTFT", "2. Index capacity", "3. Stale load signals", "4. A burst"):
        assert title in md
    burst = {r["window"]: r for r in doc["burst"]["rows"]}
    assert burst["burst"]["hot_requests"] > burst["before"]["hot_requests"]
