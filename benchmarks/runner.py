"""prefixlb bench: one workload, every target, the same cold fleet each time, read against physics.

For each target -- prefixlb with ``cache_aware``, its baselines ``round_robin``,
``least_loaded``, ``consistent_hash``, and the peers sglang-router and vllm-router (their
``cache_aware``) -- a fresh emulated fleet starts cold (or the given real replicas are used),
the target starts in front of it, and the same seeded workload is driven open-loop, every
request streamed so its time to first token is measured at the client. Hit rates come from the
replicas' own ``vllm:prefix_cache_*`` counters. The bounds (benchmarks/bounds.py) -- the hit
rate of one pooled cache of the fleet's size, and each request's TTFT alone on an idle replica
holding that cache -- are computed once from the workload, so each result reads as a distance
from what physics allows.

Times are emulated milliseconds (the fleet runs ``--time-scale`` times faster than the hardware
its profile models; measured wall times are multiplied by it). Each request opens a fresh client
connection by default: sglang-router 0.3.2 holds SSE events ~40 ms on reused keep-alive
connections (no TCP_NODELAY; benchmarks/bench_overhead.py measures it), a fixed wall-clock
delay that the time scale would multiply into a penalty the peer does not deserve here.
``--keep-alive`` reuses connections as OpenAI clients do.

Usage:
  prefixlb bench --quick [--json OUT]            # < 5 minutes here
  prefixlb bench --workload mixed --pressure     # the fleet's KV < 1.5x the shared working set
  prefixlb bench --workload trace --trace FILE.jsonl --replica URL ...   # your traffic, your fleet
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bounds import Bounds, compute_bounds, percentile  # noqa: E402
from targets import ADMIN_TOKEN, PEERS, POLICY_TARGETS, PRECISE, SGLANG_LIKE, start_target  # noqa: E402

from prefixlb.emulator.fleet import start_fleet_process, start_fleet_processes  # noqa: E402
from prefixlb.emulator.replica import load_tokenizer  # noqa: E402
from prefixlb.engine import get_profile, request_prompt_ids  # noqa: E402
from prefixlb.loadgen import (  # noqa: E402
    RequestSpec,
    drive,
    replica_counters,
    shared_working_set,
    trace_workload,
)
from prefixlb.sim.workloads import workload_stream  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ALL_TARGETS = [*(t for t in POLICY_TARGETS if t != SGLANG_LIKE), *PEERS]
# opt-in: precise mode (its fleet publishes KV events), and prefixlb's proxy with the sglang rule
KNOWN_TARGETS = [*ALL_TARGETS, PRECISE, SGLANG_LIKE]


@dataclass
class Fleet:
    replicas: int = 4
    profile: str = "h100-llama3-8b"
    time_scale: float = 4.0
    kv_capacity_tokens: int | None = None  # per replica
    max_model_len: int = 16_384
    urls: list[str] = field(default_factory=list)  # real replicas instead of an emulated fleet
    process_per_replica: bool = False  # emulated replicas each in their own process
    # real replicas started fresh (cold) for each target: returns their URLs and a stop function
    factory: Callable[[], tuple[list[str], Callable[[], None]]] | None = None

    @property
    def real(self) -> bool:
        return bool(self.urls) or self.factory is not None


def make_workload(name: str, *, seed: int, scale: float, model: str, trace: str | None = None) -> list[RequestSpec]:
    """The named workload at ``scale`` (1.0 = the full benchmark; --quick uses less), as
    :func:`prefixlb.sim.workloads.workload_stream` defines it for the simulator too. Rates are set
    later from the fleet's capacity (``retime``)."""
    if name == "trace":
        if not trace:
            raise SystemExit("prefixlb bench: --workload trace needs --trace FILE.jsonl")
        return trace_workload(trace, model=model)
    try:
        return list(workload_stream(name, seed=seed, scale=scale, model=model))
    except ValueError:
        raise SystemExit(f"prefixlb bench: unknown workload {name!r}") from None


def retime(specs: list[RequestSpec], rate: float) -> list[RequestSpec]:
    """Scale arrival times so the mean rate is ``rate`` requests per (emulated) second, keeping
    each workload's own structure (think times, ramps, conversation order)."""
    span = specs[-1].at if specs else 0.0
    if span <= 0:
        return specs
    f = (len(specs) / rate) / span
    return [RequestSpec(r.at * f, r.path, r.body, r.group, r.shared_tokens) for r in specs]


