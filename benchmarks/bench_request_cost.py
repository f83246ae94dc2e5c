"""bench_request_cost: the balancer's instructions per proxied request, counted by callgrind.

Throughput on this 2-core machine is shared between the client, the fake replica and the
balancer, and moves ±10% between runs (bench_overhead.py); callgrind's instruction count of the
balancer process does not move with load, so it measures changes to the request path exactly
(not its cache misses, nor the kernel's share: bench_overhead.py's CPU µs per request has those).

Each configuration is a ``prefixlb serve`` process run under ``valgrind --tool=callgrind
--instr-atstart=no`` in front of bench_overhead.py's fake replicas (one per tier, each its own
process): ``--warmup`` requests uncounted, then ``--requests`` non-streamed chat requests at
concurrency 32 (bench_overhead's client and body, ``model: auto``) counted; instructions per
request = the process's count over that window / requests. The window includes what the
balancer does in the background meanwhile (health checks, metric scrapes: ~1M instructions a
second here, ~3K a request at callgrind's speed; more with three replicas than with one).

Configurations:

- ``prefixlb``: one tier, no tier routing (bench_overhead's ``prefixlb``);
- ``three-tiers``: three tiers, tier_routing with no rules and no classifier (every request to
  the default tier: the cost of the tier pipeline itself, the trace, the decision headers);
- ``classifier``: three tiers, the trained classifier deciding every request;
- ``rules+classifier``: bench_tiers.py's four rules (a regex, keyword lists, a prompt length;
  the probe matches none), then the classifier.

The classifier is trained as bench_tiers.py --overhead trains it (600 prompts asked of an
emulated three-tier fleet), or given with ``--model``.

``--baseline JSON``: another run's JSON (e.g. this program run in a worktree of an older
commit) shown beside this one.

Usage:
  python benchmarks/bench_request_cost.py [--requests 2000] [--model DIR] [--baseline JSON] [--json OUT] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_overhead as bo  # noqa: E402
import bench_proxy_core as core  # noqa: E402
from targets import Target  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TIERS = ("small", "medium", "large")


def configs(urls: list[str], model_dir: Path | None) -> dict[str, dict]:
    from bench_tiers import RULES

    one = {"listen": {"host": "127.0.0.1", "port": 0},
           "tiers": [{"name": "small", "model": "llama-3.1-8b", "replicas": [urls[0]]}]}
    three = {**one, "tiers": [{"name": t, "model": "llama-3.1-8b", "replicas": [u]} for t, u in zip(TIERS, urls)]}
    out = {"prefixlb": one, "three-tiers": {**three, "tier_routing": {}}}
    if model_dir is not None:
        clf = {"model": str(model_dir)}
        out["classifier"] = {**three, "tier_routing": {"classifier": clf}}
        out["rules+classifier"] = {**three, "tier_routing": {"rules": RULES, "classifier": clf}}
    return out


def _callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def _total(path: Path) -> int:
    """The Ir total of a callgrind dump (its ``totals:`` line; ``summary:`` may read 0 when
    instrumentation started off)."""
    m = re.search(r"^totals:\s+(\d+)", path.read_text(), re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no totals in {path}")
    return int(m.group(1))


def measure(name: str, doc: dict, work: Path, warmup: int, requests: int) -> dict:
    cfg = work / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    out = work / f"cg.{name}.out"
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, "-m", "prefixlb", "serve", "--config", str(cfg), "--log-level", "warning"]
    t = Target(name, argv, None, probe=("/v1/chat/completions", core.CHAT_BODY), startup_s=300)
    try:
        async def drive() -> float:
            from prefixlb.server.http import UpstreamPool

            pool = UpstreamPool(t.url, max_idle=64, idle_timeout=60)
            try:
                await core.load(pool, "/v1/chat/completions", warmup, 32, False)
                _callgrind("--instr=on", str(t.p.pid))
                t0 = time.perf_counter()
                await core.load(pool, "/v1/chat/completions", requests, 32, False)
                wall = time.perf_counter() - t0
                _callgrind("--instr=off", str(t.p.pid))
                _callgrind("--dump", str(t.p.pid))
                return wall
            finally:
                await pool.close()

        wall = asyncio.run(drive())
    finally:
        t.stop()
    dumps = sorted(work.glob(f"cg.{name}.out.*"))
    if not dumps:
        raise RuntimeError(f"{name}: callgrind wrote no dump")
    ir = _total(dumps[-1])
    return {"instructions_per_request": round(ir / requests), "instructions": ir, "requests": requests,
            "wall_s": round(wall, 1)}


def train_model(work: Path, seed: int = 0) -> Path:
    from bench_tiers import Fleet, collect, train_classifier, workload

    fleet = Fleet(200.0)
    try:
        rows = asyncio.run(collect(fleet, workload(600, seed), 32))
    finally:
        fleet.stop()
    model_dir, _ = train_classifier(rows, work / "router", seed)
    return model_dir


def markdown(r: dict) -> str:
    base = r["results"]["prefixlb"]["instructions_per_request"]
    m = r["machine"]
    lines = ["## bench_request_cost: instructions per proxied request (callgrind)", "",
             f"`{r['command']}` — {r['date']}, {m['cpu']} ({m['cores']} cores), Python {m['python']}, git {r['git']}; "
             f"{r['requests']} chat requests "
             f"at concurrency 32 after {r['warmup']} uncounted (bench_overhead's fake replicas and client, "
             "`model: auto`).", "",
             "| configuration | instructions / request | vs prefixlb |", "|---|---|---|"]
    b = r.get("baseline")
    if b:
        lines[-2:] = [f"| configuration | instructions / request | vs prefixlb | at {b['git']} | change |",
                      "|---|---|---|---|---|"]
    for name, v in r["results"].items():
        n = v["instructions_per_request"]
        row = f"| {name} | {n:,} | {n / base:.2f}x |"
        if b and name in b["results"]:
            o = b["results"][name]["instructions_per_request"]
            row += f" {o:,} | {n / o - 1:+.1%} |"
        lines.append(row)
    if b:
        lines += ["", f"Baseline: `{b['command']}` at git {b['git']} ({b['date']}), the same program."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--model", type=Path, default=None, help="a trained router (default: train one, ~1 minute)")
    ap.add_argument("--no-classifier", action="store_true", help="only the configurations without a classifier")
    ap.add_argument("--baseline", type=Path, default=None, help="another run's JSON to show beside this one")
    ap.add_argument("--json", type=Path, default=RESULTS / "bench_request_cost.json")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "bench_request_cost.md")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench_request_cost needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    from bench_index import machine

    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    work = Path(tempfile.mkdtemp(prefix="bench-request-cost-"))
    replicas, urls = [], []
    try:
        for _ in TIERS:
            rp, url = bo.start_replica()
            replicas.append(rp)
            urls.append(url)
        model_dir = None if args.no_classifier else (args.model or train_model(work))
        core.CHAT_BODY = bo.BODY.replace(b'"model":"llama-3.1-8b"', b'"model":"auto"')
        results = {}
        for name, doc in configs(urls, model_dir).items():
            results[name] = measure(name, doc, work, args.warmup, args.requests)
            print(f"{name}: {results[name]['instructions_per_request']:,} instructions a request", file=sys.stderr)
    finally:
        for rp in replicas:
            rp.stdin.close()  # type: ignore[union-attr]
            rp.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent).stdout.strip()
    r = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
         "git": git, "requests": args.requests, "warmup": args.warmup, "results": results}
    if args.baseline is not None:
        r["baseline"] = json.loads(args.baseline.read_text())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2) + "\n")
    args.markdown.write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
