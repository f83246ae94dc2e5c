"""bench_decision: the routing decision's cost -- prompt key, hash + match (one native call) and
the cost model over every replica -- per request, as the server runs it.

Workload: chat requests whose system prompt is one of many tenants' (6K tokens, llm-d's shape)
plus a unique user message, so the total is the target prompt size; the tier has R replicas,
each tenant held by the replicas that served it. Timed: ``prompt_key`` + ``TierRouter.decide``
(what the balancer does between parsing the body and forwarding it). Also reported:
``dispatched`` (the index insert, done after forwarding, off the first-byte path).

Usage: python benchmarks/bench_decision.py [--json OUT] [--markdown OUT] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import machine  # noqa: E402

from prefixlb import index  # noqa: E402
from prefixlb.loadgen import text_of_tokens  # noqa: E402
from prefixlb.routing import TierRouter, prompt_key  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run(tokens: int, replicas: int, requests: int, seed: int = 1) -> dict:
    rng = random.Random(seed)
    clock = [0.0]
    t = TierRouter("bench", clock=lambda: clock[0])
    for i in range(replicas):
        t.add_replica(i, f"http://r{i}", capacity_tokens=400_000)
    tenants = [text_of_tokens(rng, min(6000, tokens * 3 // 4)) for _ in range(4 * replicas)]
    bodies = []
    for i in range(requests + 200):
        system = rng.choice(tenants)
        user = f"#{i} " + text_of_tokens(rng, max(16, tokens - len(system) // 4))
        bodies.append({"model": "auto", "messages": [{"role": "system", "content": system},
                                                       {"role": "user", "content": user}]})
    dec, ins = [], []
    gc.collect()
    gc.disable()
    try:
        for i, body in enumerate(bodies):
            clock[0] += 0.01
            t0 = time.perf_counter_ns()
            key = prompt_key(body, chat=True)
            d = t.decide(key)
            t1 = time.perf_counter_ns()
            t.dispatched(d)
            t2 = time.perf_counter_ns()
            t.first_token(d, clock[0] + 0.05)
            t.finished(d, clock[0] + 0.2)
            if i >= 200:
                dec.append((t1 - t0) / 1e3)
                ins.append((t2 - t1) / 1e3)
    finally:
        gc.enable()
    dec.sort()
    ins.sort()
    pct = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 1)  # noqa: E731
    return {"prompt_tokens": tokens, "replicas": replicas, "requests": len(dec), "decide_us_p50": pct(dec, 0.5),
            "decide_us_p90": pct(dec, 0.9), "decide_us_p99": pct(dec, 0.99), "dispatch_us_p50": pct(ins, 0.5),
            "dispatch_us_p99": pct(ins, 0.99), "index": index.IMPLEMENTATION}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=RESULTS / "bench_decision.json")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "bench_decision.md")
    args = ap.parse_args(argv)
    grid = [(8192, 64)] if args.quick else [(1024, 8), (8192, 8), (8192, 64), (8192, 256), (32768, 64)]
    n = 300 if args.quick else 3000
    rows = [run(tok, reps, n) for tok, reps in grid]
    head = next(r for r in rows if (r["prompt_tokens"], r["replicas"]) == (8192, 64))
    target = {"target": "decision <= 50 us at p99, 8K-token prompt, 64 replicas",
              "value": f"{head['decide_us_p99']} us", "ok": head["decide_us_p99"] <= 50}
    rep = {"benchmark": "bench_decision", "machine": machine(), "command": " ".join(["python"] + sys.argv),
           "rows": rows, "target": target}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rep, indent=2) + "\n")
    m = rep["machine"]
    md = ["## bench_decision: prompt key + hash + match + cost model, per request", "",
          f"`{rep['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores, Python {m['python']}", "",
          f"Target: {target['target']}: **{target['value']}** ({'met' if target['ok'] else 'not met'})", "",
          "| prompt tokens | replicas | decide µs p50 | p90 | p99 | dispatch (insert) µs p50 | p99 |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['prompt_tokens']:,} | {r['replicas']} | {r['decide_us_p50']} | {r['decide_us_p90']} | "
           f"{r['decide_us_p99']} | {r['dispatch_us_p50']} | {r['dispatch_us_p99']} |" for r in rows]
    args.markdown.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if target["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
