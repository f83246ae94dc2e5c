"""flood: a million unique prompts, and the prefix index's memory stays within its configured bound.

Two parts.

1. The routing core directly (no HTTP: the index sits behind ``TierRouter``, and this is where
   its memory lives). ``prefixlb.routing.TierRouter`` with R replicas, each given an index
   capacity (``add_replica(..., capacity_tokens=C)``, as ``tiers[].replicas[].capacity_tokens``
   configures it), receives N unique chat prompts through the calls the server makes per request:
   ``decide`` -> ``dispatched`` -> ``first_token`` -> ``finished`` (with a usage dict), and
   ``maintain`` every 0.25 s of a virtual clock (the server's tick). Along the way
   ``router.index.stats()`` (``entries``, ``unique_blocks``, ``evictions``, ``bytes``, and per
   replica ``blocks``/``capacity``/``evictions``) and this process's RSS are sampled.
   The bound: entries never exceed the sum of the per-replica capacities, each replica's blocks
   never exceed its capacity, ``bytes`` stays within 64 bytes per configured entry (the index's
   documented target, benchmarks/bench_index.py) plus 1 MiB, and neither ``bytes`` nor RSS grows
   by more than 5% from the moment the index is first full to the end.
2. The same through the server: ``prefixlb serve`` (a real process) in front of an emulated
   fleet, with ``capacity_tokens`` configured per replica, gets M unique prompts (non-streaming,
   one output token, 32 clients); ``prefixlb_index_blocks`` per replica (from ``/metrics``) and
   the balancer's RSS (``/proc/PID/status``) are sampled. The bound: each replica's blocks never
   exceed its configured capacity in blocks, and the balancer's RSS grows by at most 5% over the
   second half of the run (it rises over the first ~50,000 requests as the process warms up,
   then stays flat).

Usage:
  python benchmarks/reliability/flood.py                 # 1,000,000 prompts + 100,000 over HTTP (~2 min)
  python benchmarks/reliability/flood.py --quick         # 50,000 + 2,000 (~25 s)
  python benchmarks/reliability/flood.py --prompts N --http-prompts M --no-http
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    check,
    checks_md,
    command_line,
    header_md,
    machine,
    rss_kib,
    scrape,
    start_balancer,
    start_emulators,
    write_report,
)

from prefixlb.index import IMPLEMENTATION
from prefixlb.loadgen import text_of_tokens
from prefixlb.routing import TierRouter, prompt_key

BYTES_PER_ENTRY_TARGET = 64  # benchmarks/bench_index.py: <= 64 bytes per (block, replica) entry
FIXED_ALLOWANCE = 1 << 20


def _prompts(n: int, tokens: int, seed: int):
    """n unique chat bodies: the request number leads the text, so every first block differs."""
    rng = random.Random(seed)
    for i in range(n):
        yield {"model": "auto", "messages": [{"role": "user", "content": f"<{i}> " + text_of_tokens(rng, tokens)}],
               "max_tokens": 1}


def flood_core(prompts: int, replicas: int, capacity_tokens: int, prompt_tokens: int, samples: int,
               seed: int = 0) -> dict:
    """Part 1: the routing core, as the server drives it, on a virtual clock."""
    now = [0.0]
    router = TierRouter("flood", policy="cache_aware", seed=seed, clock=lambda: now[0])
    for i in range(replicas):
        router.add_replica(i, f"http://replica-{i}", capacity_tokens)
    cap_blocks = {rid: row["capacity"] for rid, row in router.index.stats()["per_replica"].items()}
    total_cap = sum(cap_blocks.values())
    bound_bytes = total_cap * BYTES_PER_ENTRY_TARGET + FIXED_ALLOWANCE
    every = max(1, prompts // samples)
    series = []
    first_full_at = None
    max_entries = 0
    over_replica = 0
    gc.collect()
    rss0 = rss_kib(os.getpid())
    t0 = time.perf_counter()
    next_tick = 0.25
    for i, body in enumerate(_prompts(prompts, prompt_tokens, seed)):
        key = prompt_key(body, True)
        t = now[0]
        d = router.decide(key, t, max_tokens=1)
        router.dispatched(d, t)
        router.first_token(d, t + 0.02)
        usage = {"prompt_tokens": int(key.text_bytes / 4), "completion_tokens": 1,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        router.finished(d, t + 0.03, usage, prompt_text_bytes=key.text_bytes)
        now[0] = t + 0.001  # 1,000 requests per virtual second
        if now[0] >= next_tick:
            router.maintain(now[0])
            next_tick += 0.25
        if (i + 1) % every == 0 or i + 1 == prompts:
            st = router.index.stats()
            per = st["per_replica"]
            max_entries = max(max_entries, st["entries"])
            over_replica += sum(1 for r in per.values() if r["blocks"] > r["capacity"])
            if first_full_at is None and st["entries"] >= 0.99 * total_cap:
                first_full_at = i + 1
            series.append({"prompts": i + 1, "seconds": round(time.perf_counter() - t0, 2),
                           "entries": st["entries"], "unique_blocks": st["unique_blocks"],
                           "evictions": st["evictions"], "bytes": st["bytes"], "rss_kib": rss_kib(os.getpid()),
                           "max_replica_blocks": max(r["blocks"] for r in per.values()),
                           "inflight": sum(r.inflight for r in router.replicas.values())})
    wall = time.perf_counter() - t0
    after_full = [s for s in series if first_full_at is not None and s["prompts"] >= first_full_at]
    bytes_growth = rss_growth = None
    if len(after_full) >= 2:
        bytes_growth = (after_full[-1]["bytes"] - after_full[0]["bytes"]) / after_full[0]["bytes"] * 100
        rss_growth = (max(s["rss_kib"] for s in after_full) - after_full[0]["rss_kib"]) / after_full[0]["rss_kib"] * 100
    last = series[-1]
    return {
        "prompts": prompts, "replicas": replicas, "capacity_tokens_per_replica": capacity_tokens,
        "capacity_blocks_per_replica": sorted(set(cap_blocks.values())), "capacity_entries_total": total_cap,
        "prompt_tokens": prompt_tokens, "blocks_per_prompt": len(prompt_key(next(_prompts(1, prompt_tokens, seed)),
                                                                              True).data) // router.block_bytes,
        "index_implementation": IMPLEMENTATION, "seconds": round(wall, 1),
        "us_per_request": round(wall / prompts * 1e6, 2),
        "bound_bytes": bound_bytes, "max_bytes": max(s["bytes"] for s in series), "final": last,
        "max_entries": max_entries, "replica_samples_over_capacity": over_replica,
        "first_full_at_prompt": first_full_at,
        "bytes_growth_after_full_pct": None if bytes_growth is None else round(bytes_growth, 3),
        "rss_growth_after_full_pct": None if rss_growth is None else round(rss_growth, 3),
        "rss_kib_start": rss0, "rss_kib_end": last["rss_kib"],
        "bytes_per_entry_at_end": round(last["bytes"] / max(1, last["entries"]), 1),
        "series": series,
    }


async def flood_http(prompts: int, replicas: int, capacity_tokens: int, prompt_tokens: int, clients: int,
                     samples: int, seed: int = 1, workdir: Path | None = None) -> dict:
    """Part 2: the same through ``prefixlb serve`` in front of an emulated fleet."""
    fleets = start_emulators(replicas, time_scale=50, profile="h100-llama3-8b")
    balancer = None
    try:
        urls = fleets[0].urls
        config = {"tiers": [{"name": "default",
                             "replicas": [{"url": u, "capacity_tokens": capacity_tokens} for u in urls]}],
                  "health": {"interval_s": 1.0}}
        balancer = await asyncio.to_thread(start_balancer, config, args=["--log-level", "warning"],
                                           want_healthy=replicas)
        base, pid = balancer.url, balancer.pid
        # the index capacity in blocks, as the balancer computes it (block_bytes 64, 4 bytes a token)
        cap_blocks = max(1, int(capacity_tokens * 4.0 / 64))
        bodies = _prompts(prompts, prompt_tokens, seed)
        every = max(1, prompts // samples)
        series: list[dict] = []
        errors = 0
        done = 0
        statuses: dict[int, int] = {}
        lock = asyncio.Lock()
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
            t0 = time.perf_counter()

            async def sample() -> None:
                m = await scrape(s, base)
                blocks = m.by("prefixlb_index_blocks", "replica")
                series.append({"prompts": done, "seconds": round(time.perf_counter() - t0, 2),
                               "rss_kib": rss_kib(pid), "index_blocks": sum(blocks.values()),
                               "max_replica_blocks": max(blocks.values()) if blocks else 0,
                               "inflight": m.sum("prefixlb_inflight_requests")})

            async def client() -> None:
                nonlocal done, errors
                while True:
                    async with lock:
                        body = next(bodies, None)
                    if body is None:
                        return
                    try:
                        async with s.post(base + "/v1/chat/completions", data=orjson.dumps(body),
                                          headers={"content-type": "application/json"}) as r:
                            await r.read()
                            statuses[r.status] = statuses.get(r.status, 0) + 1
                            if r.status != 200:
                                errors += 1
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        errors += 1
                    done += 1
                    if done % every == 0:
                        await sample()

            await sample()
            await asyncio.gather(*(client() for _ in range(clients)))
            wall = time.perf_counter() - t0
            await asyncio.sleep(0.3)
            await sample()
    finally:
        if balancer is not None:
            balancer.stop()
        for f in fleets:
            f.stop()
    full_at = next((x["prompts"] for x in series if x["index_blocks"] >= 0.99 * cap_blocks * replicas), None)
    after = [x for x in series if full_at is not None and x["prompts"] >= full_at]
    rss_growth = None
    if len(after) >= 2:
        rss_growth = (max(x["rss_kib"] for x in after) - after[0]["rss_kib"]) / after[0]["rss_kib"] * 100
    half = [x for x in series if x["prompts"] >= prompts / 2]
    rss_growth_2nd_half = (max(x["rss_kib"] for x in half) - half[0]["rss_kib"]) / half[0]["rss_kib"] * 100
    return {
        "prompts": prompts, "replicas": replicas, "capacity_tokens_per_replica": capacity_tokens,
        "capacity_blocks_per_replica": cap_blocks, "prompt_tokens": prompt_tokens, "clients": clients,
        "seconds": round(wall, 1), "requests_per_s": round(prompts / wall, 1), "errors": errors,
        "statuses": statuses, "max_replica_blocks": max(x["max_replica_blocks"] for x in series),
        "first_full_at_prompt": full_at,
        "rss_growth_after_full_pct": None if rss_growth is None else round(rss_growth, 2),
        "rss_growth_second_half_pct": round(rss_growth_2nd_half, 2), "rss_kib_half": half[0]["rss_kib"],
        "rss_kib_start": series[0]["rss_kib"], "rss_kib_end": series[-1]["rss_kib"],
        "final_inflight": series[-1]["inflight"], "series": series,
    }


def build_checks(core: dict, http: dict | None) -> list[dict]:
    c = [
        check("index entries never exceed the configured total capacity",
              f"max {core['max_entries']:,} of {core['capacity_entries_total']:,}", "<= capacity",
              core["max_entries"] <= core["capacity_entries_total"]),
        check("no replica ever holds more blocks than its capacity",
              f"{core['replica_samples_over_capacity']} samples over", "0", core["replica_samples_over_capacity"] == 0),
        check("index bytes within 64 B per configured entry + 1 MiB",
              f"max {core['max_bytes'] / 2**20:.1f} MiB of {core['bound_bytes'] / 2**20:.1f} MiB", "<= bound",
              core["max_bytes"] <= core["bound_bytes"]),
        check("the index filled, then kept evicting (the flood really overflowed it)",
              f"full after {core['first_full_at_prompt']} prompts; {core['final']['evictions']:,} evictions",
              "full, evictions > 0", core["first_full_at_prompt"] is not None and core["final"]["evictions"] > 0),
        check("index bytes growth from full to the end",
              f"{core['bytes_growth_after_full_pct']}%", "<= 5%",
              core["bytes_growth_after_full_pct"] is not None and core["bytes_growth_after_full_pct"] <= 5),
        check("process RSS growth from full to the end (routing core)",
              f"{core['rss_growth_after_full_pct']}% ({core['rss_kib_start'] / 1024:.0f} -> "
              f"{core['rss_kib_end'] / 1024:.0f} MiB)", "<= 5%",
              core["rss_growth_after_full_pct"] is not None and core["rss_growth_after_full_pct"] <= 5),
    ]
    if http is not None:
        c += [
            check("HTTP: no errors", f"{http['errors']} of {http['prompts']:,}", "0", http["errors"] == 0),
            check("HTTP: per-replica index blocks within the configured capacity",
                  f"max {http['max_replica_blocks']:,} of {http['capacity_blocks_per_replica']:,}", "<= capacity",
                  http["max_replica_blocks"] <= http["capacity_blocks_per_replica"]),
            check("HTTP: the index filled", f"full after {http['first_full_at_prompt']} prompts", "full",
                  http["first_full_at_prompt"] is not None),
            check("HTTP: balancer RSS growth over the second half of the run",
                  f"{http['rss_growth_second_half_pct']}% ({http['rss_kib_half'] / 1024:.1f} -> "
                  f"{http['rss_kib_end'] / 1024:.1f} MiB; {http['rss_kib_start'] / 1024:.1f} MiB at the start, "
                  f"+{http['rss_growth_after_full_pct']}% from the index first full to the end)", "<= 5%",
                  http["rss_growth_second_half_pct"] <= 5),
            check("HTTP: in-flight back to 0", f"{http['final_inflight']:g}", "0", http["final_inflight"] == 0),
        ]
    return c


def to_markdown(report: dict) -> str:
    core, http = report["core"], report.get("http")
    lines = header_md("reliability: flood", report)
    lines += [f"Routing core (no HTTP): {core['prompts']:,} unique prompts of ~{core['prompt_tokens']} tokens "
              f"(~{core['blocks_per_prompt']} blocks each) into {core['replicas']} replicas with "
              f"{core['capacity_tokens_per_replica']:,} tokens ({core['capacity_blocks_per_replica'][0]:,} blocks) "
              f"of index each, {core['index_implementation']} index, {core['us_per_request']} µs per request "
              f"(decide + dispatched + first_token + finished)."]
    if http:
        lines += ["", f"Through `prefixlb serve`: {http['prompts']:,} unique prompts of ~{http['prompt_tokens']} "
                      f"tokens, {http['replicas']} emulated replicas with `capacity_tokens: "
                      f"{http['capacity_tokens_per_replica']:,}` ({http['capacity_blocks_per_replica']:,} blocks), "
                      f"{http['clients']} clients, {http['requests_per_s']} req/s."]
    lines += [""] + checks_md(report["checks"])
    lines += ["", "Routing core, sampled:", "", "| prompts | entries | unique blocks | evictions | index MiB | RSS MiB |",
              "|---|---|---|---|---|---|"]
    step = max(1, len(core["series"]) // 10)
    for s in core["series"][::step] + ([core["series"][-1]] if (len(core["series"]) - 1) % step else []):
        lines.append(f"| {s['prompts']:,} | {s['entries']:,} | {s['unique_blocks']:,} | {s['evictions']:,} | "
                     f"{s['bytes'] / 2**20:.2f} | {s['rss_kib'] / 1024:.1f} |")
    if http:
        lines += ["", "Through the server, sampled:", "", "| prompts | index blocks (all replicas) | max per replica | "
                  "balancer RSS MiB |", "|---|---|---|---|"]
        step = max(1, len(http["series"]) // 10)
        for s in http["series"][::step] + ([http["series"][-1]] if (len(http["series"]) - 1) % step else []):
            lines.append(f"| {s['prompts']:,} | {s['index_blocks']:,.0f} | {s['max_replica_blocks']:,.0f} | "
                         f"{s['rss_kib'] / 1024:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="50,000 prompts in the core, 2,000 over HTTP")
    ap.add_argument("--prompts", type=int, default=None, help="unique prompts through the routing core "
                    "(default 1,000,000; --quick 50,000)")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--capacity-tokens", type=int, default=None,
                    help="index capacity per replica in tokens (default 1,000,000; --quick 100,000)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--http-prompts", type=int, default=None, help="default 100,000; --quick 2,000")
    ap.add_argument("--http-capacity-tokens", type=int, default=None,
                    help="capacity_tokens per replica for the HTTP part (default 40,000; --quick 8,000)")
    ap.add_argument("--no-http", action="store_true", help="only the routing core")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    q = args.quick
    prompts = args.prompts or (50_000 if q else 1_000_000)
    cap = args.capacity_tokens or (100_000 if q else 1_000_000)
    core = flood_core(prompts, args.replicas, cap, args.prompt_tokens, samples=50 if q else 100)
    http = None
    if not args.no_http:
        http = asyncio.run(flood_http(args.http_prompts or (2_000 if q else 100_000), 4,
                                      args.http_capacity_tokens or (8_000 if q else 40_000), 256, clients=32,
                                      samples=20 if q else 50))
    checks = build_checks(core, http)
    report = {"benchmark": "reliability_flood", "machine": machine(), "command": command_line("flood.py"),
              "checks": checks, "ok": all(c["ok"] for c in checks), "core": core, "http": http,
              "notes": "Part 1 calls the routing core directly (no HTTP): the index lives behind TierRouter; "
                       "part 2 shows the same bound through prefixlb serve."}
    write_report("flood", report, to_markdown(report), args.out, q)
    print(to_markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
