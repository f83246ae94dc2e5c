"""sim_seeds: the live benchmark's workloads in the simulator, read over seeds and observation jitter.

A simulation with exact timing is one deterministic trajectory of a feedback system: the
balancer learns from the TTFTs its own decisions cause. Live, it sees each first byte a little
late (its event loop), and a policy that learns from time can then follow quite another path.
This runs each workload of ``prefixlb bench`` exactly as the runner builds it (scale 1, the same
seed, 4 replicas, KV at 1.2x the shared working set, 60% load), for each policy, over several
simulator seeds, with the balancer's observations exact and delayed by an exponential jitter
(``SimConfig.observe_jitter_s``), and reports the mean (and worst) of each metric over the seeds.

Usage:
  python benchmarks/sim_seeds.py                    # about 1 minute here
  python benchmarks/sim_seeds.py --workloads mixed,unique --seeds 4 --jitter-ms 0,1,5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from prefixlb.routing import CostParams
from prefixlb.sim.run import SimSettings, machine, run
from prefixlb.sim.workloads import bench_workload, workload_names

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("hit_rate", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms")


def run_one(name: str, policy: str, seed: int, jitter_ms: float) -> dict:
    """The runner's workload ``name`` (scale 1) on 4 simulated replicas; one seed. A policy
    ``cache_aware:learn_all`` is cache_aware learning from every TTFT, as it did before
    ``CostParams.learn_queue_share`` (the comparison that motivated it)."""
    params = CostParams()
    if policy.endswith(":learn_all"):
        policy, params = policy.split(":")[0], CostParams(learn_queue_share=float("inf"))
    w = bench_workload(name)
    s = SimSettings(workload=name, requests=w.requests, replicas=4, policies=(policy,), progress=False, bounds="off",
                    seed=seed, observe_jitter_s=jitter_ms / 1e3, params=params)
    return run(s, workload=w)["targets"][0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="mixed,unique,tenants,chat,agent,docqa,llmd")
    ap.add_argument("--policies", default="cache_aware,cache_aware:learn_all,sglang_like")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--jitter-ms", default="0,1", help="mean observation delays to run (ms, comma-separated)")
    ap.add_argument("--json", type=Path, default=RESULTS / "sim_seeds.json")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "sim_seeds.md")
    args = ap.parse_args(argv)
    try:
        workloads = workload_names(args.workloads)
    except ValueError as exc:
        ap.error(f"--workloads: {exc}")
    jitters = [float(j) for j in args.jitter_ms.split(",") if j]
    rows = []
    t0 = time.time()
    for w in workloads:
        for j in jitters:
            for p in args.policies.split(","):
                runs = [run_one(w, p, seed, j) for seed in range(1, args.seeds + 1)]
                row = {"workload": w, "jitter_ms": j, "policy": p, "seeds": args.seeds}
                for m in METRICS:
                    xs = [r[m] for r in runs]
                    row[m] = round(statistics.fmean(xs), 4 if m == "hit_rate" else 1)
                    row[m + "_worst"] = round(min(xs) if m == "hit_rate" else max(xs), 4 if m == "hit_rate" else 1)
                rows.append(row)
                print(f"{w:8s} jitter {j:4.1f} ms {p:12s} hit {row['hit_rate']:.3f}  TTFT p50 {row['ttft_p50_ms']:6.0f}"
                      f"  p90 {row['ttft_p90_ms']:6.0f}  p99 {row['ttft_p99_ms']:6.0f} (worst {row['ttft_p99_ms_worst']:.0f})",
                      file=sys.stderr)
    command = "python benchmarks/sim_seeds.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        (argv if argv is not None else sys.argv[1:])))
    report = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "wall_s": round(time.time() - t0, 1), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "## sim_seeds: the live benchmark's workloads in the simulator, over seeds and observation jitter",
        "",
        f"`{command}` — {report['date']}, {report['wall_s']} s. 4 replicas, scale 1 (the runner's workloads),"
        f" 60% load, KV at 1.2x the shared working set; the mean over {args.seeds} simulator seeds (worst p99 in"
        " brackets). Jitter: the balancer sees each first byte this much later on average (exponential).",
        "",
        "| workload | jitter ms | policy | hit rate | TTFT p50 ms | p90 | p99 (worst) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['jitter_ms']:g} | {r['policy']} | {r['hit_rate']:.1%} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | {r['ttft_p99_ms']:.0f} "
                     f"({r['ttft_p99_ms_worst']:.0f}) |")
    args.markdown.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.json} and {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
