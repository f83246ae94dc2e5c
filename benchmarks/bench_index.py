"""bench_index: cost of the request path's index work (hash + match + insert) per request.

Model of a request: a prompt of T tokens (4 bytes a token) whose first part (the shared
fraction, 0.5 by default) is the prefix of one of many tenants (held by 2 replicas, as
cache-aware routing keeps it) and whose rest is unique. The headline configurations are also
run at 0.83 shared, the shape of llm-d's published benchmark (6K-token shared prefix + 1.2K-token
query). Per request: ``chain, m = index.lookup(prompt)`` (hash + match, one native call),
pick the replica with the longest match (else a random one), ``index.insert(replica, chain)``.
The index is filled to its bound first (N blocks across R replicas, capacity N/R each), so every
insert evicts, and (native) requests churn every indexed block out once before the measured ones:
the numbers are steady state, neither an empty table nor a freshly filled one.

Reported per configuration: µs per request (mean, p50, p99) for lookup + insert, bytes per
(block, replica) entry from ``stats()``, and native vs pure-Python speedup where the reference
was run. A second table measures the worst case the design admits: a prefix held by *every*
replica (match walks every holder).

Usage:
  python benchmarks/bench_index.py                 # full grid (about 1 min here)
  python benchmarks/bench_index.py --quick         # small grid for smoke tests (~10 s)
  python benchmarks/bench_index.py --json OUT.json --markdown OUT.md
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

from prefixlb import index
from prefixlb.sim.run import machine  # where a result was measured: every benchmark's record

TOKEN_BYTES = 4
BLOCK = 64  # bytes per block = 16 tokens
HOLDERS = 2  # replicas holding each tenant prefix
RESULTS = Path(__file__).resolve().parent / "results"


def _unique(tag: int, n_bytes: int, filler: bytes) -> bytes:
    """n_bytes whose first block differs for every tag (so every later block hash differs too)."""
    head = tag.to_bytes(8, "little") * (BLOCK // 8)
    return (head + filler[: max(0, n_bytes - BLOCK)])[:n_bytes]


def _fill(ix, n_blocks: int, replicas: int, prefixes: list[bytes], rng: random.Random, filler: bytes) -> None:
    """Fill every replica to capacity: its tenant prefixes, then unique chains."""
    cap = max(1, n_blocks // replicas)
    for r in range(replicas):
        ix.set_capacity(r, cap)
    have = [0] * replicas
    for t, p in enumerate(prefixes):
        ch = index.chain(p, BLOCK)
        for h in range(HOLDERS):
            ix.insert((t + h) % replicas, ch)
            have[(t + h) % replicas] += len(ch)
    chunk = min(cap, 4096)
    tag = 1 << 40
    for r in range(replicas):
        need = cap - have[r]
        while need > 0:
            n = min(chunk, need)
            ix.insert(r, index.chain(_unique(tag, n * BLOCK, filler), BLOCK))
            tag += 1
            need -= n


def run_config(impl, tokens: int, n_blocks: int, replicas: int, requests: int, seed: int,
               all_hold: bool = False, shared: float = 0.5):
    """Measure one configuration; returns a result row."""
    rng = random.Random(seed)
    prompt_bytes = tokens * TOKEN_BYTES
    prefix_bytes = int(prompt_bytes * shared) // BLOCK * BLOCK
    filler = bytes(rng.randrange(256) for _ in range(4096)) * (max(prompt_bytes, 4096 * BLOCK) // 4096 + 2)
    cap = max(1, n_blocks // replicas)
    n_tenants = max(1, min(4 * replicas, (cap * replicas) // max(1, 4 * HOLDERS * (prefix_bytes // BLOCK))))
    prefixes = [_unique((7 << 48) + t, prefix_bytes, filler) for t in range(n_tenants)]
    ix = impl(cap)
    _fill(ix, n_blocks, replicas, prefixes, rng, filler)
    if all_hold:  # worst case: one prefix every replica holds
        for r in range(replicas):
            ix.insert(r, index.chain(prefixes[0], BLOCK))
    lookup = ix.lookup
    insert = ix.insert
    new_blocks = max(1, (prompt_bytes - prefix_bytes) // BLOCK)
    # Steady state: the native table keeps a block that overflowed its home bucket there until
    # the block leaves, so its layout drifts from a freshly filled table's for about one
    # turnover of the index. Churn every block out once before measuring (the reference's dicts
    # have no such drift: a short warm-up).
    churn = -(-n_blocks // new_blocks) if getattr(impl, "native", False) else 0
    warm = max(20, requests // 5)
    serial = 9 << 48

    def prompt() -> bytes:
        nonlocal serial
        serial += 1
        t = 0 if all_hold else rng.randrange(n_tenants)
        return prefixes[t] + _unique(serial, prompt_bytes - prefix_bytes, filler)

    for _ in range(churn):
        chain, m = lookup(prompt(), BLOCK)
        insert(max(m, key=m.__getitem__) if m else rng.randrange(replicas), chain)
    prompts = [prompt() for _ in range(requests + warm)]
    # the same implementation's hashing alone (chain()), to split a request's cost into parts
    chain_only = index.chain if getattr(impl, "native", False) else index.chain_py
    times, t_hash, t_lookup, t_insert = [], [], [], []
    gc.disable()
    try:
        for i, p in enumerate(prompts):
            th = time.perf_counter_ns()
            chain_only(p, BLOCK)
            t0 = time.perf_counter_ns()
            chain, m = lookup(p, BLOCK)
            t1 = time.perf_counter_ns()
            r = max(m, key=m.__getitem__) if m else rng.randrange(replicas)
            t2 = time.perf_counter_ns()
            insert(r, chain)
            t3 = time.perf_counter_ns()
            if i >= warm:
                times.append((t1 - t0 + t3 - t2) / 1000.0)
                t_hash.append((t0 - th) / 1000.0)
                t_lookup.append((t1 - t0) / 1000.0)
                t_insert.append((t3 - t2) / 1000.0)
    finally:
        gc.enable()
    st = ix.stats()
    times.sort()
    return {
        "implementation": "c" if getattr(impl, "native", False) else "python",
        "tokens": tokens,
        "blocks_indexed": st["entries"],
        "blocks_target": n_blocks,
        "replicas": replicas,
        "all_replicas_hold_prefix": all_hold,
        "shared_fraction": shared,
        "requests": len(times),
        "us_mean": round(statistics.fmean(times), 2),
        "us_p50": round(times[len(times) // 2], 2),
        "us_p99": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
        # p50 of the parts: hashing alone (not in the total), lookup (hash + match), insert
        "us_hash_p50": round(statistics.median(t_hash), 2),
        "us_lookup_p50": round(statistics.median(t_lookup), 2),
        "us_insert_p50": round(statistics.median(t_insert), 2),
        "bytes_per_entry": round(st["bytes"] / max(1, st["entries"]), 1),
        "unique_blocks": st["unique_blocks"],
        "evictions": st["evictions"],
    }


def requests_for(tokens: int, impl_native: bool, quick: bool) -> int:
    base = {1024: 4000, 8192: 2000, 32768: 600, 131072: 200}[tokens]
    if not impl_native:
        base = max(30, base // 20)
    return max(20, base // 10) if quick else base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid (smoke test)")
    ap.add_argument("--json", type=Path, default=RESULTS / "bench_index.json")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "bench_index.md")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--shared-fraction", type=float, default=0.5, help="shared part of each prompt in the grid")
    ap.add_argument("--versions", action="store_true", help="print versions and exit")
    args = ap.parse_args(argv)
    if args.versions:
        print(json.dumps(machine(), indent=2))
        return 0
    if not hasattr(index, "PrefixIndexC"):
        print("bench_index: the C extension is not built; nothing to compare", file=sys.stderr)
        return 2

    C, PY = index.PrefixIndexC, index.PrefixIndexPy
    if args.quick:
        grid_tokens = [1024, 8192]
        grid_blocks = [10**4, 10**5]
        grid_reps = [8, 64]
        py_cfgs = [(8192, 10**4, 8)]
        worst = [(8192, 10**5, 64)]
    else:
        grid_tokens = [1024, 8192, 32768, 131072]
        grid_blocks = [10**4, 10**5, 10**6, 10**7]
        grid_reps = [8, 64, 1024]
        py_cfgs = [(1024, 10**6, 64), (8192, 10**6, 64)]
        worst = [(8192, 10**6, r) for r in (8, 64, 1024)]

    rows = []
    total = len(grid_tokens) * len(grid_blocks) * len(grid_reps)
    done = 0
    for n_blocks in grid_blocks:
        for reps in grid_reps:
            for tokens in grid_tokens:
                row = run_config(C, tokens, n_blocks, reps, requests_for(tokens, True, args.quick), args.seed,
                                 shared=args.shared_fraction)
                rows.append(row)
                done += 1
                print(
                    f"[{done}/{total}] c tokens={tokens} blocks={n_blocks:.0e} replicas={reps}: "
                    f"{row['us_p50']} us p50, {row['bytes_per_entry']} B/entry",
                    file=sys.stderr,
                )
    shapes = [args.shared_fraction] if args.quick else sorted({args.shared_fraction, 0.83})
    headline = []  # the target configurations, at each request shape
    if not args.quick:
        for shared in shapes:
            for tokens, n_blocks, reps in [(8192, 10**6, 64), (131072, 10**6, 64), (8192, 10**6, 8), (8192, 10**6, 1024)]:
                headline.append(run_config(C, tokens, n_blocks, reps, requests_for(tokens, True, False), args.seed,
                                           shared=shared))
    speedups = []
    for shared in shapes:
        for tokens, n_blocks, reps in py_cfgs:
            py = run_config(PY, tokens, n_blocks, reps, requests_for(tokens, False, args.quick), args.seed, shared=shared)
            c = run_config(C, tokens, n_blocks, reps, requests_for(tokens, True, args.quick), args.seed, shared=shared)
            rows.append(py)
            speedups.append(
                {"tokens": tokens, "blocks": n_blocks, "replicas": reps, "shared_fraction": shared,
                 "python_us_mean": py["us_mean"], "c_us_mean": c["us_mean"],
                 "speedup": round(py["us_mean"] / c["us_mean"], 1)}
            )
            print(f"python tokens={tokens} shared={shared}: {py['us_mean']} us mean -> speedup "
                  f"{speedups[-1]['speedup']}x", file=sys.stderr)
    worst_rows = [run_config(C, t, b, r, requests_for(t, True, args.quick), args.seed, all_hold=True) for t, b, r in worst]

    def find(tokens, blocks, reps, shared):
        for r in headline:
            if (r["tokens"], r["blocks_target"], r["replicas"], r["shared_fraction"]) == (tokens, blocks, reps, shared):
                return r
        return None

    targets = []
    if not args.quick:
        for shared in shapes:
            tag = f" [{int(round(shared * 100))}% shared]"
            r8k, r128k = find(8192, 10**6, 64, shared), find(131072, 10**6, 64, shared)
            flat8, flat1024 = find(8192, 10**6, 8, shared), find(8192, 10**6, 1024, shared)
            sp8k = next(s for s in speedups if s["tokens"] == 8192 and s["shared_fraction"] == shared)
            targets += [
                {"target": "native >= 30x the reference at 8K tokens (mean)" + tag, "value": f"{sp8k['speedup']}x",
                 "ok": sp8k["speedup"] >= 30},
                {"target": "<= 20 us at 8K tokens, 1e6 blocks, 64 replicas (p50)" + tag, "value": f"{r8k['us_p50']} us",
                 "ok": r8k["us_p50"] <= 20},
                {"target": "<= 300 us at 128K tokens, 1e6 blocks, 64 replicas (p50)" + tag,
                 "value": f"{r128k['us_p50']} us", "ok": r128k["us_p50"] <= 300},
                {"target": "1,024 replicas within 1.5x of 8 (8K tokens, 1e6 blocks, p50)" + tag,
                 "value": f"{round(flat1024['us_p50'] / flat8['us_p50'], 2)}x",
                 "ok": flat1024["us_p50"] <= 1.5 * flat8["us_p50"]},
            ]
        worst_bpe = max(r["bytes_per_entry"] for r in rows + headline
                        if r["implementation"] == "c" and r["blocks_target"] >= 10**5)
        targets.append({"target": "<= 64 bytes per (block, replica) entry (worst, >= 1e5 blocks)",
                        "value": f"{worst_bpe} B", "ok": worst_bpe <= 64})
    report = {"benchmark": "bench_index", "machine": machine(), "command": " ".join(["python"] + sys.argv),
              "rows": rows, "headline": headline, "speedups": speedups, "worst_case_all_replicas_hold": worst_rows, "targets": targets}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    args.markdown.write_text(to_markdown(report))
    print(to_markdown(report))
    return 0 if all(t["ok"] for t in targets) else 1


def to_markdown(rep: dict) -> str:
    m = rep["machine"]
    out = [
        "## bench_index: hash + match + insert per request (steady state, index full)",
        "",
        f"`{rep['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores, Python {m['python']}, prefixlb {m['prefixlb']}",
        "",
    ]
    if rep["targets"]:
        out += ["| target | measured | met |", "|---|---|---|"]
        out += [f"| {t['target']} | {t['value']} | {'yes' if t['ok'] else '**no**'} |" for t in rep["targets"]]
        out.append("")
    out += [f"Grid (shared fraction {rep['rows'][0]['shared_fraction']}):", "",
            "| impl | prompt tokens | blocks indexed | replicas | µs mean | µs p50 | µs p99 | bytes/entry |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        out.append(
            f"| {r['implementation']} | {r['tokens']:,} | {r['blocks_indexed']:,} | {r['replicas']:,} | "
            f"{r['us_mean']} | {r['us_p50']} | {r['us_p99']} | {r['bytes_per_entry']} |"
        )
    if rep.get("headline"):
        out += ["", "Target configurations, at two request shapes (lookup = hash + match; hashing alone, "
                "timed apart, is part of lookup):", "",
                "| shared | prompt tokens | blocks indexed | replicas | µs mean | µs p50 | µs p99 | hash p50 | "
                "lookup p50 | insert p50 | bytes/entry |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['shared_fraction']} | {r['tokens']:,} | {r['blocks_indexed']:,} | {r['replicas']:,} | "
                f"{r['us_mean']} | {r['us_p50']} | {r['us_p99']} | {r['us_hash_p50']} | {r['us_lookup_p50']} | "
                f"{r['us_insert_p50']} | {r['bytes_per_entry']} |" for r in rep["headline"]]
    if rep["speedups"]:
        out += ["", "| shared | prompt tokens | blocks | replicas | python µs | c µs | speedup |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {s['shared_fraction']} | {s['tokens']:,} | {s['blocks']:,} | {s['replicas']} | {s['python_us_mean']} | "
                f"{s['c_us_mean']} | {s['speedup']}x |" for s in rep["speedups"]]
    if rep["worst_case_all_replicas_hold"]:
        out += ["", "Worst case: the shared half of every prompt is held by *every* replica (match walks all holders).", "",
                "| prompt tokens | blocks indexed | replicas | µs mean | µs p50 | µs p99 |", "|---|---|---|---|---|---|"]
        out += [f"| {r['tokens']:,} | {r['blocks_indexed']:,} | {r['replicas']:,} | {r['us_mean']} | {r['us_p50']} | "
                f"{r['us_p99']} |" for r in rep["worst_case_all_replicas_hold"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
