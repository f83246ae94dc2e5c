"""The proxy benchmark still runs end to end (tiny sizes); its numbers are not checked here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_proxy_core.py"


def test_bench_proxy_core_quick_run_writes_json_and_markdown(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_proxy_core", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    result = bench.main(["--quick", "--json", str(out_json), "--markdown", str(out_md)])
    saved = json.loads(out_json.read_text())
    assert saved["summary"].keys() == {"direct", "core", "aiohttp"}
    core = result["summary"]["core"]
    for key in ("chat_c1_p50_added", "chat_c1_p99_added", "stream_c1_ttft_p50_added", "chat_c32_cpu_us_per_req"):
        assert isinstance(core[key], float)
    assert core["chat_c32_cpu_us_per_req"] > 0
    assert "| core |" in out_md.read_text()
