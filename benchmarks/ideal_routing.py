"""ideal_routing: how close to the TTFT floor any choice of replica could bring a workload.

The TTFT floor (benchmarks/bounds.py) is each request alone on an idle replica that holds the
pooled cache. No router reaches it: requests share replicas, and vLLM runs every waiting prompt
in the next step, so a request waits for the step in progress and then for the other prefills
batched with it. How much of the distance to the floor is the router's to win?

This program answers with a **pooled-ideal fleet**: every request is replaced by a prompt of
exactly the tokens the pooled cache missed for it (token ids, unique, so no replica can hit and
none needs to), with its arrival time and output length kept. On that fleet every replica
"holds" the pooled cache at once, so where a request goes changes only how the load spreads.
Routing it with the load-balancing policies gives what replica choice could do with perfect
caching; it is optimistic (shorter prompts leave less context to read in every decode step). The
real workload is then run with prefixlb's ``cache_aware`` and the model of sglang-router's
rule (``sglang_like``); every run is averaged over a few simulator seeds with observation
jitter (as in sim_seeds.py), and
the issue's target -- prefixlb's distance from the floor at most half of sglang-router's -- is
compared with what the pooled-ideal fleet reaches.

Same fleet as ``prefixlb bench`` and ``prefixlb sim``: the runner's workload at scale 1, 4
replicas, KV at 1.2x the shared working set, prompt tokens at 60% of the prefill throughput.

Usage:
  python benchmarks/ideal_routing.py                         # every workload, about a minute
  python benchmarks/ideal_routing.py --workloads mixed,llmd --seeds 3 --jitter-ms 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bounds import compute_bounds

from prefixlb.loadgen import RequestSpec
from prefixlb.sim.core import Simulation
from prefixlb.sim.run import SimSettings, machine, plan
from prefixlb.sim.workloads import WORKLOAD_NAMES, bench_workload, workload_names

RESULTS = Path(__file__).resolve().parent / "results"
#: dispatch on arrival; ``cache_aware:no_admission`` is cache_aware with admission off
IDEAL_POLICIES = ("least_loaded", "cache_aware:no_admission", "round_robin")
#: also run on the pooled-ideal fleet: cache_aware as shipped (admission holds requests at the
#: balancer, which is not replica choice)
ADMISSION = "cache_aware"
REAL_POLICIES = ("cache_aware", "sglang_like")
QS = (("p50", "ttft_p50_ms"), ("p90", "ttft_p90_ms"), ("p99", "ttft_p99_ms"))


def pooled_ideal(specs: list[RequestSpec], misses: list[int], seed: int = 0) -> list[RequestSpec]:
    """Each request as a completions prompt of exactly ``misses[i]`` unique token ids (at least
    one), with its arrival time, output budget and group kept."""
    if len(specs) != len(misses):
        raise ValueError(f"{len(specs)} requests but {len(misses)} miss counts")
    rng = random.Random(seed)
    out = []
    for i, (sp, m) in enumerate(zip(specs, misses)):
        # ids from a range no generated text reaches, and the request's index first: unique prompts
        ids = [100_000 + i] + [rng.randrange(1_000, 30_000) for _ in range(max(1, m) - 1)]
        body = {"model": sp.body.get("model", "auto"), "prompt": ids, "max_tokens": sp.body.get("max_tokens"),
                "stream": True}
        out.append(RequestSpec(sp.at, "/v1/completions", body, group=sp.group))
    return out


def _metrics(summary: dict) -> dict:
    return {k: summary[k] for k in ("hit_rate", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms")}


def study(name: str, seeds: int, jitter_ms: float, scale: float = 1.0) -> dict:
    """The floor, the pooled-ideal fleet under each load-balancing policy, the real workload under
    cache_aware and sglang_like (mean over ``seeds``), and the target read against them."""
    w = bench_workload(name, scale)
    s = SimSettings(workload=name, requests=w.requests, replicas=4, policies=REAL_POLICIES, progress=False, bounds="off")
    rate, base = plan(s, w)
    specs = list(w.at_rate(rate))
    b = compute_bounds(specs, profile=base.profile, replicas=base.replicas, kv_capacity_tokens=base.kv_capacity_tokens,
                       max_model_len=base.max_model_len)
    floor = b.ttft_floor_ms
    ideal_specs = pooled_ideal(specs, b.misses)

    def mean_over_seeds(label: str, make) -> dict:
        policy, _, variant = label.partition(":")
        params = replace(base.params, admit_share=0.0) if variant == "no_admission" else base.params
        runs = [_metrics(Simulation(make(), replace(base, policy=policy, params=params, seed=seed,
                                                    observe_jitter_s=jitter_ms / 1e3)).run().summary())
                for seed in range(1, seeds + 1)]
        return {k: round(statistics.fmean(r[k] for r in runs), 4 if k == "hit_rate" else 1) for k in runs[0]}

    ideal = {p: mean_over_seeds(p, lambda: ideal_specs) for p in IDEAL_POLICIES}
    best = {q: min(ideal[p][k] for p in IDEAL_POLICIES) for q, k in QS}
    ideal_admission = mean_over_seeds(ADMISSION, lambda: ideal_specs)
    real = {p: mean_over_seeds(p, lambda: w.at_rate(rate)) for p in REAL_POLICIES}
    sg = real["sglang_like"]
    target = {q: round(floor[q] + (sg[k] - floor[q]) / 2, 1) for q, k in QS if q != "p50"}
    return {
        "workload": name, "requests": w.requests, "rate_rps": round(rate, 3), "pooled_hit_rate": round(b.pooled_hit_rate, 4),
        "mean_prompt_tokens": round(w.mean_prompt_tokens), "mean_pooled_miss_tokens": round(statistics.fmean(b.misses)),
        "ttft_floor_ms": floor, "ideal": ideal, "ideal_best_ms": best, "ideal_with_admission": ideal_admission,
        "real": real,
        "target_ms": target,  # floor + half of sglang_like's distance from it
        "ideal_meets_target": {q: best[q] <= target[q] for q in target},
        "cache_aware_meets_target": {q: real["cache_aware"][k] <= target[q] for q, k in QS if q in target},
        "seeds": seeds, "jitter_ms": jitter_ms,
    }


def markdown(report: dict) -> str:
    lines = [
        "## ideal_routing: how close to the TTFT floor any choice of replica could bring a workload",
        "",
        (f"`{report['command']}` — {report['date']}, {report['wall_s']} s, {report['machine']['cpu']}. 4 simulated "
        "replicas (h100-llama3-8b), the runner's workloads at scale 1, KV at 1.2x the shared working set, prompt "
        "tokens at 60% of the prefill throughput. **Pooled-ideal**: each request replaced by a prompt of exactly "
        "the tokens the pooled cache missed (unique token ids; arrival and output length kept), so every replica "
        "serves it as if it held the pooled cache: routing it changes only how the load spreads (`:no_admission`: "
        "cache_aware dispatching on arrival; the admission row holds requests at the balancer). Every row: "
        f"the mean over {report['seeds']} simulator seeds, {report['jitter_ms']:g} ms observation jitter. Target: "
        "floor + half of sglang_like's distance from it (issue 4)."),
        "",
        "| workload | fleet | policy | hit rate | TTFT p50 ms | p90 | p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["workloads"]:
        f = r["ttft_floor_ms"]
        lines.append(f"| {r['workload']} | floor (alone, idle) | – | {r['pooled_hit_rate']:.1%} (pooled) | "
                     f"{f['p50']:.0f} | {f['p90']:.0f} | {f['p99']:.0f} |")
        for p, m in r["ideal"].items():
            lines.append(f"| {r['workload']} | pooled-ideal | {p} | (pooled) | {m['ttft_p50_ms']:.0f} | "
                         f"{m['ttft_p90_ms']:.0f} | {m['ttft_p99_ms']:.0f} |")
        m = r.get("ideal_with_admission")
        if m:
            lines.append(f"| {r['workload']} | pooled-ideal | {ADMISSION} (admission) | (pooled) | "
                         f"{m['ttft_p50_ms']:.0f} | {m['ttft_p90_ms']:.0f} | {m['ttft_p99_ms']:.0f} |")
        for p, m in r["real"].items():
            lines.append(f"| {r['workload']} | real | {p} | {m['hit_rate']:.1%} | {m['ttft_p50_ms']:.0f} | "
                         f"{m['ttft_p90_ms']:.0f} | {m['ttft_p99_ms']:.0f} |")
        t = r["target_ms"]
        lines.append(f"| {r['workload']} | **target** | half sglang_like's distance | | | ≤ {t['p90']:.0f} | "
                     f"≤ {t['p99']:.0f} |")
    lines += ["", ("Verdicts (the best pooled-ideal policy that dispatches on arrival, i.e. replica choice alone, "
                   "at each percentile against the target):"), ""]
    for r in report["workloads"]:
        b, t = r["ideal_best_ms"], r["target_ms"]
        parts = [f"{q} {b[q]:.0f} vs ≤ {t[q]:.0f} ({'reachable' if r['ideal_meets_target'][q] else 'not reachable'})"
                 for q in ("p90", "p99")]
        lines.append(f"- {r['workload']}: pooled-ideal " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOAD_NAMES))
    ap.add_argument("--seeds", type=int, default=3, help="simulator seeds each run is averaged over (default 3)")
    ap.add_argument("--jitter-ms", type=float, default=1.0, help="mean observation jitter (ms, default 1)")
    ap.add_argument("--json", type=Path, default=RESULTS / "ideal_routing.json")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "ideal_routing.md")
    args = ap.parse_args(argv)
    try:
        names = workload_names(args.workloads)
    except ValueError as exc:
        ap.error(f"--workloads: {exc}")
    if args.seeds < 1:
        ap.error("--seeds: must be >= 1")
    t0 = time.time()
    rows = []
    for x in names:
        r = study(x, args.seeds, args.jitter_ms)
        rows.append(r)
        print(f"{x}: floor p90/p99 {r['ttft_floor_ms']['p90']:.0f}/{r['ttft_floor_ms']['p99']:.0f}, pooled-ideal best "
              f"{r['ideal_best_ms']['p90']:.0f}/{r['ideal_best_ms']['p99']:.0f}, target <= "
              f"{r['target_ms']['p90']:.0f}/{r['target_ms']['p99']:.0f}, cache_aware "
              f"{r['real']['cache_aware']['ttft_p90_ms']:.0f}/{r['real']['cache_aware']['ttft_p99_ms']:.0f}",
              file=sys.stderr)
    given = sys.argv[1:] if argv is None else list(argv)
    report = {"command": " ".join(["python benchmarks/ideal_routing.py", *given]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "wall_s": round(time.time() - t0, 1), "seeds": args.seeds, "jitter_ms": args.jitter_ms,
              "workloads": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    args.markdown.write_text(markdown(report))
    print(f"wrote {args.json} and {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
