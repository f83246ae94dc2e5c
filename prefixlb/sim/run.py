"""``prefixlb sim``: a named workload through simulated fleets, one run per policy, read against
the same bounds and with the same metrics as the live benchmark (benchmarks/runner.py).

The workload, the offered load and the fleet's KV are derived exactly as the runner derives
them (:mod:`prefixlb.sim.workloads`). The bounds -- the pooled-cache hit rate and the TTFT
floor -- are computed by benchmarks/bounds.py (the runner's own code, so a source checkout is
needed) over every request, or over the first ``bounds_requests`` in arrival order when the
workload is larger (the pooled pass runs each request to completion on one engine; at a million
requests that takes longer than the simulation). The report says which.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

from prefixlb import __version__
from prefixlb.engine import get_profile
from prefixlb.routing import POLICIES, CostParams

from .core import SimConfig, SimResult, Simulation
from .workloads import SizedWorkload, fleet_kv, prefill_capacity, sized_workload

__all__ = ["SimSettings", "bounds_module", "checks", "machine", "plan", "run", "run_policy", "to_markdown"]


@dataclass
class SimSettings:
    """What ``prefixlb sim`` runs (its flags, one field each)."""

    workload: str = "tenants"
    requests: int = 10_000
    replicas: int = 16
    policies: tuple[str, ...] = ("cache_aware",)
    profile: str = "h100-llama3-8b"
    load: float = 0.6  # offered prompt tokens/s over the fleet's prefill throughput, nothing cached
    pressure: float = 1.2  # fleet KV = pressure x the shared working set (0: the profile's KV)
    kv_capacity_tokens: int | None = None  # per replica; overrides pressure
    index_capacity_tokens: int | None = None  # per replica (None: the replica's KV)
    scrape_interval: float = 1.0
    network_s: float = 0.0003
    observe_jitter_s: float = 0.0
    time_scale: float = 1.0
    balancers: int = 1
    seed: int = 0
    model: str | None = None
    bounds: str = "auto"  # auto | full | off
    bounds_requests: int = 100_000
    progress: bool = True
    params: CostParams = field(default_factory=CostParams)

    def validate(self) -> None:
        for p in self.policies:
            if p not in POLICIES:
                raise ValueError(f"--policy: unknown policy {p!r}; choose from {', '.join(POLICIES)}")
        if not self.policies:
            raise ValueError("--policies: give at least one policy")
        if self.requests < 1:
            raise ValueError(f"--requests: must be >= 1, got {self.requests}")
        if self.load <= 0:
            raise ValueError(f"--load: must be > 0, got {self.load}")
        if self.bounds not in ("auto", "full", "off"):
            raise ValueError(f"--bounds: auto, full or off, not {self.bounds!r}")
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < 1024:
            raise ValueError(f"--kv-capacity-tokens: must be >= 1024, got {self.kv_capacity_tokens}")
        try:
            get_profile(self.profile)
        except KeyError as exc:
            raise ValueError(f"--profile: {exc.args[0]}") from None
        SimConfig(replicas=self.replicas, scrape_interval=self.scrape_interval, network_s=self.network_s,
                  observe_jitter_s=self.observe_jitter_s,
                  index_capacity_tokens=self.index_capacity_tokens, time_scale=self.time_scale,
                  balancers=self.balancers).validate()


def machine() -> dict:
    """Where a result was measured (the same fields as benchmarks/bench_index.py records)."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "prefixlb": __version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def bounds_module() -> ModuleType | None:
    """benchmarks/bounds.py of the source checkout (the runner's bounds), or None without one."""
    name = "prefixlb_benchmarks_bounds"
    if name in sys.modules:
        return sys.modules[name]
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        path = base / "benchmarks" / "bounds.py"
        if path.exists():
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                return None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod  # dataclasses look their module up there
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                del sys.modules[name]
                raise
            return mod
    return None


class _Progress:
    """A tqdm bar when tqdm is installed; otherwise quiet."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=f"{label:>16}", unit="req", file=sys.stderr, dynamic_ncols=True,
                                mininterval=0.5)
            except ImportError:
                pass

    def __call__(self, k: int) -> None:
        if self.bar is not None:
            self.bar.update(k)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_policy(w: SizedWorkload, rate: float, cfg: SimConfig, *, progress: bool = False,
               record_replicas: bool = False) -> SimResult:
    """One simulation of ``w`` at ``rate`` requests/s on ``cfg``'s fleet."""
    bar = _Progress(w.requests, cfg.policy, progress)
    try:
        return Simulation(w.at_rate(rate), cfg, record_replicas=record_replicas).run(bar)
    finally:
        bar.close()