def prefill_capacity(profile: str, prompt_tokens: int, max_model_len: int) -> float:
    """Prompt tokens per second one replica prefills (a lone request of the mean size)."""
    from prefixlb.engine import Engine, EngineRequest

    e = Engine(profile, max_model_len=max_model_len, enable_kv_events=False, grade_quality=False, hash_algo="fast")
    e.add_request(EngineRequest("probe", list(range(3, 3 + prompt_tokens)), max_tokens=1, ignore_eos=True), 0.0)
    t = 0.0
    while e.has_unfinished():
        t = e.step(t).end
    return prompt_tokens / t


async def emulator_health(urls: list[str]) -> dict:
    """How well the emulated fleet kept its time scale: late steps and re-anchorings."""
    import aiohttp

    steps = late = rebases = 0.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for u in urls:
            try:
                async with s.get(u + "/metrics") as r:
                    text = await r.text()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                continue
            for line in text.splitlines():
                if line.startswith("prefixlb_emulator_steps_total"):
                    steps += float(line.rsplit(" ", 1)[1])
                elif line.startswith("prefixlb_emulator_late_steps_total"):
                    late += float(line.rsplit(" ", 1)[1])
                elif line.startswith("prefixlb_emulator_rebases_total"):
                    rebases += float(line.rsplit(" ", 1)[1])
    return {"emulator_late_step_share": round(late / steps, 4) if steps else None, "emulator_rebases": int(rebases)}


async def _get_text(url: str, headers: dict | None = None) -> str | None:
    """The body of a GET (5 s at most), or None if it failed or was not a 200."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, \
                s.get(url, headers=headers) as r:
            return await r.text() if r.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def prediction_error(base: str) -> dict:
    """prefixlb's predicted cached tokens against what the replicas reported (its own counters)."""
    text = await _get_text(base + "/metrics")
    if text is None:
        return {}
    pred = act = 0.0
    for line in text.splitlines():
        if line.startswith("prefixlb_predicted_cached_tokens_total"):
            pred += float(line.rsplit(" ", 1)[1])
        elif line.startswith("prefixlb_actual_cached_tokens_total"):
            act += float(line.rsplit(" ", 1)[1])
    return {"predicted_cached_tokens": round(pred), "actual_cached_tokens": round(act),
            "cached_prediction_error": round(abs(pred - act) / act, 4) if act else None}


