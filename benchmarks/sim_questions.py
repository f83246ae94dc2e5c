"""sim_questions: what the simulator says about running prefixlb at scale.

Four questions, each answered by simulation runs (prefixlb.sim: the emulator's engine per replica,
the server's routing core, a virtual clock), written to benchmarks/results/sim_questions.md:

1. **How do hit rate and TTFT scale with replicas?** The llmd workload (groups scale with the
   traffic, so every fleet gets the same per-replica load) on 16, 64, 256 and 1,024 replicas,
   cache_aware against round_robin, with the pooled-cache bound and the TTFT floor.
2. **What index capacity is enough?** The router's prefix index bounded at 0.25, 0.5, 1 and 2x
   each replica's KV capacity (llmd on 64 replicas, where the KV holds 1.2x the working set).
3. **What do stale load signals cost?** /metrics scraped every 0.1 s, 1 s, 5 s, or never, with
   one balancer and with four independent balancers (each sees only its own requests and must
   learn the others' load from scrapes), tenants on 64 replicas at 80% offered load.
4. **What does a burst on one hot prefix do?** A tenant whose traffic jumps to a third of the
   fleet's prefill capacity for the middle third of a run (tenants on 64 replicas): how many
   replicas serve it before, during and after, and its TTFT and hit rate, per policy.

Usage:
  python benchmarks/sim_questions.py            # about 4 minutes here
  python benchmarks/sim_questions.py --quick    # small sizes (smoke test)
  python benchmarks/sim_questions.py --only 4   # one question again, the others from the last run
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from prefixlb.engine import get_profile
from prefixlb.loadgen import RequestSpec, imix, text_of_tokens
from prefixlb.sim import SimConfig, Simulation
from prefixlb.sim.core import percentile
from prefixlb.sim.run import bounds_module, machine
from prefixlb.sim.workloads import SizedWorkload, fleet_kv, prefill_capacity, sized_workload

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = "h100-llama3-8b"


def _setup(w: SizedWorkload, replicas: int, load: float, pressure: float = 1.2):
    kv, mml = fleet_kv(w.shared_working_set_tokens, replicas, pressure)
    cap = prefill_capacity(PROFILE, int(w.mean_prompt_tokens), mml)
    rate = load * replicas * cap / w.mean_prompt_tokens
    return kv, mml, cap, rate


def _bounds(w: SizedWorkload, replicas: int, kv, mml) -> dict:
    b = bounds_module().compute_bounds(w.make(), profile=PROFILE, replicas=replicas, kv_capacity_tokens=kv,
                                       max_model_len=mml)
    return {"pooled_hit_rate": round(b.pooled_hit_rate, 4), "ttft_floor_ms": b.ttft_floor_ms}


def _row(res) -> dict:
    s = res.summary()
    return {k: s[k] for k in ("hit_rate", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "busiest_replica_share",
                              "wall_s")}


def q_replicas(sizes: list[int], per_replica: int) -> dict:
    rows = []
    for r in sizes:
        w = sized_workload("llmd", per_replica * r, model=get_profile(PROFILE).model)
        kv, mml, _, rate = _setup(w, r, 0.6)
        b = _bounds(w, r, kv, mml)
        for policy in ("cache_aware", "round_robin"):
            res = Simulation(w.at_rate(rate), SimConfig(replicas=r, kv_capacity_tokens=kv, max_model_len=mml,
                                                        policy=policy)).run()
            rows.append({"replicas": r, "requests": w.requests, "policy": policy, **b, **_row(res)})
            print(f"q1: {r} replicas {policy}: {rows[-1]}", file=sys.stderr)
    return {"workload": "llmd", "load": 0.6, "rows": rows}


def q_index(replicas: int, requests: int, fractions: list[float]) -> dict:
    w = sized_workload("llmd", requests, model=get_profile(PROFILE).model)
    kv, mml, _, rate = _setup(w, replicas, 0.6)
    b = _bounds(w, replicas, kv, mml)
    rows = []
    for f in fractions:
        cfg = SimConfig(replicas=replicas, kv_capacity_tokens=kv, max_model_len=mml,
                        index_capacity_tokens=max(16, int(f * kv)))
        res = Simulation(w.at_rate(rate), cfg).run()
        rows.append({"index_over_kv": f, "index_tokens": cfg.index_capacity_tokens,
                     "predicted_vs_actual_cached": res.summary()["predicted_vs_actual_cached"], **_row(res)})
        print(f"q2: index {f}x KV: {rows[-1]}", file=sys.stderr)
    return {"workload": "llmd", "replicas": replicas, "requests": w.requests, "kv_tokens_per_replica": kv, **b,
            "rows": rows}


def q_scrape(replicas: int, requests: int, intervals: list[float], balancers: list[int], load: float) -> dict:
    w = sized_workload("tenants", requests, model=get_profile(PROFILE).model)
    kv, mml, _, rate = _setup(w, replicas, load)
    rows = []
    for k in balancers:
        for iv in intervals:
            cfg = SimConfig(replicas=replicas, kv_capacity_tokens=kv, max_model_len=mml, scrape_interval=iv,
                            balancers=k)
            res = Simulation(w.at_rate(rate), cfg).run()
            rows.append({"balancers": k, "scrape_interval_s": iv or None, **_row(res)})
            print(f"q3: {k} balancers, scrape {iv}: {rows[-1]}", file=sys.stderr)
    return {"workload": "tenants", "replicas": replicas, "requests": w.requests, "load": load, "rows": rows}


def _burst_stream(base: list[RequestSpec], hot: str, t0: float, t1: float, rate: float,
                  seed: int) -> Iterator[RequestSpec]:
    """Requests of tenant ``hot`` (its own system prompt, fresh questions) at ``rate`` in [t0, t1)."""
    first = next(r for r in base if r.group == hot)
    system = first.body["messages"][0]
    rng = random.Random(seed)
    t, j = t0, 0
    while True:
        t += rng.expovariate(rate)
        if t >= t1:
            return
        msgs = [system, {"role": "user", "content": f"(burst {j}) " + text_of_tokens(rng, 200)}]
        yield RequestSpec(t, first.path, {**first.body, "messages": msgs}, group=hot, shared_tokens=first.shared_tokens)
        j += 1


def q_burst(replicas: int, requests: int, policies: list[str], hot_tenant: int = 10) -> dict:
    w = sized_workload("tenants", requests, model=get_profile(PROFILE).model)
    kv, mml, cap, rate = _setup(w, replicas, 0.5)
    base = list(w.at_rate(rate))
    span = base[-1].at
    t0, t1 = span / 3, 2 * span / 3
    hot = f"tenant-{hot_tenant}"
    burst_rate = (replicas * cap / 3) / w.mean_prompt_tokens  # a third of the fleet's prefill capacity
    specs = list(imix(iter(base), _burst_stream(base, hot, t0, t1, burst_rate, seed=99)))
    # "before" skips the first sixth of the run: every tenant's first request is a cold miss
    windows = (("before", t0 / 2, t0), ("burst", t0, t1), ("after", t1, math.inf))
    out_rows = []
    for policy in policies:
        sim = Simulation(specs, SimConfig(replicas=replicas, kv_capacity_tokens=kv, max_model_len=mml, policy=policy),
                         record_replicas=True)
        res = sim.run()
        for name, a, b in windows:
            idx = [i for i, r in enumerate(specs) if a <= r.at < b]
            hot_i = [i for i in idx if specs[i].group == hot]
            other = sorted(res.ttft_ms[i] for i in idx if specs[i].group != hot)
            hot_ttft = sorted(res.ttft_ms[i] for i in hot_i)
            q = sum(res.prompt_of[i] for i in hot_i if res.prompt_of[i] > 0)
            h = sum(res.cached_of[i] for i in hot_i if res.cached_of[i] >= 0)
            out_rows.append({
                "policy": policy, "window": name, "hot_requests": len(hot_i),
                "hot_replicas": len({res.replica_of[i] for i in hot_i}),
                "hot_hit_rate": round(h / q, 4) if q else None,
                "hot_ttft_p50_ms": round(percentile(hot_ttft, 0.5), 1),
                "hot_ttft_p99_ms": round(percentile(hot_ttft, 0.99), 1),
                "others_ttft_p50_ms": round(percentile(other, 0.5), 1),
                "others_ttft_p99_ms": round(percentile(other, 0.99), 1),
            })
            print(f"q4: {policy} {name}: {out_rows[-1]}", file=sys.stderr)
    return {"workload": "tenants", "replicas": replicas, "requests": len(specs), "hot": hot,
            "burst_s": [round(t0, 1), round(t1, 1)], "burst_rate_rps": round(burst_rate, 1),
            "base_rate_rps": round(rate, 1), "rows": out_rows}


def to_md(doc: dict) -> str:
    m = doc["machine"]
    L = ["## What the simulator says (benchmarks/sim_questions.py)", "",
         f"`{doc['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores, Python {m['python']}. Every run: "
         f"{PROFILE} replicas, offered load and KV sized as `prefixlb bench` sizes them (prompt tokens at 60% of "
         "the fleet's prefill throughput unless stated; fleet KV = 1.2x the shared working set, at least 20,000 "
         f"tokens a replica); times are simulated milliseconds. Total wall time {doc['wall_s']:.0f} s.", ""]
    q = doc["replicas"]
    L += ["### 1. Hit rate and TTFT against fleet size", "",
          f"{q['workload']} (groups scale with the traffic: the same load per replica at every size).", "",
          "| replicas | requests | policy | hit rate | pooled | of pooled | TTFT p50 | p90 | p99 | floor p99 "
          "| busiest |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in q["rows"]:
        L.append(f"| {r['replicas']:,} | {r['requests']:,} | {r['policy']} | {r['hit_rate']:.1%} | "
                 f"{r['pooled_hit_rate']:.1%} | {r['hit_rate'] / r['pooled_hit_rate']:.0%} | {r['ttft_p50_ms']:.0f} | "
                 f"{r['ttft_p90_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['ttft_floor_ms']['p99']:.0f} | "
                 f"{r['busiest_replica_share']:.1%} |")
    L += ["", doc["answers"]["replicas"], ""]
    q = doc["index"]
    L += ["### 2. Index capacity", "",
          f"{q['workload']} on {q['replicas']} replicas, {q['requests']:,} requests, {q['kv_tokens_per_replica']:,} KV "
          f"tokens a replica; pooled-cache hit rate {q['pooled_hit_rate']:.1%}. `predicted/actual` is the cached "
          "tokens the router predicted over those the replicas reported.", "",
          "| index / KV | index tokens | hit rate | TTFT p50 | p90 | p99 | predicted/actual cached |",
          "|---|---|---|---|---|---|---|"]
    for r in q["rows"]:
        L.append(f"| {r['index_over_kv']:g}x | {r['index_tokens']:,} | {r['hit_rate']:.1%} | {r['ttft_p50_ms']:.0f} | "
                 f"{r['ttft_p90_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['predicted_vs_actual_cached']} |")
    L += ["", doc["answers"]["index"], ""]
    q = doc["scrape"]
    L += ["### 3. Stale load signals", "",
          f"{q['workload']} on {q['replicas']} replicas, {q['requests']:,} requests at {q['load']:.0%} offered "
          "load.", "",
          "| balancers | scrape interval | hit rate | TTFT p50 | p90 | p99 | busiest |",
          "|---|---|---|---|---|---|---|"]
    for r in q["rows"]:
        iv = f"{r['scrape_interval_s']:g} s" if r["scrape_interval_s"] else "never"
        L.append(f"| {r['balancers']} | {iv} | {r['hit_rate']:.1%} | {r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | "
                 f"{r['ttft_p99_ms']:.0f} | {r['busiest_replica_share']:.1%} |")
    L += ["", doc["answers"]["scrape"], ""]
    q = doc["burst"]
    L += ["### 4. A burst on one hot prefix", "",
          f"{q['workload']} on {q['replicas']} replicas at {q['base_rate_rps']} req/s (50% load); {q['hot']} (a "
          f"mid-popularity tenant) adds {q['burst_rate_rps']} req/s — a third of the fleet's prefill capacity — "
          f"from {q['burst_s'][0]} s to {q['burst_s'][1]} s ({q['requests']:,} requests in all). Windows: *before* "
          f"is the second sixth of the run (the first holds every tenant's cold first request), *burst* the middle "
          f"third, *after* the last third.", "",
          "| policy | window | hot requests | replicas serving it | its hit rate | its TTFT p50 | p99 | others' p50 | "
          "others' p99 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in q["rows"]:
        L.append(f"| {r['policy']} | {r['window']} | {r['hot_requests']:,} | {r['hot_replicas']} | "
                 f"{'n/a' if r['hot_hit_rate'] is None else format(r['hot_hit_rate'], '.1%')} | "
                 f"{r['hot_ttft_p50_ms']:.0f} | {r['hot_ttft_p99_ms']:.0f} | {r['others_ttft_p50_ms']:.0f} | "
                 f"{r['others_ttft_p99_ms']:.0f} |")
    L += ["", doc["answers"]["burst"], ""]
    return "\n".join(L) + "\n"


def _answers(doc: dict) -> dict:
    """One paragraph per question, read off the numbers (so the text cannot drift from them)."""
    out = {}
    rows = doc["replicas"]["rows"]
    ca = [r for r in rows if r["policy"] == "cache_aware"]
    rr = [r for r in rows if r["policy"] == "round_robin"]
    out["replicas"] = (
        f"cache_aware keeps {min(r['hit_rate'] / r['pooled_hit_rate'] for r in ca):.0%}–"
        f"{max(r['hit_rate'] / r['pooled_hit_rate'] for r in ca):.0%} of the pooled cache's hit rate from "
        f"{ca[0]['replicas']} to {ca[-1]['replicas']:,} replicas (TTFT p99 {ca[0]['ttft_p99_ms']:.0f} → "
        f"{ca[-1]['ttft_p99_ms']:.0f} ms); round_robin's hit rate goes {rr[0]['hit_rate']:.1%} → "
        f"{rr[-1]['hit_rate']:.1%} (p99 {rr[0]['ttft_p99_ms']:.0f} → {rr[-1]['ttft_p99_ms']:.0f} ms): spread over more "
        "replicas, each prefix is found on the replica a request lands on less and less often.")
    rows = doc["index"]["rows"]
    best = max(rows, key=lambda r: r["hit_rate"])
    one = next((r for r in rows if r["index_over_kv"] == 1.0), best)
    out["index"] = (
        f"Best hit rate at {best['index_over_kv']:g}x the KV ({best['hit_rate']:.1%}); at 1x {one['hit_rate']:.1%}. "
        + "; ".join(f"{r['index_over_kv']:g}x: {r['hit_rate']:.1%}, p99 {r['ttft_p99_ms']:.0f} ms, predicted/actual "
                    f"{r['predicted_vs_actual_cached']}" for r in rows)
        + ". An index smaller than the cache forgets prefixes the replica still holds (hits lost); a larger one "
          "believes in prefixes the replica has evicted (predicted/actual > 1: routed for hits that miss), "
          "which the router's capacity learning from `cached_tokens` only partly corrects.")
    rows = doc["scrape"]["rows"]
    parts = []
    for k in sorted({r["balancers"] for r in rows}):
        sub = [r for r in rows if r["balancers"] == k]
        lo = min(sub, key=lambda r: r["ttft_p99_ms"])
        hi = max(sub, key=lambda r: r["ttft_p99_ms"])
        iv = lambda r: f"{r['scrape_interval_s']:g} s" if r["scrape_interval_s"] else "never"  # noqa: E731
        parts.append(f"with {k} balancer{'s' if k > 1 else ''}, TTFT p99 ranges from {lo['ttft_p99_ms']:.0f} ms "
                     f"(scrapes {iv(lo)}) to {hi['ttft_p99_ms']:.0f} ms (scrapes {iv(hi)}), hit rate "
                     f"{min(r['hit_rate'] for r in sub):.1%}–{max(r['hit_rate'] for r in sub):.1%}")
    text = "; ".join(parts)
    out["scrape"] = (text[:1].upper() + text[1:] + ". A balancer's own accounting (what it dispatched, what "
                     "finished) is exact and immediate for its own traffic; a scrape only adds what it did not "
                     "send, as it was up to one interval ago. With several balancers that is most of the load.")
    rows = doc["burst"]["rows"]
    parts = []
    for p in dict.fromkeys(r["policy"] for r in rows):
        by = {r["window"]: r for r in rows if r["policy"] == p}
        hit = lambda w, by=by: "n/a" if by[w]["hot_hit_rate"] is None else f"{by[w]['hot_hit_rate']:.0%}"  # noqa: E731
        n = lambda w, by=by: by[w]["hot_replicas"]  # noqa: E731
        parts.append(f"- **{p}**: the hot tenant ran on {n('before')} replica{'s' if n('before') != 1 else ''} before "
                     f"the burst, {n('burst')} during it and {n('after')} after; its TTFT p99 "
                     f"{by['before']['hot_ttft_p99_ms']:.0f} → {by['burst']['hot_ttft_p99_ms']:.0f} → "
                     f"{by['after']['hot_ttft_p99_ms']:.0f} ms and hit rate {hit('before')} → {hit('burst')} → "
                     f"{hit('after')}; the other tenants' p99 {by['before']['others_ttft_p99_ms']:.0f} → "
                     f"{by['burst']['others_ttft_p99_ms']:.0f} ms during the burst")
    out["burst"] = ".\n".join(parts) + "."
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sim_questions", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    ap.add_argument("--only", default=None, metavar="1,2,3,4",
                    help="answer only these questions again, keeping the others from the last results")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for sim_questions.md/.json (default benchmarks/results; --quick: print only)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = args.out or (None if args.quick else RESULTS)
    doc: dict = {"benchmark": "sim_questions", "machine": machine(), "command": " ".join(["python"] + sys.argv)}
    only = {int(x) for x in args.only.split(",")} if args.only else {1, 2, 3, 4}
    if only != {1, 2, 3, 4} and out is not None and (out / "sim_questions.json").exists():
        prev = json.loads((out / "sim_questions.json").read_text())
        doc.update({k: prev[k] for k in ("replicas", "index", "scrape", "burst", "wall_s") if k in prev})
    wall = doc.get("wall_s", 0.0)
    quick = args.quick
    if 1 in only:
        doc["replicas"] = q_replicas([4, 8], 30) if quick else q_replicas([16, 64, 256, 1024], 50)
    if 2 in only:
        doc["index"] = q_index(8, 300, [0.5, 1.0, 2.0]) if quick else q_index(64, 6_400, [0.25, 0.5, 1.0, 2.0])
    if 3 in only:
        doc["scrape"] = (q_scrape(8, 300, [1.0, 0.0], [1, 2], 0.8) if quick
                         else q_scrape(64, 6_400, [0.1, 1.0, 5.0, 0.0], [1, 4], 0.8))
    if 4 in only:
        doc["burst"] = (q_burst(8, 400, ["cache_aware", "round_robin"]) if quick
                        else q_burst(64, 8_000, ["cache_aware", "sglang_like", "least_loaded", "round_robin"]))
    doc["wall_s"] = round(time.perf_counter() - t0 + (wall if only != {1, 2, 3, 4} else 0.0), 1)
    doc["answers"] = _answers(doc)
    md = to_md(doc)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sim_questions.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "sim_questions.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
