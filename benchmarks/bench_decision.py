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



def _chat_bodies(rng, replicas: int, n: int, system_tokens: int, prompt_tokens: int) -> list[dict]:
    """llm-d's shape: 4 tenant system prompts per replica, each request one of them plus a unique
    question filling the prompt to ``prompt_tokens`` (text at ~4 bytes a token)."""
    tenants = [text_of_tokens(rng, system_tokens) for _ in range(4 * replicas)]
    bodies = []
    for i in range(n):
        system = rng.choice(tenants)
        user = f"#{i} " + text_of_tokens(rng, max(16, prompt_tokens - len(system) // 4))
        bodies.append({"model": "auto", "messages": [{"role": "system", "content": system},
                                                       {"role": "user", "content": user}]})
    return bodies

def run(tokens: int, replicas: int, requests: int, seed: int = 1) -> dict:
    rng = random.Random(seed)
    clock = [0.0]
    t = TierRouter("bench", clock=lambda: clock[0])
    for i in range(replicas):
        t.add_replica(i, f"http://r{i}", capacity_tokens=400_000)
    bodies = _chat_bodies(rng, replicas, requests + 200, min(6000, tokens * 3 // 4), tokens)
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


def run_precise(tokens: int, replicas: int, requests: int, tokenizer: str, seed: int = 1) -> dict:
    """Precise mode: the prompt tokenized as the replica would (chat template + the model's
    tokenizer), as far as its shared prefix is already cached, then the token-id key, match and
    cost model. The tail's full encoding (done after forwarding, in the server's tokenizer thread)
    is not timed."""
    from array import array

    from prefixlb.engine.tokenizer import CachedEncoder, HFTokenizer
    from prefixlb.routing import token_key

    def block_hashes_of(ids, block_bytes, seed):
        return index.block_hashes(array("I", ids).tobytes(), block_bytes, seed)

    rng = random.Random(seed)
    clock = [0.0]
    t = TierRouter("bench", clock=lambda: clock[0])
    for i in range(replicas):
        t.add_replica(i, f"http://r{i}", capacity_tokens=400_000)
    t.enable_precise(16)
    enc = CachedEncoder(HFTokenizer.from_dir(tokenizer))
    # text_of_tokens counts ~4 bytes a token; a real BPE tokenizer makes more tokens of the same
    # text, so size the text by measuring one sample
    probe = text_of_tokens(random.Random(0), 1000)
    ratio = len(enc.tok.encode(probe, add_special_tokens=False)) / 1000
    bodies = _chat_bodies(rng, replicas, requests + 200, int(min(6000, tokens * 3 // 4) / ratio), int(tokens / ratio))
    dec, sizes = [], []
    gc.collect()
    gc.disable()
    try:
        for i, body in enumerate(bodies):
            clock[0] += 0.01
            t0 = time.perf_counter_ns()
            p = enc.prepare(body, True)  # what the server does before deciding
            key = token_key(p.ids, body, total_tokens=p.total)
            d = t.decide(key)
            t1 = time.perf_counter_ns()
            t.dispatched(d)
            # the server encodes the unseen tail in its tokenizer thread after forwarding
            t.extend(d, block_hashes_of(enc.finish(p), t.block_bytes, key.seed))
            t.first_token(d, clock[0] + 0.05)
            t.finished(d, clock[0] + 0.2)
            if i >= 200:
                dec.append((t1 - t0) / 1e3)
                sizes.append(key.token_ids)
    finally:
        gc.enable()
    dec.sort()
    pct = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 1)  # noqa: E731
    return {"prompt_tokens": round(sum(sizes) / len(sizes)), "replicas": replicas, "requests": len(dec),
            "decide_us_p50": pct(dec, 0.5), "decide_us_p90": pct(dec, 0.9), "decide_us_p99": pct(dec, 0.99),
            "tokenizer": Path(tokenizer).name, "encoder_chunking": enc.chunking}


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
    tok_dir = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny-llama-tokenizer"
    try:
        precise = run_precise(8192, 64, n, str(tok_dir))
    except ImportError as exc:  # tokenizers / jinja2 not installed
        precise = None
        print(f"bench_decision: precise mode skipped ({exc})", file=sys.stderr)
    if precise:
        rep["precise"] = precise
        rep["precise_target"] = {"target": "precise decision <= 1 ms at p99, 8K-token prompt",
                                 "value": f"{precise['decide_us_p99']} us", "ok": precise["decide_us_p99"] <= 1000}
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
    if rep.get("precise"):
        p = rep["precise"]
        md += ["", f"Precise mode (tokenize with the model's tokenizer and chat template, shared prefixes cached; "
                   f"{p['tokenizer']}, chunking {'on' if p['encoder_chunking'] else 'off'}), "
                   f"{p['prompt_tokens']:,}-token prompts, {p['replicas']} replicas: p50 {p['decide_us_p50']} µs, "
                   f"p90 {p['decide_us_p90']} µs, **p99 {p['decide_us_p99']} µs** "
                   f"(target ≤ 1 ms: {'met' if rep['precise_target']['ok'] else 'not met'})"]
    args.markdown.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if target["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
