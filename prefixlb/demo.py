"""``prefixlb demo``: prefixlb in front of an emulated vLLM fleet, cache_aware vs round_robin.

For each policy: a fresh (cold) emulated fleet in its own process, the balancer in its own
process (``prefixlb serve``), and the same seeded shared-prefix workload driven open-loop at
the same rate. Hit rates come from the replicas' own ``vllm:prefix_cache_*`` counters, TTFT from
the client, in emulated time (the fleet runs ``--time-scale`` times faster than the hardware
its profile models).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

from prefixlb.emulator.fleet import start_fleet_process
from prefixlb.loadgen import Summary, drive, replica_counters, summarize, tenant_workload

__all__ = ["DemoSettings", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    replicas: int = 4
    profile: str = "h100-llama3-8b"
    time_scale: float = 4.0
    kv_capacity_tokens: int = 48_000  # per replica: the fleet holds ~3/4 of the tenants' prefixes
    tenants: int = 64
    system_tokens: int = 4096
    query_tokens: int = 160
    requests: int = 600
    rate: float = 14.0  # emulated requests/s: ~60% of the fleet's prefill capacity without cache hits
    max_tokens: int = 32
    seed: int = 0
    policies: tuple[str, ...] = ("cache_aware", "round_robin")


class _Progress:
    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.n = total, label, 0
        self.t0 = time.perf_counter()
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="req", leave=True, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def __call__(self, k: int) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.n % max(1, self.total // 20) == 0 or self.n == self.total:
            print(f"\r{self.label}: {self.n}/{self.total} requests", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def _start_balancer(urls: list[str], policy: str) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "prefixlb", "serve", "--port", "0", "--policy", policy, "--log-level", "warning"]
    for u in urls:
        argv += ["--replica", u]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("the balancer did not start (run `prefixlb serve` by hand to see why)")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
    if proc.stdout:
        proc.stdout.close()


async def _run_policy(s: DemoSettings, policy: str, specs) -> Summary:
    fleet = start_fleet_process(s.replicas, base_port=0, profile=s.profile, time_scale=s.time_scale,
                                kv_capacity_tokens=s.kv_capacity_tokens, max_model_len=16_384, startup_timeout=60)
    try:
        bal, base = _start_balancer(fleet.urls, policy)
        try:
            before = await replica_counters(fleet.urls)
            bar = _Progress(len(specs), f"{policy:>13}")
            try:
                outcomes, wall = await drive(base, specs, time_scale=s.time_scale, progress=bar)
            finally:
                bar.close()
            after = await replica_counters(fleet.urls)
            return summarize(outcomes, wall, s.time_scale, before, after)
        finally:
            _stop(bal)
    finally:
        fleet.stop()


def run_demo(s: DemoSettings | None = None) -> dict[str, Summary]:
    s = s or DemoSettings()
    specs = tenant_workload(seed=s.seed, tenants=s.tenants, system_tokens=s.system_tokens,
                            query_tokens=s.query_tokens, requests=s.requests, rate=s.rate, max_tokens=s.max_tokens)
    print(f"prefixlb demo: {s.replicas} emulated replicas ({s.profile}, {s.kv_capacity_tokens:,} KV tokens each, "
          f"{s.time_scale:g}x real time); {s.requests} chat requests from {s.tenants} tenants "
          f"({s.system_tokens:,}-token system prompts, Zipf popularity) at {s.rate:g} req/s.", file=sys.stderr)
    results = {}
    for policy in s.policies:
        results[policy] = asyncio.run(_run_policy(s, policy, specs))
    print(format_table(results))
    return results


def format_table(results: dict[str, Summary]) -> str:
    rows = ["", "| policy | hit rate (replica counters) | TTFT p50 ms | TTFT p99 ms | throughput req/s | errors | busiest replica |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r.hit_rate:.1%} | {r.ttft_p50_ms:.0f} | {r.ttft_p99_ms:.0f} | "
                    f"{r.throughput_rps:.2f} | {r.errors} | {r.busiest_share:.0%} |")
    if "cache_aware" in results and "round_robin" in results:
        a, b = results["cache_aware"], results["round_robin"]
        rows.append("")
        rows.append(f"cache_aware vs round_robin: hit rate {a.hit_rate:.1%} vs {b.hit_rate:.1%}, "
                    f"TTFT p99 {b.ttft_p99_ms / a.ttft_p99_ms:.1f}x lower, p50 {b.ttft_p50_ms / a.ttft_p50_ms:.1f}x lower "
                    "(times are emulated H100 seconds).")
    return "\n".join(rows)
