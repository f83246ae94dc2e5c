"""The fast reliability programs end to end (benchmarks/reliability/): each runs as a process,
as a user would run it, with small numbers, and its pass/fail result and result files are
checked. faults.py and soak.py take minutes and stay benchmark programs.

About 75 s in all, most of it abuse.py waiting for its slow-loris clients to be cut by the
balancer's 60 s request timeout (not configurable; the other phases run meanwhile).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ROOT / "benchmarks" / "reliability"


def run_program(name: str, out: Path, *args: str, timeout: float = 240) -> dict:
    proc = subprocess.run([sys.executable, str(PROGRAMS / name), "--quick", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    stem = "reliability_" + name.removesuffix(".py") + "_quick"
    report_path = out / f"{stem}.json"
    assert report_path.exists(), f"{name} wrote no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    assert (out / f"{stem}.md").read_text().startswith("## reliability: ")
    assert report["machine"]["cores"] and report["command"].startswith(f"python benchmarks/reliability/{name}")
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, f"{name}: checks failed: {json.dumps(failed, indent=1)}"
    assert report["ok"] and proc.returncode == 0, proc.stderr[-3000:]
    return report


@pytest.mark.timeout(120)
def test_security_admin_refuses_without_token_no_steering_no_secrets_in_logs(tmp_path: Path) -> None:
    r = run_program("security.py", tmp_path)
    assert all(row["status"] == 401 for row in r["admin"])
    assert r["canary_hits"] == []
    assert r["logs"]["secrets_found"] == {} and r["logs"]["access_lines"] > 0


@pytest.mark.timeout(120)
def test_flood_index_memory_stays_within_its_bound(tmp_path: Path) -> None:
    r = run_program("flood.py", tmp_path, "--prompts", "30000", "--http-prompts", "1500")
    core = r["core"]
    assert core["max_entries"] <= core["capacity_entries_total"]
    assert core["final"]["evictions"] > 0
    assert r["http"]["errors"] == 0


@pytest.mark.timeout(200)
def test_abuse_slowloris_idle_oversized_disconnects(tmp_path: Path) -> None:
    r = run_program("abuse.py", tmp_path, "--slowloris", "20", "--idle", "300", "--disconnects", "60")
    assert r["slowloris"]["cut"] == 20
    assert r["disconnects"]["inflight_after"] == 0
    assert r["disconnects"]["replica_aborts"] == 60