def _bounds(s: SimSettings, w: SizedWorkload, kv: int | None, max_model_len: int) -> dict | None:
    if s.bounds == "off":
        return {"method": "off", "note": "not computed (--bounds off)"}
    mod = bounds_module()
    if mod is None:
        return {"method": "unavailable", "note": "needs a source checkout (benchmarks/bounds.py)"}
    n = w.requests if s.bounds == "full" else min(w.requests, s.bounds_requests)
    t0 = time.perf_counter()
    b = mod.compute_bounds(itertools.islice(w.make(), n), profile=s.profile, replicas=s.replicas,
                           kv_capacity_tokens=kv, max_model_len=max_model_len)
    out = {"method": "all requests" if n == w.requests else f"first {n:,} requests in arrival order",
           "requests": n, "of": w.requests, "pooled_hit_rate": round(b.pooled_hit_rate, 4),
           "ttft_floor_ms": b.ttft_floor_ms, "pooled_kv_tokens": b.pooled_kv_tokens,
           "wall_s": round(time.perf_counter() - t0, 1)}
    if n < w.requests:
        out["note"] = ("benchmarks/bounds.py over a prefix of the stream (--bounds-requests); the pooled cache "
                       "starts cold there, so with many distinct prefixes the sampled bound reads low")
    return out


def plan(s: SimSettings, w: SizedWorkload) -> tuple[float, SimConfig]:
    """(arrival rate in requests/s, the fleet and balancer) for ``w`` under ``s``: KV per replica
    from the shared working set and ``s.pressure`` (unless given), the rate that offers
    ``s.load`` of the fleet's prefill throughput. The policy is ``s``'s first."""
    ws = w.shared_working_set_tokens
    if s.kv_capacity_tokens:
        kv, max_model_len = s.kv_capacity_tokens, min(16_384, s.kv_capacity_tokens - 256)
    else:
        kv, max_model_len = fleet_kv(ws, s.replicas, s.pressure)
    cap = prefill_capacity(s.profile, int(w.mean_prompt_tokens), max_model_len)
    rate = s.load * s.replicas * cap / w.mean_prompt_tokens
    base = SimConfig(replicas=s.replicas, profile=s.profile, kv_capacity_tokens=kv, max_model_len=max_model_len,
                     policy=s.policies[0], params=s.params, scrape_interval=s.scrape_interval, network_s=s.network_s,
                     observe_jitter_s=s.observe_jitter_s, index_capacity_tokens=s.index_capacity_tokens,
                     time_scale=s.time_scale, balancers=s.balancers, seed=s.seed)
    return rate, base


def run(s: SimSettings, *, command: str | None = None, workload: SizedWorkload | None = None) -> dict:
    """Simulate every policy of ``s`` on the same workload and fleet; the report (JSON-ready)."""
    s.validate()
    profile = get_profile(s.profile)
    model = s.model or profile.model
    t0 = time.perf_counter()
    w = workload or sized_workload(s.workload, s.requests, seed=s.seed, model=model)
    survey_s = time.perf_counter() - t0
    ws = w.shared_working_set_tokens
    rate, base = plan(s, w)
    kv, max_model_len = base.kv_capacity_tokens, base.max_model_len
    cap = prefill_capacity(s.profile, int(w.mean_prompt_tokens), max_model_len)
    print(f"prefixlb sim: workload {w.name} ({w.requests:,} requests, mean prompt {w.mean_prompt_tokens:.0f} tokens, "
          f"shared working set {ws:,} tokens) at {rate:,.2f} req/s: prompt tokens at {s.load:.0%} of the fleet's "
          f"prefill throughput ({s.replicas:,} x {cap:,.0f} tokens/s, {s.profile}); KV per replica "
          f"{kv if kv else 'profile default'} tokens", file=sys.stderr)
    bounds = _bounds(s, w, kv, max_model_len)
    targets = []
    for policy in s.policies:
        res = run_policy(w, rate, replace(base, policy=policy), progress=s.progress)
        targets.append({"name": policy, **res.summary()})
    pooled = bounds.get("pooled_hit_rate") if bounds else None
    floor = bounds.get("ttft_floor_ms") if bounds else None
    for t in targets:
        if floor:
            t["ttft_p90_over_floor_ms"] = round(t["ttft_p90_ms"] - floor["p90"], 1)
            t["ttft_p99_over_floor_ms"] = round(t["ttft_p99_ms"] - floor["p99"], 1)
        t["hit_rate_of_oracle"] = round(t["hit_rate"] / pooled, 3) if pooled else None
    report = {
        "workload": w.name,
        "simulator": True,
        "oracle_hit_rate": pooled,
        "ttft_floor_ms": floor,
        "bounds": bounds,
        "targets": targets,
        "setup": {
            "requests": w.requests, "rate_rps": round(rate, 3), "load": s.load,
            "load_definition": "offered prompt tokens/s over the fleet's prefill throughput, nothing cached",
            "mean_prompt_tokens": round(w.mean_prompt_tokens), "shared_working_set_tokens": ws,
            "kv_capacity_tokens_per_replica": kv,
            "fleet_kv_over_working_set": round(kv * s.replicas / ws, 2) if kv and ws else None,
            "index_capacity_tokens_per_replica": s.index_capacity_tokens, "replicas": s.replicas,
            "profile": s.profile, "scrape_interval_s": s.scrape_interval, "network_s": s.network_s,
            "observe_jitter_s": s.observe_jitter_s,
            "time_scale": s.time_scale, "balancers": s.balancers, "seed": s.seed,
            "workload_survey_s": round(survey_s, 1), "command": command, "machine": machine(),
        },
    }
    report["checks"] = checks(report)
    return report


