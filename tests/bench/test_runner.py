"""The benchmark runner end to end at a tiny scale: emulated fleet, real balancer, real sockets.

Checks the ``prefixlb bench --json`` contract (the keys other tools read), that hit rates come
from the replicas' counters, that the bounds bound, and that the sweep and plots are written.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import runner  # noqa: E402

TARGET_KEYS = {"name", "hit_rate", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "throughput_rps", "errors"}


def test_quick_json_contract_and_sweep(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    peers = [p for p in ("sglang-router",) if shutil.which(p.replace("-", "_")) or _importable("sglang_router")]
    targets = ",".join(["prefixlb", "round_robin", *peers])
    args = runner.build_args(["--quick", "--workload", "tenants", "--scale", "0.06", "--targets", targets,
                              "--loads", "0.3,0.6", "--json", str(out), "--out", str(tmp_path),
                              "--time-scale", "4"])
    report = runner.run(args)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["workload"] == "tenants"
    assert 0 < data["oracle_hit_rate"] <= 1
    assert set(data["ttft_floor_ms"]) == {"p50", "p90", "p99"}
    assert data["ttft_floor_ms"]["p50"] <= data["ttft_floor_ms"]["p90"] <= data["ttft_floor_ms"]["p99"]
    names = [t["name"] for t in data["targets"]]
    assert names == targets.split(",")
    for t in data["targets"]:
        assert TARGET_KEYS <= set(t), t
        assert t["errors"] == 0
        assert 0 <= t["hit_rate"] <= data["oracle_hit_rate"] + 0.02  # the pooled cache bounds every router
        assert t["ttft_p50_ms"] >= 0.5 * data["ttft_floor_ms"]["p50"]
    by = {t["name"]: t for t in data["targets"]}
    assert by["prefixlb"]["hit_rate"] > by["round_robin"]["hit_rate"]
    # what the balancer cost and learned: CPU per request, and prefixlb's per-replica state
    assert all(t["balancer_cpu_ms_per_request"] > 0 for t in data["targets"])
    state = by["prefixlb"]["balancer_state"]
    assert len(state) == 4 and all(r["prefill_tokens_per_s"] > 0 for r in state)
    loads = sorted({row["load"] for row in data["sweep"]})
    assert loads == [0.3, 0.6]
    assert len(data["sweep"]) == 2 * len(names)
    assert (tmp_path / "bench_tenants_quick.md").read_text().startswith("### tenants")
    if _importable("matplotlib"):
        assert (tmp_path / "bench_tenants_quick_ttft_cdf.png").stat().st_size > 10_000
        assert (tmp_path / "bench_tenants_quick_vs_load.png").stat().st_size > 10_000


def test_unknown_target_is_named() -> None:
    with pytest.raises(SystemExit, match="unknown target 'nginx'"):
        runner.run(runner.build_args(["--quick", "--workload", "unique", "--scale", "0.02", "--targets", "nginx",
                                      "--no-plots"]))


def test_a_workload_without_sharing_renders() -> None:
    """unique prompts: no pooled hit rate to compare with, no working set to size the KV by."""
    rep = json.loads((ROOT / "benchmarks" / "results" / "bench_unique.json").read_text())
    assert rep["oracle_hit_rate"] == 0.0 and rep["targets"][0]["hit_rate_of_oracle"] is None
    md = runner.to_markdown(rep)
    assert "fleet KV: the profile's" in md and "| prefixlb | 0.0% | n/a |" in md


def test_bypass_sends_the_same_requests_around_the_balancer(tmp_path: Path) -> None:
    """--bypass: a seeded share of the requests goes straight to the replicas for every target;
    latency and the floor are the routed requests', the routed hit rate comes from their usage,
    and no pooled-cache bound is claimed for traffic the balancer did not place."""
    mask = runner.bypass_mask(2000, 0.3, 5)
    assert mask == runner.bypass_mask(2000, 0.3, 5) and 450 < sum(mask) < 750
    assert not any(runner.bypass_mask(50, 0.0, 5))
    args = runner.build_args(["--quick", "--workload", "tenants", "--scale", "0.06", "--targets", "prefixlb",
                              "--bypass", "0.4", "--out", str(tmp_path), "--no-plots", "--time-scale", "4"])
    report = runner.run(args)
    (t,) = report["targets"]
    n = report["setup"]["requests"]
    skipped = sum(runner.bypass_mask(n, 0.4, 0))
    assert report["setup"]["bypass"] == 0.4 and 0 < skipped < n
    assert t["bypassed_requests"] == skipped and t["bypassed_errors"] == 0
    assert t["requests"] == n - skipped and t["errors"] == 0
    assert 0.0 < t["routed_hit_rate"] <= 1.0
    assert not any("pooled cache" in c["check"] for c in report["checks"])
    md = (tmp_path / "bench_tenants_quick.md").read_text()
    assert "40% of the requests bypass the balancer" in md and "routed hit" in md
    with pytest.raises(SystemExit, match="--bypass must be in"):
        runner.run(runner.build_args(["--quick", "--workload", "unique", "--scale", "0.02", "--targets",
                                      "prefixlb", "--bypass", "1", "--no-plots"]))


def _importable(mod: str) -> bool:
    try:
        __import__(mod)
    except ImportError:
        return False
    return True
