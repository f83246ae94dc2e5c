"""bench_precise: precise mode (the index follows vLLM's KV events) against approximate mode,
several balancer instances against one, and ``--workers 2`` against one worker.

1. **Eviction churn.** llm-d's shape (tenant prefixes of 6K tokens, Zipf users, load ramped),
   on an emulated fleet whose total KV is ``--pressure`` times the shared working set, through
   prefixlb approximate, prefixlb precise and sglang-router (``prefixlb bench`` underneath, each
   target on a fresh fleet): TTFT p50/p90/p99, hit rate (replica counters) and, for prefixlb,
   the error of its predicted cached tokens against what the replicas reported.
   **Bypass**: the same with ``--bypass`` of the requests sent straight to the replicas
   (round-robin; another client of the fleet): evictions the balancer's own routing does not
   cause and approximate mode cannot see.
2. **Instances agree.** N precise-mode balancers (as N pods) in front of one emulated fleet
   publishing events; requests are spread over them round-robin and, before each, the next
   instance is asked where it would route it (``POST /admin/route``, a dry run). Reported:
   the fraction of identical decisions, and the hit rate against one instance on the same
   workload and a fresh fleet.
3. **Workers.** Requests/s through ``prefixlb serve --workers 2`` and ``--workers 1`` in front
   of the same fake replica, driven by ``wrk`` (C, so the client takes little CPU); skipped
   when wrk is not installed.

Usage: python benchmarks/bench_precise.py [--quick] [--parts churn,bypass,agree,workers] [--bypass 0.3]
Writes benchmarks/results/bench_precise.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import runner  # noqa: E402
from bench_index import machine  # noqa: E402
from targets import PRECISE, start_target  # noqa: E402

from prefixlb.emulator.fleet import start_fleet_process  # noqa: E402
from prefixlb.engine import get_profile  # noqa: E402
from prefixlb.loadgen import replica_counters  # noqa: E402

RESULTS = HERE / "results"


# -- 1. churn ---------------------------------------------------------------------------------------


def churn(quick: bool, out: Path, bypass: float = 0.0) -> dict:
    """Eviction churn; with ``bypass`` that share of the requests goes straight to the replicas
    (another client of the fleet): evictions the balancer's own routing cannot predict."""
    name = "bench_precise_bypass" if bypass else "bench_precise_churn"
    argv = ["--workload", "llmd", "--targets", f"prefixlb,{PRECISE},sglang-router", "--pressure", "1.0",
            "--out", str(out), "--name", name, "--time-scale", "2"]
    if bypass:
        argv += ["--bypass", str(bypass)]
    if quick:
        argv += ["--scale", "0.3"]
    args = runner.build_args(argv)
    shown = ["benchmarks/results" if a == str(RESULTS) else a for a in argv]
    args.command_line = "prefixlb bench " + " ".join(shown)
    report = runner.run(args)
    return {"command": report["setup"]["command"], "oracle_hit_rate": report["oracle_hit_rate"],
            "ttft_floor_ms": report["ttft_floor_ms"], "setup": report["setup"], "targets": report["targets"],
            "bypass": bypass}


# -- 2. agreement -----------------------------------------------------------------------------------


async def _agree_run(urls: list[str], bases: list[str], specs, time_scale: float) -> dict:
    import aiohttp
    import orjson

    auth = {"authorization": "Bearer bench", "content-type": "application/json"}
    same = asked = errors = 0
    sem = asyncio.Semaphore(64)
    before = await replica_counters(urls)
    start = time.perf_counter()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def one(i: int, spec) -> None:
            nonlocal same, asked, errors
            delay = spec.at / time_scale - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            here = bases[i % len(bases)]
            async with sem:
                shadow = None
                # another instance's answer; with one instance, its own answer a moment earlier
                # (the floor: requests in flight change the state between the ask and the send)
                other = bases[(i + 1) % len(bases)]
                async with s.post(other + "/admin/route", data=orjson.dumps({**spec.body, "chat": spec.chat}),
                                  headers=auth) as r:
                    if r.status == 200:
                        shadow = orjson.loads(await r.read())["url"]
                async with s.post(here + spec.path, data=orjson.dumps(spec.body),
                                  headers={"content-type": "application/json"}) as r:
                    chosen = r.headers.get("x-prefixlb-replica")
                    async for _ in r.content.iter_any():
                        pass
                    if r.status != 200:
                        errors += 1
                if shadow is not None and chosen:
                    asked += 1
                    same += shadow == chosen

        await asyncio.gather(*(one(i, sp) for i, sp in enumerate(specs)))
    after = await replica_counters(urls)
    dq = sum(after[u][0] - before[u][0] for u in urls)
    dh = sum(after[u][1] - before[u][1] for u in urls)
    return {"instances": len(bases), "hit_rate": round(dh / dq, 4) if dq else 0.0,
            "identical_decisions": round(same / asked, 4) if asked else None, "compared": asked, "errors": errors}


