"""``prefixlb sim``: a small run writes the live benchmark's JSON shape and prints a summary."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from prefixlb.cli import main

TARGET_KEYS = {"name", "hit_rate", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "ttft_mean_ms", "e2e_p50_ms",
               "throughput_rps", "errors", "requests", "busiest_replica_share", "hit_rate_of_oracle",
               "ttft_p90_over_floor_ms", "ttft_p99_over_floor_ms", "wall_s", "virtual_s"}


def test_sim_writes_the_benchmark_json_with_bounds(tmp_path, capsys):
    out = tmp_path / "sim.json"
    md = tmp_path / "sim.md"
    rc = main(["sim", "--replicas", "4", "--requests", "200", "--workload", "tenants", "--policies",
               "cache_aware,round_robin", "--json", str(out), "--markdown", str(md), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["workload"] == "tenants" and report["simulator"] is True
    assert 0 < report["oracle_hit_rate"] < 1
    assert set(report["ttft_floor_ms"]) == {"p50", "p90", "p99"}
    assert report["bounds"]["method"] == "all requests" and report["bounds"]["requests"] == 200
    assert [t["name"] for t in report["targets"]] == ["cache_aware", "round_robin"]
    for t in report["targets"]:
        assert TARGET_KEYS <= set(t), TARGET_KEYS - set(t)
        assert t["requests"] == 200 and t["errors"] == 0
        assert 0 <= t["hit_rate"] <= report["oracle_hit_rate"] + 0.02  # nobody beats one pooled cache
        assert all(math.isfinite(t[k]) for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "throughput_rps"))
    s = report["setup"]
    assert s["replicas"] == 4 and s["requests"] == 200 and s["command"].startswith("prefixlb sim ")
    assert {c["check"] for c in report["checks"]} >= {"cache_aware hit rate >= 90% of the pooled cache's"}
    printed = capsys.readouterr().out
    assert "| cache_aware |" in printed and "| round_robin |" in printed
    assert md.read_text().strip() == printed.strip()


def test_bounds_on_a_sample_say_so(tmp_path):
    out = tmp_path / "sim.json"
    assert main(["sim", "--replicas", "2", "--requests", "120", "--workload", "chat", "--bounds-requests", "50",
                 "--json", str(out), "--no-progress"]) == 0
    b = json.loads(out.read_text())["bounds"]
    assert b["requests"] == 50 and b["of"] == 120 and b["method"].startswith("first 50")
    assert "note" in b


def test_bad_flags_are_refused_with_the_flag_named():
    p = subprocess.run([sys.executable, "-m", "prefixlb", "sim", "--policy", "best_guess", "--requests", "10",
                        "--no-progress", "--bounds", "off"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--policy" in p.stderr and "best_guess" in p.stderr


def test_prefill_prior_reaches_the_cost_model_and_the_learned_rate_is_reported(tmp_path):
    learned = {}
    for prior in (5_000, 40_000):
        out = tmp_path / f"sim{prior}.json"
        assert main(["sim", "--replicas", "2", "--requests", "40", "--workload", "tenants", "--bounds", "off",
                     "--prefill-prior", str(prior), "--json", str(out), "--no-progress"]) == 0
        learned[prior] = json.loads(out.read_text())["targets"][0]["learned_prefill_tokens_per_s"]
    # 40 observations cannot pull the two priors together: the prior is what the model started from
    assert 0 < learned[5_000] < learned[40_000]
