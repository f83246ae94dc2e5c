"""soak: a long run at 70% of the fleet's capacity; the balancer's memory, descriptors and
in-flight gauge stay flat, and nothing fails.

Setup: ``prefixlb serve`` (a real process) in front of 4 emulated replicas (``prefixlb
emulate``, profile a10g-llama3-8b in real time by default, so the load stays light on a shared
machine). The offered load is computed as ``benchmarks/runner.py`` does it: prompt tokens per
second at ``--load`` (0.7) of the fleet's prefill throughput, counting every prompt token as
if nothing were cached (``runner.prefill_capacity`` for the mean prompt). The workload is the
tenants workload (shared system prompts, Zipf popularity), every request streamed, open loop
(Poisson arrivals), bounded in count and time.

Every ``--sample-s`` (2) seconds: the balancer's RSS (``/proc/PID/status`` VmRSS), its open
descriptors (``/proc/PID/fd``), its CPU seconds and ``prefixlb_inflight_requests``. The first
10% of the run is warm-up and excluded; for the rest a least-squares line gives the growth
from start to end. Pass: RSS grows by at most 5%; descriptors (which follow the number of
connections, so the traffic) and the in-flight gauge grow by at most 5% or by less than two
standard errors of the fitted change (a trend smaller than the traffic's own noise cannot be
told from it); the gauge returns to 0 once the load stops; 0 requests fail. ``--quick`` is a
smoke run of the program: two minutes are too short for the growth figures to mean much.

Usage:
  python benchmarks/reliability/soak.py                 # 30 minutes
  python benchmarks/reliability/soak.py --minutes 10
  python benchmarks/reliability/soak.py --quick         # 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (
    OK,
    check,
    checks_md,
    command_line,
    cpu_seconds,
    fd_count,
    header_md,
    linear_growth,
    machine,
    open_loop,
    percentile,
    rss_kib,
    scrape,
    start_balancer,
    start_emulators,
    stream_request,
    summary,
    write_report,
)
from runner import emulator_health, prefill_capacity

from prefixlb.emulator.replica import load_tokenizer
from prefixlb.engine import request_prompt_ids
from prefixlb.loadgen import iter_tenant_workload


async def run(args: argparse.Namespace) -> dict:
    duration = args.minutes * 60.0
    tok = load_tokenizer(None)
    gen = lambda n: iter_tenant_workload(seed=args.seed, tenants=args.tenants, system_tokens=args.system_tokens,
                                         query_tokens=args.query_tokens, requests=n, rate=1.0,
                                         max_tokens=args.max_tokens, model="auto")
    sample_specs = list(gen(200))
    mean_prompt = sum(len(request_prompt_ids(tok, r.body, r.chat)) for r in sample_specs) / len(sample_specs)
    cap = prefill_capacity(args.profile, int(mean_prompt), args.max_model_len)
    rate_emulated = args.load * args.replicas * cap / mean_prompt
    rate_wall = rate_emulated * args.time_scale
    n_max = int(rate_wall * duration * 1.5) + 100
    bodies = [orjson.dumps(r.body) for r in gen(min(n_max, 50_000))]
    fleets = start_emulators(args.replicas, profile=args.profile, time_scale=args.time_scale,
                             max_model_len=args.max_model_len)
    urls = fleets[0].urls
    balancer = None
    samples: list[dict] = []
    outcomes: dict[str, int] = {}
    ttfts: list[float] = []
    bad: list[dict] = []
    try:
        balancer = await asyncio.to_thread(start_balancer, {"tiers": [{"name": "default", "replicas": urls}]},
                                           args=["--log-level", "warning"], want_healthy=args.replicas)
        base, pid = balancer.url, balancer.pid
        conn = aiohttp.TCPConnector(limit=0)
        session = aiohttp.ClientSession(connector=conn)
        t0 = time.monotonic()

        async def fire(i: int) -> None:
            r = await stream_request(session, base + "/v1/chat/completions", bodies[i % len(bodies)],
                                     idle_timeout=60, total_timeout=300)
            outcomes[r.kind] = outcomes.get(r.kind, 0) + 1
            if r.kind == OK and r.first_byte_s is not None:
                ttfts.append(r.first_byte_s * 1e3 * args.time_scale)
            elif r.kind != OK and len(bad) < 20:
                bad.append({"kind": r.kind, "status": r.status, "error": r.error[:200],
                            "at_s": round(r.started - t0, 1)})

        stop_sampling = asyncio.Event()

        async def sampler() -> None:
            async with aiohttp.ClientSession() as s:
                while not stop_sampling.is_set():
                    t = time.monotonic()
                    try:
                        m = await scrape(s, base)
                        inflight = m.sum("prefixlb_inflight_requests")
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        inflight = None
                    samples.append({"t": round(t - t0, 2), "rss_kib": rss_kib(pid), "fds": fd_count(pid),
                                    "inflight": inflight, "cpu_s": cpu_seconds(pid),
                                    "done": sum(outcomes.values())})
                    try:
                        await asyncio.wait_for(stop_sampling.wait(), max(0.0, args.sample_s - (time.monotonic() - t)))
                    except asyncio.TimeoutError:
                        pass

        st = asyncio.ensure_future(sampler())
        load = await open_loop(fire, rate_wall, max_requests=n_max, duration_s=duration, seed=args.seed,
                               drain_s=320)
        t_load_end = time.monotonic()
        stop_sampling.set()
        await st
        await session.close()
        await asyncio.sleep(1.0)
        async with aiohttp.ClientSession() as s:
            final_inflight = None
            for _ in range(50):
                final_inflight = (await scrape(s, base)).sum("prefixlb_inflight_requests")
                if final_inflight == 0:
                    break
                await asyncio.sleep(0.2)
        end_state = {"rss_kib": rss_kib(pid), "fds": fd_count(pid), "inflight": final_inflight,
                     "cpu_s": cpu_seconds(pid)}
        emu = await emulator_health(urls)
    finally:
        if balancer is not None:
            balancer.stop()
        for f in fleets:
            f.stop()
    return {"setup": {"replicas": args.replicas, "profile": args.profile, "time_scale": args.time_scale,
                      "load": args.load, "minutes": args.minutes, "mean_prompt_tokens": round(mean_prompt),
                      "prefill_tokens_per_s_per_replica": round(cap), "rate_rps_emulated": round(rate_emulated, 3),
                      "rate_rps_wall": round(rate_wall, 3), "max_tokens": args.max_tokens, "tenants": args.tenants,
                      "sample_s": args.sample_s,
                      "load_definition": "offered prompt tokens/s over the fleet's prefill throughput, nothing "
                                         "cached (benchmarks/runner.py)"},
            "load": load, "load_seconds": round(t_load_end - t0, 1), "outcomes": outcomes,
            "requests": sum(outcomes.values()), "errors": sum(v for k, v in outcomes.items() if k != OK),
            "bad_examples": bad, "ttft_emulated_ms": {"p50": round(percentile(ttfts, 0.5), 1),
                                                     "p99": round(percentile(ttfts, 0.99), 1)} if ttfts else {},
            "samples": samples, "end": end_state, "emulator": emu}


def analyse(r: dict) -> dict:
    s = [x for x in r["samples"] if x["rss_kib"] is not None and x["fds"] is not None]
    if not s:
        return {}
    t_end = s[-1]["t"]
    steady = [x for x in s if x["t"] >= 0.1 * t_end]
    ts = [x["t"] for x in steady]
    out = {"warmup_excluded_s": round(0.1 * t_end, 1), "samples_used": len(steady)}
    for key in ("rss_kib", "fds"):
        ys = [float(x[key]) for x in steady]
        out[key] = {**summary(ys), **linear_growth(ts, ys)}
    inf = [(x["t"], float(x["inflight"])) for x in steady if x["inflight"] is not None]
    ys = [y for _, y in inf]
    g = linear_growth([t for t, _ in inf], ys)
    mean = sum(ys) / len(ys) if ys else 0.0
    g["change"] = round(g["end"] - g["start"], 3) if g.get("end") is not None else None
    g["change_pct_of_mean"] = round(g["change"] / mean * 100, 2) if mean and g["change"] is not None else None
    out["inflight"] = {**summary(ys), **g}
    cpu = [x for x in steady if x.get("cpu_s") is not None]
    if len(cpu) >= 2 and cpu[-1]["t"] > cpu[0]["t"]:
        out["balancer_cpu_share"] = round((cpu[-1]["cpu_s"] - cpu[0]["cpu_s"]) / (cpu[-1]["t"] - cpu[0]["t"]), 3)
    return out


def build_checks(r: dict) -> list[dict]:
    a = r["analysis"]
    inf, fds, rss = a["inflight"], a["fds"], a["rss_kib"]

    def flat(x: dict, base: float) -> bool:
        # growth within 5% of ``base``, or a fitted change within two standard errors of zero
        # (a count that moves with the traffic cannot show a trend smaller than its noise)
        change = x["end"] - x["start"]
        return change <= 0.05 * base or change <= 2 * (x["change_se"] or 0.0)

    return [
        check("errors", f"{r['errors']} of {r['requests']:,} ({r['outcomes']})", "0", r["errors"] == 0),
        check("balancer RSS growth after warm-up (linear fit)",
              f"{rss['growth_pct']}% ({rss['start'] / 1024:.1f} -> {rss['end'] / 1024:.1f} MiB)",
              "<= 5%", rss["growth_pct"] <= 5),
        check("balancer open descriptors growth after warm-up (linear fit)",
              f"{fds['growth_pct']}% ({fds['start']:.1f} -> {fds['end']:.1f}; standard error of the change "
              f"{fds['change_se']})", "<= 5% of the start, or within 2 standard errors", flat(fds, fds["start"])),
        check("in-flight gauge flat after warm-up (linear fit)",
              f"{inf['start']:.2f} -> {inf['end']:.2f} (mean {inf['mean']:.2f}, change {inf['change_pct_of_mean']}% "
              f"of the mean; standard error {inf['change_se']})",
              "change <= 5% of the mean, or within 2 standard errors", flat(inf, inf["mean"])),
        check("in-flight back to 0 after the load", f"{r['end']['inflight']:g}", "0", r["end"]["inflight"] == 0),
        check("the offered load was sent (nothing skipped by the client)",
              f"{r['load']['sent']:,} sent, {r['load']['skipped']} skipped, {r['load']['abandoned_after_drain']} "
              "abandoned", "0 skipped, 0 abandoned", r["load"]["skipped"] == 0 and r["load"]["abandoned_after_drain"] == 0),
    ]


def to_markdown(report: dict) -> str:
    s, a = report["setup"], report["analysis"]
    lines = header_md("reliability: soak", report)
    lines += [f"{s['minutes']:g} minutes at {s['load']:.0%} of the fleet's prefill throughput: {s['replicas']} emulated "
              f"replicas ({s['profile']}, {s['time_scale']:g}x), ~{s['mean_prompt_tokens']}-token prompts "
              f"({s['tenants']} tenants), {s['max_tokens']} output tokens streamed, {s['rate_rps_wall']:.2f} req/s "
              f"(wall); {report['requests']:,} requests; TTFT p50/p99 {report['ttft_emulated_ms'].get('p50')} / "
              f"{report['ttft_emulated_ms'].get('p99')} ms; balancer CPU {a.get('balancer_cpu_share')} of a core. "
              f"Warm-up excluded: first {a['warmup_excluded_s']} s; {a['samples_used']} samples every "
              f"{s['sample_s']:g} s.", ""]
    lines += checks_md(report["checks"])
    lines += ["", "| series (after warm-up) | min | mean | max | fit start | fit end | growth |", "|---|---|---|---|---|---|---|"]
    for key, label, div in (("rss_kib", "RSS MiB", 1024), ("fds", "open fds", 1), ("inflight", "in-flight", 1)):
        x = a[key]
        lines.append(f"| {label} | {x['min'] / div:.1f} | {x['mean'] / div:.1f} | {x['max'] / div:.1f} | "
                     f"{x['start'] / div:.1f} | {x['end'] / div:.1f} | {x['growth_pct']}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 minutes (unless --minutes says otherwise)")
    ap.add_argument("--minutes", type=float, default=None, help="default 30; --quick 2")
    ap.add_argument("--load", type=float, default=0.7)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--profile", default="a10g-llama3-8b")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--tenants", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=800)
    ap.add_argument("--query-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--sample-s", type=float, default=None, help="seconds between samples (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.minutes = args.minutes or (2.0 if args.quick else 30.0)
    args.sample_s = args.sample_s or 2.0
    report = asyncio.run(run(args))
    report.update({"benchmark": "reliability_soak", "machine": machine(), "command": command_line("soak.py")})
    report["analysis"] = analyse(report)
    report["checks"] = build_checks(report)
    report["ok"] = all(c["ok"] for c in report["checks"])
    write_report("soak", report, to_markdown(report), args.out, args.quick)
    print(to_markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