async def balancer_state(base: str) -> dict:
    """What prefixlb learned by the end of the run (``GET /admin/replicas``): per replica its
    prefill rate, KV capacity and last scrape -- to read a result against the simulator's."""
    text = await _get_text(base + "/admin/replicas", {"authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        return {"balancer_state": json.loads(text)} if text else {}
    except ValueError:
        return {}


async def _run_target(name: str, specs: list[RequestSpec], fleet: Fleet, args) -> dict:
    proc = None
    stop_real = None
    if fleet.factory is not None:
        urls, stop_real = fleet.factory()
    elif fleet.urls:
        urls = fleet.urls
    else:
        events = {"kv_events_endpoint": "tcp://127.0.0.1:*", "kv_replay_endpoint": "tcp://127.0.0.1:*"} \
            if name == PRECISE else {}
        start = start_fleet_processes if fleet.process_per_replica else start_fleet_process
        proc = start(fleet.replicas, base_port=0, profile=fleet.profile, time_scale=fleet.time_scale,
                     kv_capacity_tokens=fleet.kv_capacity_tokens, max_model_len=fleet.max_model_len,
                     startup_timeout=90, **events)
        urls = proc.urls
    try:
        model = specs[0].body.get("model", "")
        probe_body = json.dumps({"model": model, "messages": [{"role": "user", "content": "ping"}],
                                 "max_tokens": 1}).encode()
        precise = {"tokenizer": args.tokenizer or "byte",
                   "block_size": args.block_size or get_profile(fleet.profile).block_size}
        target = start_target(name, urls, probe=("/v1/chat/completions", probe_body), precise=precise)
        try:
            before = await replica_counters(urls)
            cpu0 = target.cpu_ns()
            bar = _progress(len(specs), name)
            # --bypass: the chosen requests go round-robin straight to the replicas (another client
            # of the same fleet, which the balancer does not see); the same requests for every target
            mask = bypass_mask(len(specs), getattr(args, "bypass", 0.0), args.seed)
            direct = None
            if any(mask):
                k = itertools.count()
                direct = [urls[next(k) % len(urls)] if m else None for m in mask]
            try:
                outs, wall = await drive(target.url, specs, time_scale=fleet.time_scale, progress=bar,
                                         fresh_connections=not args.keep_alive, direct=direct)
            finally:
                bar.close()
            after = await replica_counters(urls)
            cpu_s = (target.cpu_ns() - cpu0) / 1e9
            health = await emulator_health(urls) if proc is not None else {}
            if name in POLICY_TARGETS or name == PRECISE:
                health.update(await prediction_error(target.url))
                health.update(await balancer_state(target.url))
        finally:
            target.stop()
    finally:
        if proc is not None:
            proc.stop()
        if stop_real is not None:
            stop_real()
    out = _summarize(name, outs, wall, fleet.time_scale, before, after, urls)
    # the balancer's own CPU: on a small machine it competes with the emulated fleet for cores
    out["balancer_cpu_ms_per_request"] = round(1e3 * cpu_s / max(1, len(outs)), 3)
    out.update(health)
    if health.get("emulator_rebases") or (health.get("emulator_late_step_share") or 0) > 0.05:
        print(f"prefixlb bench: WARNING: the emulated fleet fell behind its time scale during {name} "
              f"({health}); its timings are stretched -- lower --time-scale", file=sys.stderr)
    return out


def _run_all(names: list[str], specs: list[RequestSpec], fleet: Fleet, args) -> list[dict]:
    """Every target, one after another, each on a fresh cold fleet."""
    results = []
    for name in names:
        try:
            results.append(asyncio.run(_run_target(name, specs, fleet, args)))
        except RuntimeError as exc:
            print(f"prefixlb bench: skipping {name}: {exc}", file=sys.stderr)
            results.append({"name": name, "skipped": str(exc)})
    return results


def bypass_mask(n: int, fraction: float, seed: int) -> list[bool]:
    """Which of ``n`` requests bypass the balancer (``--bypass``): a seeded draw, the same for
    every target of a run."""
    if not fraction:
        return [False] * n
    rng = random.Random(seed * 7919 + 17)
    return [rng.random() < fraction for _ in range(n)]


def _summarize(name, outs, wall, scale, before, after, urls) -> dict:
    bypassed = [o for o in outs if o.bypassed]
    outs = [o for o in outs if not o.bypassed]  # latency and errors: what went through the target
    ok = [o for o in outs if o.ok]
    ttfts = [o.ttft * 1e3 for o in ok if o.ttft is not None]
    dq = sum(after[u][0] - before[u][0] for u in urls)
    dh = sum(after[u][1] - before[u][1] for u in urls)
    per_replica = {u: dq_u for u, dq_u in ((u, after[u][0] - before[u][0]) for u in urls)}
    total_q = sum(per_replica.values()) or 1
    out = {
        "name": name,
        "hit_rate": round(dh / dq, 4) if dq else 0.0,
        "ttft_p50_ms": round(percentile(ttfts, 0.5), 1),
        "ttft_p90_ms": round(percentile(ttfts, 0.9), 1),
        "ttft_p99_ms": round(percentile(ttfts, 0.99), 1),
        "ttft_mean_ms": round(sum(ttfts) / len(ttfts), 1) if ttfts else math.nan,
        "e2e_p50_ms": round(percentile([o.e2e * 1e3 for o in ok], 0.5), 1),
        "throughput_rps": round(len(ok) / (wall * scale), 2) if wall else 0.0,
        "errors": len(outs) - len(ok),
        "error_examples": sorted({f"{o.status}: {o.error[:160]}" for o in outs if not o.ok})[:3],
        "requests": len(outs),
        "busiest_replica_share": round(max(per_replica.values()) / total_q, 3),
        "ttfts_ms": sorted(ttfts),
    }
    if bypassed:
        # the replicas' counters count the bypassing traffic too: the routed requests' own hit
        # rate comes from their answers' usage (cached_tokens)
        rp = sum(o.prompt_tokens for o in ok if o.cached_tokens is not None)
        out["routed_hit_rate"] = round(sum(o.cached_tokens or 0 for o in ok) / rp, 4) if rp else None
        out["bypassed_requests"] = len(bypassed)
        out["bypassed_errors"] = sum(1 for o in bypassed if not o.ok)
    return out


class _progress:
    def __init__(self, total: int, label: str) -> None:
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{label:>16}", unit="req", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None
            self.n, self.total, self.label = 0, total, label

    def __call__(self, k: int) -> None:
        if self.bar is not None:
            self.bar.update(k)
        else:
            self.n += k
            if self.n % max(1, self.total // 10) == 0:
                print(f"{self.label}: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="prefixlb bench", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return ap.parse_args(argv)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--workload", default="mixed",
                    help="tenants | llmd | chat | docqa | agent | unique | mixed | trace (default mixed)")
    ap.add_argument("--trace", help="JSONL trace for --workload trace (see prefixlb.loadgen.trace_workload)")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help=f"comma-separated, from {', '.join(KNOWN_TARGETS)} (default: all but {PRECISE} and {SGLANG_LIKE})")
    ap.add_argument("--quick", action="store_true", help="a smaller workload and fewer targets' requests (< 5 min)")
    ap.add_argument("--scale", type=float, default=None, help="workload size multiplier (default 1, --quick 0.35)")
    ap.add_argument("--load", type=float, default=0.6,
                    help="offered prompt tokens per second as a fraction of the fleet's prefill throughput, "
                         "counting every prompt token as if nothing were cached (default 0.6)")
    ap.add_argument("--pressure", type=float, default=1.2, metavar="X",
                    help="size the fleet's total KV at X times the workload's shared working set (default 1.2); "
                         "0 = the profile's capacity")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--profile", default="h100-llama3-8b")
    ap.add_argument("--time-scale", type=float, default=4.0)
    ap.add_argument("--replica", action="append", default=[], metavar="URL",
                    help="benchmark real replicas (e.g. vLLM) instead of an emulated fleet; their caches are not "
                         "reset between targets")
    ap.add_argument("--model", default=None, help="served model name sent in requests (default: the profile's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bypass", type=float, default=0.0, metavar="F",
                    help="send this fraction of the requests (seeded, the same for every target) straight to the "
                         "replicas, round-robin: another client of the fleet that the balancer does not see. "
                         "Latency is reported for the routed requests (default 0)")
    ap.add_argument("--process-per-replica", action="store_true",
                    help="run each emulated replica in its own process (real replicas are independent; in one "
                         "process they share an event loop and delay each other's steps); default: one process")
    ap.add_argument("--keep-alive", action="store_true",
                    help="reuse client connections (default: a fresh connection per request; see the module doc)")
    ap.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="Hugging Face tokenizer directory for token counts and the bounds (real replicas' model); "
                         "default: the emulator's byte tokenizer")
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV block size for the bounds (default: the profile's; real vLLM on CPU uses 32)")
    ap.add_argument("--replica-kv-tokens", type=int, default=None, metavar="N",
                    help="KV capacity per real replica (--replica), in tokens, for the pooled-cache bound")
    ap.add_argument("--loads", default=None, metavar="L1,L2,...",
                    help="also run every target at these offered loads and plot hit rate and TTFT p99 against load")
    ap.add_argument("--json", type=Path, default=None, help="write the result object here")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for JSON, Markdown and plots")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--name", default=None, help="results file stem (default bench_<workload>[_quick])")


def run(args: argparse.Namespace, fleet_factory: Callable[[], tuple[list[str], Callable[[], None]]] | None = None,
        specs: list[RequestSpec] | None = None) -> dict:
    """Run the benchmark ``args`` describe. ``fleet_factory`` (with ``args.replicas``) starts real
    replicas afresh for each target instead of reusing ``--replica`` URLs whose caches are warm;
    ``specs`` replaces the named workload (its arrival times are rescaled to ``args.load``)."""
    scale = args.scale if args.scale is not None else (0.35 if args.quick else 1.0)
    profile = get_profile(args.profile)
    model = args.model or profile.model
    if specs is None:
        specs = make_workload(args.workload, seed=args.seed, scale=scale, model=model, trace=args.trace)
    tok = load_tokenizer(args.tokenizer)
    mean_prompt = sum(len(request_prompt_ids(tok, r.body, r.chat)) for r in specs[:200]) / min(len(specs), 200)
    ws = shared_working_set(specs)  # in the byte tokenizer's tokens (the workloads' unit)
    if args.tokenizer:  # the same working set counted in the given tokenizer's tokens
        base = load_tokenizer(None)
        n = min(len(specs), 200)
        ws = int(ws * mean_prompt / (sum(len(request_prompt_ids(base, r.body, r.chat)) for r in specs[:n]) / n))
    kv = None
    real = bool(args.replica) or fleet_factory is not None
    if args.pressure and ws and not real:
        kv = max(int(args.pressure * ws / args.replicas), args.__dict__.get("min_kv", 0), 20_000)
    elif real and args.replica_kv_tokens:
        kv = args.replica_kv_tokens
    fleet = Fleet(replicas=args.replicas if not args.replica else len(args.replica), profile=args.profile,
                  time_scale=args.time_scale if not real else 1.0, kv_capacity_tokens=kv,
                  max_model_len=min(16_384, kv - 256 if kv else 16_384), urls=list(args.replica), factory=fleet_factory,
                  process_per_replica=args.process_per_replica)
    bounds: Bounds = compute_bounds(specs, profile=args.profile, replicas=fleet.replicas, kv_capacity_tokens=kv,
                                    max_model_len=fleet.max_model_len, block_size=args.block_size,
                                    tokenizer=args.tokenizer)
    cap = prefill_capacity(args.profile, int(mean_prompt), fleet.max_model_len)
    if args.workload != "trace":
        specs = retime(specs, args.load * fleet.replicas * cap / mean_prompt)
    rate = len(specs) / specs[-1].at if specs and specs[-1].at else 0.0
    bypass = getattr(args, "bypass", 0.0)
    if not 0.0 <= bypass < 1.0:
        raise SystemExit(f"prefixlb bench: --bypass must be in [0, 1), got {bypass}")
    if bypass:  # TTFT is measured on the routed requests: read it against their floors
        mask = bypass_mask(len(specs), bypass, args.seed)
        routed = [f for f, m in zip(bounds.floors_ms, mask) if not m]
        bounds.ttft_floor_ms = {q: round(percentile(routed, v), 2) for q, v in (("p50", 0.5), ("p90", 0.9),
                                                                              ("p99", 0.99))}
    print(f"prefixlb bench: workload {args.workload} ({len(specs)} requests, mean prompt {mean_prompt:.0f} tokens, "
          f"shared working set {ws:,} tokens) at {rate:.2f} req/s: prompt tokens at {args.load:.0%} of the fleet's "
          f"prefill throughput ({fleet.replicas} x {cap:,.0f} tokens/s, {args.profile}); KV per replica "
          f"{kv if kv else 'profile default'} tokens", file=sys.stderr)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    for name in names:
        if name not in KNOWN_TARGETS:
            raise SystemExit(f"prefixlb bench: unknown target {name!r}; known: {', '.join(KNOWN_TARGETS)}")
    results = _run_all(names, specs, fleet, args)
    sweep = []
    if args.loads and args.workload != "trace":
        per_token = rate / args.load  # requests/s at load 1.0
        for load in sorted({float(x) for x in args.loads.split(",") if x.strip()}):
            if math.isclose(load, args.load):
                rows = results
            else:
                print(f"prefixlb bench: load {load:.0%}", file=sys.stderr)
                rows = _run_all(names, retime(specs, load * per_token), fleet, args)
            sweep += [{"load": load, **{k: v for k, v in r.items() if k != "ttfts_ms"}} for r in rows]
    report = {
        "workload": args.workload,
        "oracle_hit_rate": round(bounds.pooled_hit_rate, 4),
        "ttft_floor_ms": bounds.ttft_floor_ms,
        "targets": [{k: v for k, v in r.items() if k != "ttfts_ms"} for r in results],
        "setup": {
            "requests": len(specs), "rate_rps": round(rate, 3), "load": args.load,
            "load_definition": "offered prompt tokens/s over the fleet's prefill throughput, nothing cached",
            "mean_prompt_tokens": round(mean_prompt),
            "shared_working_set_tokens": ws, "kv_capacity_tokens_per_replica": kv,
            "fleet_kv_over_working_set": round(kv * fleet.replicas / ws, 2) if kv and ws else None,
            "replicas": fleet.replicas, "profile": args.profile, "time_scale": fleet.time_scale,
            "process_per_replica": fleet.process_per_replica,
            "real_replicas": real, "seed": args.seed, "keep_alive": args.keep_alive, "bypass": bypass,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": getattr(args, "command_line", None)
            or " ".join(["prefixlb", "bench"] + [a for a in sys.argv[1:2] if a != "bench"] + sys.argv[2:]),
        },
    }
    for t in report["targets"]:
        if "skipped" not in t:
            t["ttft_p90_over_floor_ms"] = round(t["ttft_p90_ms"] - bounds.ttft_floor_ms["p90"], 1)
            t["ttft_p99_over_floor_ms"] = round(t["ttft_p99_ms"] - bounds.ttft_floor_ms["p99"], 1)
            t["hit_rate_of_oracle"] = round(t["hit_rate"] / bounds.pooled_hit_rate, 3) if bounds.pooled_hit_rate else None
    if sweep:
        for t in sweep:
            if "skipped" not in t:
                t["ttft_p99_over_floor_ms"] = round(t["ttft_p99_ms"] - bounds.ttft_floor_ms["p99"], 1)
        report["sweep"] = sweep
    report["checks"] = _checks(report)
    _write(report, results, bounds, args)
    return report


#: a target that fails more of its requests than this is not compared on latency: its
#: percentiles are over the few requests it answered
MAX_ERROR_SHARE = 0.01


def _checks(report: dict) -> list[dict]:
    by = {t["name"]: t for t in report["targets"] if "skipped" not in t}
    out = []
    for n, t in list(by.items()):
        if n != "prefixlb" and t["errors"] > MAX_ERROR_SHARE * max(1, t["requests"]):
            del by[n]
            out.append({"check": f"{n} excluded from the latency comparisons", "ok": None,
                        "value": f"{t['errors']} of {t['requests']} requests failed "
                                 f"({'; '.join(t.get('error_examples') or []) or 'no detail'})"})
    p = by.get("prefixlb")
    if p and report["oracle_hit_rate"] and not report["setup"].get("bypass"):
        # (with --bypass the replicas' counters include traffic no router placed: no bound applies)
        out.append({"check": "prefixlb hit rate >= 90% of the pooled cache's",
                    "value": f"{p['hit_rate']:.3f} / {report['oracle_hit_rate']:.3f} = {p['hit_rate_of_oracle']:.2f}",
                    "ok": p["hit_rate_of_oracle"] >= 0.9})
    g = by.get("sglang-router")
    if p and g:
        for q in ("p90", "p99"):
            a, b = p[f"ttft_{q}_over_floor_ms"], g[f"ttft_{q}_over_floor_ms"]
            out.append({"check": f"prefixlb TTFT {q} distance from floor <= half of sglang-router's",
                        "value": f"{a:.0f} ms vs {b:.0f} ms", "ok": a <= 0.5 * b})
    others = [t for n, t in by.items() if n != "prefixlb"]
    if p and others:
        best = min(others, key=lambda t: t["ttft_p99_ms"])
        out.append({"check": "prefixlb has the lowest TTFT p99 of all targets",
                    "value": f"{p['ttft_p99_ms']:.0f} ms vs best other {best['name']} {best['ttft_p99_ms']:.0f} ms",
                    "ok": p["ttft_p99_ms"] <= best["ttft_p99_ms"]})
    return out


def to_markdown(report: dict) -> str:
    s = report["setup"]
    lines = [f"### {report['workload']}: {s['requests']} requests at {s['rate_rps']} req/s (prompt tokens at "
             f"{s['load']:.0%} of prefill throughput), {s['replicas']} x {s['profile']}" + (" (real replicas)" if s["real_replicas"] else
                                                               f" emulated at {s['time_scale']:g}x" + (", a process per replica" if s.get("process_per_replica") else "")),
             "",
             f"`{s['command']}` — {s['date']}. Shared working set {s['shared_working_set_tokens']:,} tokens; "
             + (f"fleet KV {s['fleet_kv_over_working_set']}x of it" if s["fleet_kv_over_working_set"] else
                "fleet KV: the profile's") + ". Bounds: pooled-cache hit rate "
             f"**{report['oracle_hit_rate']:.1%}**, TTFT floor p50/p90/p99 **{report['ttft_floor_ms']['p50']:.0f} / "
             f"{report['ttft_floor_ms']['p90']:.0f} / {report['ttft_floor_ms']['p99']:.0f} ms** ("
             f"{'modelled from the profile' if s['real_replicas'] else 'emulated'})."
             + (f" **{s['bypass']:.0%} of the requests bypass the balancer** (sent round-robin straight to the "
                "replicas, the same requests for every target): TTFT, its floor and 'routed hit' are the routed "
                "requests'; 'hit rate' counts all traffic (replica counters)." if s.get("bypass") else ""),
             "",
             "| target | hit rate | of pooled | TTFT p50 ms | p90 | p99 | p90 over floor | p99 over floor | req/s | "
             "errors | busiest replica | emulator late steps | balancer CPU ms/req |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["targets"]:
        if "skipped" in t:
            lines.append(f"| {t['name']} | skipped: {t['skipped']} ||||||||||| ")
            continue
        of_pooled = "n/a" if t.get("hit_rate_of_oracle") is None else format(t["hit_rate_of_oracle"], ".0%")
        hit = f"{t['hit_rate']:.1%}" + (f" (routed hit {t['routed_hit_rate']:.1%})"
                                          if t.get("routed_hit_rate") is not None else "")
        lines.append(f"| {t['name']} | {hit} | {of_pooled} | {t['ttft_p50_ms']:.0f} | "
                     f"{t['ttft_p90_ms']:.0f} | {t['ttft_p99_ms']:.0f} | +{t['ttft_p90_over_floor_ms']:.0f} | "
                     f"+{t['ttft_p99_over_floor_ms']:.0f} | {t['throughput_rps']:.2f} | {t['errors']} | "
                     f"{t['busiest_replica_share']:.0%} | "
                     f"{'n/a' if t.get('emulator_late_step_share') is None else format(t['emulator_late_step_share'], '.1%')} | "
                     f"{t.get('balancer_cpu_ms_per_request', 'n/a')} |")
    if report["checks"]:
        mark = {True: "✅", False: "❌", None: "⚠️"}
        lines += [""] + [f"- {mark[c['ok']]} {c['check']}: {c['value']}" for c in report["checks"]]
    if report.get("sweep"):
        lines += ["", "Against offered load (hit rate / TTFT p99 ms):", "",
                  "| target | " + " | ".join(f"{x:.0%}" for x in sorted({t['load'] for t in report['sweep']})) + " |",
                  "|---|" + "---|" * len({t['load'] for t in report['sweep']})]
        loads = sorted({t["load"] for t in report["sweep"]})
        for name in dict.fromkeys(t["name"] for t in report["sweep"]):
            cells = []
            for x in loads:
                t = next((t for t in report["sweep"] if t["name"] == name and t["load"] == x), None)
                cells.append("–" if t is None or "skipped" in t else f"{t['hit_rate']:.1%} / {t['ttft_p99_ms']:.0f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(report: dict, results: list[dict], bounds: Bounds, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"bench_{report['workload']}" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plots:
        try:
            _plot(results, bounds, args.out / f"{stem}_ttft_cdf.png", report)
            if report.get("sweep"):
                _plot_sweep(report, args.out / f"{stem}_vs_load.png")
        except ImportError:
            print("prefixlb bench: matplotlib not installed; no plots (pip install 'prefixlb[bench]')", file=sys.stderr)
    print(to_markdown(report))


def _plot(results: list[dict], bounds: Bounds, path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    floor = sorted(bounds.floors_ms)
    ax.plot(floor, [(i + 1) / len(floor) for i in range(len(floor))], "k--", label="floor (pooled cache, idle)")
    for r in results:
        xs = r.get("ttfts_ms")
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{r['name']} (hit {r['hit_rate']:.0%})")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (emulated ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT CDF — {report['workload']} ({report['setup']['requests']} requests, "
                 f"{report['setup']['load']:.0%} load)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sweep(report: dict, path: Path) -> None:
    """Hit rate and TTFT p99 against offered load, one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    rows = [t for t in report["sweep"] if "skipped" not in t]
    for name in dict.fromkeys(t["name"] for t in rows):
        pts = sorted((t["load"], t["hit_rate"], t["ttft_p99_ms"]) for t in rows if t["name"] == name)
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        b.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    a.axhline(report["oracle_hit_rate"], color="k", ls="--", lw=1, label="pooled cache (upper bound)")
    b.axhline(report["ttft_floor_ms"]["p99"], color="k", ls="--", lw=1, label="floor p99 (lower bound)")
    a.set_xlabel("offered load (prompt tokens / fleet prefill throughput)")
    b.set_xlabel("offered load (prompt tokens / fleet prefill throughput)")
    a.set_ylabel("prefix-cache hit rate (replica counters)")
    b.set_ylabel("TTFT p99 (emulated ms, log scale)")
    b.set_yscale("log")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(f"{report['workload']}: {report['setup']['requests']} requests, {report['setup']['replicas']} replicas")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    report = run(build_args(argv))
    return 0 if all(c["ok"] is not False for c in report["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