def checks(report: dict) -> list[dict]:
    """The issue's targets, read off a report: cache_aware >= 90% of the pooled hit rate and
    the lowest TTFT p99 of all policies run."""
    by = {t["name"]: t for t in report["targets"]}
    p = by.get("cache_aware")
    out = []
    if p and report.get("oracle_hit_rate"):
        out.append({"check": "cache_aware hit rate >= 90% of the pooled cache's",
                    "value": f"{p['hit_rate']:.3f} / {report['oracle_hit_rate']:.3f} = {p['hit_rate_of_oracle']:.2f}",
                    "ok": p["hit_rate_of_oracle"] >= 0.9})
    others = [t for n, t in by.items() if n != "cache_aware"]
    if p and others:
        best = min(others, key=lambda t: t["ttft_p99_ms"])
        out.append({"check": "cache_aware has the lowest TTFT p99 of all policies",
                    "value": f"{p['ttft_p99_ms']:.0f} ms vs best other {best['name']} {best['ttft_p99_ms']:.0f} ms",
                    "ok": p["ttft_p99_ms"] <= best["ttft_p99_ms"]})
    return out


def _f(x, spec: str, none: str = "n/a") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def to_markdown(report: dict) -> str:
    """The report as the runner's Markdown table (plus the simulator's wall time per run)."""
    s = report["setup"]
    b = report.get("bounds") or {}
    floor = report.get("ttft_floor_ms")
    bound_txt = (f"pooled-cache hit rate **{report['oracle_hit_rate']:.1%}**, TTFT floor p50/p90/p99 "
                 f"**{floor['p50']:.0f} / {floor['p90']:.0f} / {floor['p99']:.0f} ms** ({b.get('method')})"
                 if report.get("oracle_hit_rate") is not None and floor else f"not computed ({b.get('note', 'off')})")
    lines = [f"### {report['workload']} (simulated): {s['requests']:,} requests at {s['rate_rps']:,} req/s "
             f"(prompt tokens at {s['load']:.0%} of prefill throughput), {s['replicas']:,} x {s['profile']}",
             "",
             (f"`{s['command']}` — " if s.get("command") else "") + f"{s['machine']['date']}. Shared working set "
             f"{s['shared_working_set_tokens']:,} tokens; fleet KV {s['fleet_kv_over_working_set'] or 'n/a'}x of it. "
             f"Bounds: {bound_txt}.",
             "",
             "| policy | hit rate | of pooled | TTFT p50 ms | p90 | p99 | p99 over floor | req/s | errors | "
             "busiest replica | learned prefill tok/s | sim wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['name']} | {t['hit_rate']:.1%} | {_f(t.get('hit_rate_of_oracle'), '.0%')} | "
                     f"{t['ttft_p50_ms']:.0f} | {t['ttft_p90_ms']:.0f} | {t['ttft_p99_ms']:.0f} | "
                     f"{_f(t.get('ttft_p99_over_floor_ms'), '+.0f')} | {t['throughput_rps']:,.1f} | {t['errors']} | "
                     f"{t['busiest_replica_share']:.1%} | {_f(t.get('learned_prefill_tokens_per_s'), ',.0f')} | "
                     f"{t['wall_s']:.1f} |")
    if report.get("checks"):
        lines += [""] + [f"- {'✅' if c['ok'] else '❌'} {c['check']}: {c['value']}" for c in report["checks"]]
    return "\n".join(lines) + "\n"