def agree(quick: bool, instances: int, peer_sync: bool = True) -> dict:
    profile = "h100-llama3-8b"
    scale = 0.3 if quick else 1.0
    specs = runner.make_workload("tenants", seed=0, scale=scale, model=get_profile(profile).model)
    ws = runner.shared_working_set(specs)
    kv = max(20_000, int(1.2 * ws / 4))
    from prefixlb.engine import request_prompt_ids
    from prefixlb.engine.tokenizer import default_tokenizer

    tok = default_tokenizer()
    mean = sum(len(request_prompt_ids(tok, r.body, r.chat)) for r in specs[:200]) / min(200, len(specs))
    cap = runner.prefill_capacity(profile, int(mean), 16_384)
    specs = runner.retime(specs, 0.6 * 4 * cap / mean)
    time_scale = 2.0
    rows = []
    for n in (1, instances):
        fleet = start_fleet_process(4, base_port=0, profile=profile, time_scale=time_scale, kv_capacity_tokens=kv,
                                    max_model_len=16_384, kv_events_endpoint="tcp://127.0.0.1:*",
                                    kv_replay_endpoint="tcp://127.0.0.1:*", startup_timeout=90)
        targets = []
        try:
            probe = json.dumps({"model": get_profile(profile).model, "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 1}).encode()
            from targets import free_port

            eps = [f"tcp://127.0.0.1:{free_port()}" for _ in range(n)]
            for i in range(n):
                extra = {"peers": {"listen": eps[i], "connect": eps[:i] + eps[i + 1:]}} if peer_sync and n > 1 else {}
                targets.append(start_target(PRECISE, fleet.urls, probe=("/v1/chat/completions", probe),
                                            precise={"tokenizer": "byte",
                                                     "block_size": get_profile(profile).block_size, "extra": extra},
                                            extra=["--admin-token", "bench"]))
            rows.append(asyncio.run(_agree_run(fleet.urls, [t.url for t in targets], specs, time_scale)))
        finally:
            for t in targets:
                t.stop()
            fleet.stop()
        print(f"bench_precise: {n} instance(s): {rows[-1]}", file=sys.stderr)
    one, many = rows
    return {"workload": "tenants", "requests": len(specs), "replicas": 4, "time_scale": time_scale, "rows": rows,
            "hit_rate_delta": round(many["hit_rate"] - one["hit_rate"], 4), "peer_sync": peer_sync}


# -- 3. workers -------------------------------------------------------------------------------------

_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"auto","messages":[{"role":"user","content":"hello there, how are you today?"}],"max_tokens":8}'
"""


def workers(quick: bool) -> dict:
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"skipped": "wrk not installed (apt-get install wrk)"}
    import tempfile

    lua = Path(tempfile.mkstemp(suffix=".lua")[1])
    lua.write_text(_LUA)
    import bench_overhead

    rep, url = bench_overhead.start_replica()
    try:
        dur = "3s" if quick else "8s"
        rounds = 1 if quick else 3
        res: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(rounds):
            for w in (1, 2):
                p = subprocess.Popen([sys.executable, "-m", "prefixlb", "serve", "--replica", url, "--port", "0",
                                      "--workers", str(w), "--log-level", "warning"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
                try:
                    base = None
                    for _ in range(w):
                        m = re.search(r"listening on (http://\S+)", p.stdout.readline())  # type: ignore[union-attr]
                        base = m.group(1) if m else base
                    time.sleep(0.5)
                    target = base + "/v1/chat/completions"
                    subprocess.run([wrk, "-t1", "-c64", "-d2s", "-s", str(lua), target], capture_output=True)
                    o = subprocess.run([wrk, "-t1", "-c64", f"-d{dur}", "-s", str(lua), target], capture_output=True,
                                       text=True).stdout
                    res[w].append(float(re.search(r"Requests/sec:\s+([\d.]+)", o).group(1)))  # type: ignore[union-attr]
                finally:
                    import os
                    import signal

                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(30)
    finally:
        rep.stdin.close()  # type: ignore[union-attr]
        rep.wait(5)
        lua.unlink()
    med = {w: sorted(v)[len(v) // 2] for w, v in res.items()}
    return {"rps_workers_1": round(med[1]), "rps_workers_2": round(med[2]), "ratio": round(med[2] / med[1], 2),
            "rounds": rounds, "client": "wrk -t1 -c64", "all": res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="churn,bypass,agree,workers")
    ap.add_argument("--bypass", type=float, default=0.3,
                    help="the bypass part: share of the requests sent straight to the replicas (default 0.3)")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--no-peer-sync", action="store_true", help="instances share only the replicas' KV events")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))
    rep: dict = {"benchmark": "bench_precise", "machine": machine(),
                 "command": " ".join(["python", "benchmarks/bench_precise.py", *(sys.argv[1:] if argv is None else argv)])}
    random.seed(0)
    if "churn" in parts:
        rep["churn"] = churn(a.quick, a.out)
    if "bypass" in parts:
        rep["bypass"] = churn(a.quick, a.out, a.bypass)
    if "agree" in parts:
        rep["agree"] = agree(a.quick, a.instances, peer_sync=not a.no_peer_sync)
    if "workers" in parts:
        rep["workers"] = workers(a.quick)
    for part in ("churn", "bypass", "agree", "workers"):
        if part in rep:
            rep[part]["date"] = rep["machine"]["date"]
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "bench_precise.json"
    if path.exists():  # parts not run this time keep their recorded results (each says when)
        old = json.loads(path.read_text())
        for part in ("churn", "bypass", "agree", "workers"):
            if part not in rep and part in old:
                rep[part] = {**old[part], "date": old[part].get("date", old.get("machine", {}).get("date")),
                             "command_when_recorded": old[part].get("command_when_recorded", old.get("command"))}
    path.write_text(json.dumps(rep, indent=2) + "\n")
    md = markdown(rep)
    (a.out / "bench_precise.md").write_text(md)
    print(md)
    return 0


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = ["## bench_precise: precise vs approximate, instances that agree, workers", "",
             f"`{rep['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores", ""]
    for key in ("churn", "bypass"):
        c = rep.get(key)
        if not c:
            continue
        s = c["setup"]
        by = c.get("bypass") or 0.0
        title = (f"Eviction churn the balancer cannot see: {by:.0%} of the requests bypass it (round-robin straight "
                 "to the replicas, another client of the fleet)" if by else "Eviction churn")
        lines += [f"### {title}: llm-d's shape, {s['requests']} requests, fleet KV {s['fleet_kv_over_working_set']}x "
                  f"the shared working set, {s['replicas']} replicas", "",
                  f"`{c['command']}` ({c.get('date') or s.get('date')}). Pooled-cache hit rate {c['oracle_hit_rate']:.1%}; TTFT floor p50/p90/p99 "
                  f"{c['ttft_floor_ms']['p50']:.0f} / {c['ttft_floor_ms']['p90']:.0f} / {c['ttft_floor_ms']['p99']:.0f} ms"
                  + (" (of the routed requests; hit rate: the routed requests' own, from their usage)" if by else ""), "",
                  "| target | hit rate | TTFT p50 ms | p90 | p99 | predicted vs actual cached tokens | errors |",
                  "|---|---|---|---|---|---|---|"]
        for t in c["targets"]:
            if "skipped" in t:
                lines.append(f"| {t['name']} | skipped: {t['skipped']} | | | | | |")
                continue
            err = t.get("cached_prediction_error")
            hit = t.get("routed_hit_rate") if by else t["hit_rate"]
            lines.append(f"| {t['name']} | {'–' if hit is None else format(hit, '.1%')} | {t['ttft_p50_ms']:.0f} | "
                         f"{t['ttft_p90_ms']:.0f} | {t['ttft_p99_ms']:.0f} | "
                         f"{'–' if err is None else format(err, '.1%') + ' off'} | {t['errors']} |")
        lines.append("")
    g = rep.get("agree")
    if g:
        one, many = g["rows"]
        lines += [f"### {many['instances']} precise-mode instances vs one ({g['workload']}, {g['requests']} requests, "
                  f"{g['replicas']} replicas, peer sync {'on' if g.get('peer_sync') else 'off'})", "",
                  *([f"Recorded {g['date']} (`{g.get('command_when_recorded') or rep['command']}`).", ""]
                    if g.get("date") else []),
                  f"- identical decisions across instances: **{many['identical_decisions']:.1%}** "
                  f"({many['compared']} requests compared; goal ≥ 95%); one instance asked the same way agrees "
                  f"with itself {one['identical_decisions']:.1%} of the time (requests in flight move its state "
                  f"between the ask and the send)",
                  f"- hit rate: {many['hit_rate']:.1%} with {many['instances']} instances vs {one['hit_rate']:.1%} with one "
                  f"(difference {g['hit_rate_delta'] * 100:+.1f} points; goal within 2)", ""]
    w = rep.get("workers")
    if w:
        if "skipped" in w:
            lines += [f"### Workers: skipped ({w['skipped']})", ""]
        else:
            lines += ["### --workers 2 vs 1 (same fake replica, wrk client)", "",
                      *([f"Recorded {w['date']} (`{w.get('command_when_recorded') or rep['command']}`).", ""]
                        if w.get("date") else []),
                      f"- {w['rps_workers_2']:,} vs {w['rps_workers_1']:,} req/s: **{w['ratio']}x** (goal ≥ 1.7x; "
                      f"median of {w['rounds']} rounds; the client and the replica share the same 2 cores)", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
