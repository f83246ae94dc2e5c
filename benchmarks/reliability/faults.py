"""faults: a replica killed, one hung, one slowed, one flapping, under a steady streaming load.

Setup: four emulated replicas, each its own ``prefixlb emulate --replicas 1`` process (so one
can be SIGKILLed and restarted on the same port), behind ``prefixlb serve`` (a real process).
An open-loop client sends streaming chat requests (Poisson arrivals; half of them share one of
64 tenant system prompts, half are unique) for the whole run and classifies how each one ended:

- ``ok``: 200, events, ``data: [DONE]``;
- ``refused_before_first_byte``: an error status, or no response at all -- a request lost
  before its first byte (goal 0: the balancer must have retried it elsewhere);
- ``error_event_after_first_byte``: 200, then an error event and ``data: [DONE]`` -- the
  honest end of a stream whose replica failed (allowed; reported with how many had delivered
  content before the error);
- ``truncated``: 200, then the stream stopped without an error event or ``[DONE]`` (goal 0);
- ``hung``: no byte for ``first_byte_s + 15`` seconds (goal 0).

Phases, one fault at a time so each is measured alone (wall seconds, full run / --quick):

1. kill: SIGKILL replica 0's process group; then restart it on the same port;
2. hang: replica 1 ``POST /admin/faults {"hang": true}`` (answers nothing, health included); then reset;
3. slow: replica 2 ``{"latency": 1.0, "slow_stream": 0.05}`` (emulated seconds); then reset;
4. flap: replica 3 ``{"flap_period": 8.0}`` (down, then up, 8 emulated seconds each); then reset.

A watcher scrapes the balancer's ``/metrics`` every 100 ms: ``prefixlb_replica_healthy``,
``prefixlb_replica_available``, ``prefixlb_breaker_state``, ``prefixlb_requests_total`` per
replica, ``prefixlb_retries_total`` by reason and ``prefixlb_stream_errors_total``. From it:
time from the kill (hang) until the replica is no longer available, the last retry caused by
it (the last time the balancer still tried it), time from its restart (reset) until it is
available again and until it answers a request again.

The balancer runs with its defaults except ``timeouts.first_byte_s`` (10 s instead of 300 s: a
request already sent to the replica that hangs waits that long before it is retried elsewhere;
``--first-byte-s`` changes it).

Usage:
  python benchmarks/reliability/faults.py            # about 4 minutes
  python benchmarks/reliability/faults.py --quick    # about 80 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (
    ERROR_EVENT,
    HUNG,
    OK,
    REFUSED,
    TRUNCATED,
    Metrics,
    check,
    checks_md,
    command_line,
    header_md,
    machine,
    open_loop,
    percentile,
    start_balancer,
    start_emulators,
    stream_request,
    write_report,
)

from prefixlb.emulator.fleet import start_fleet_process
from prefixlb.loadgen import iter_tenant_workload, iter_unique_workload

KINDS = (OK, REFUSED, ERROR_EVENT, TRUNCATED, HUNG)


class Watcher:
    """Scrapes the balancer's /metrics every ``interval`` seconds into a time series."""

    def __init__(self, base: str, interval: float = 0.1) -> None:
        self.base = base
        self.interval = interval
        self.rows: list[dict] = []
        self._task: asyncio.Task | None = None
        self.failures = 0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            while True:
                t = time.monotonic()
                try:
                    async with s.get(self.base + "/metrics") as r:
                        m = Metrics(await r.text())
                    self.rows.append({
                        "t": t,
                        "healthy": m.by("prefixlb_replica_healthy", "replica"),
                        "available": m.by("prefixlb_replica_available", "replica"),
                        "breaker": m.by("prefixlb_breaker_state", "replica"),
                        "inflight": m.by("prefixlb_inflight_requests", "replica"),
                        "requests": m.by("prefixlb_requests_total", "replica"),
                        "retries": m.by("prefixlb_retries_total", "reason"),
                        "stream_errors": m.sum("prefixlb_stream_errors_total"),
                    })
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    self.failures += 1
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - t)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- reading the series --------------------------------------------------------------------------

    def first(self, since: float, until: float, pred) -> float | None:
        for row in self.rows:
            if since <= row["t"] <= until and pred(row):
                return row["t"]
        return None

    def at(self, t: float) -> dict | None:
        best = None
        for row in self.rows:
            if row["t"] <= t:
                best = row
            else:
                break
        return best

    def last_change(self, since: float, until: float, value) -> float | None:
        """The last sample time in [since, until] at which ``value(row)`` grew."""
        prev, last = None, None
        for row in self.rows:
            if row["t"] < since:
                prev = value(row)
                continue
            if row["t"] > until:
                break
            v = value(row)
            if prev is not None and v > prev:
                last = row["t"]
            prev = v
        return last

    def delta(self, since: float, until: float, value) -> float:
        a, b = self.at(since), self.at(until)
        return (value(b) if b else 0.0) - (value(a) if a else 0.0)


async def post_fault(url: str, body: dict, within_s: float = 30.0) -> dict:
    """POST /admin/faults, retried until it goes through (a flapping replica is down half the time)."""
    end = time.monotonic() + within_s
    while True:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
                async with s.post(url + "/admin/faults", data=orjson.dumps(body)) as r:
                    return await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


def _secs(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


async def run(args: argparse.Namespace) -> dict:
    q = args.quick
    scale, profile = args.time_scale, args.profile
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    log_emu = workdir / f"prefixlb-faults-emulate-{os.getpid()}.log"
    procs = start_emulators(4, separate=True, time_scale=scale, profile=profile, log_path=log_emu)
    urls = [p.urls[0] for p in procs]
    config = {"tiers": [{"name": "default", "replicas": urls}],
              "timeouts": {"first_byte_s": args.first_byte_s}}
    balancer = None
    watcher = None
    results: list = []
    phases: dict[str, dict] = {}
    try:
        balancer = await asyncio.to_thread(start_balancer, config, args=["--log-level", "warning"], want_healthy=4,
                                           log_path=workdir / f"prefixlb-faults-serve-{os.getpid()}.log")
        base = balancer.url
        watcher = Watcher(base)
        watcher.start()
        n_max = int(args.rate * args.duration_cap * 1.2) + 10
        # half tenant requests (shared system prompts: cache-aware routing makes them sticky), half
        # unique prompts (no cached prefix anywhere: they go where the queue is shortest), so every
        # replica, a restarted empty one included, gets traffic
        shared = iter_tenant_workload(seed=args.seed, tenants=64, zipf=0.5, system_tokens=args.prompt_tokens,
                                      query_tokens=100, requests=n_max // 2 + 1, rate=1.0,
                                      max_tokens=args.max_tokens, model="auto")
        unique = iter_unique_workload(seed=args.seed + 1, requests=n_max // 2 + 1,
                                      prompt_tokens=args.prompt_tokens + 100, rate=1.0, max_tokens=args.max_tokens,
                                      model="auto")
        bodies = [orjson.dumps(r.body) for pair in zip(shared, unique) for r in pair]
        idle = args.first_byte_s + 15
        stop_load = asyncio.Event()
        conn = aiohttp.TCPConnector(limit=0)
        session = aiohttp.ClientSession(connector=conn)

        async def fire(i: int) -> None:
            r = await stream_request(session, base + "/v1/chat/completions", bodies[i % len(bodies)],
                                     idle_timeout=idle, total_timeout=idle + 120)
            results.append(r)

        load = asyncio.ensure_future(open_loop(
            fire, args.rate, max_requests=n_max, duration_s=args.duration_cap, seed=args.seed,
            drain_s=idle + 130, stop=stop_load))
        t_start = time.monotonic()
        d = (lambda full, quick: quick if q else full)

        await asyncio.sleep(d(20, 8))

        # 1. kill replica 0, restart it on the same port
        victim = procs[0]
        port = int(urls[0].rsplit(":", 1)[1])
        t_kill = time.monotonic()
        os.killpg(victim.pid, signal.SIGKILL)  # the emulator's own process group (start_new_session)
        victim.proc.wait(10)
        victim.stop()  # already dead: closes its stdout pipe
        await asyncio.sleep(d(25, 10))
        t_restart_cmd = time.monotonic()
        with open(log_emu, "ab") as log:
            procs[0] = await asyncio.to_thread(start_fleet_process, 1, base_port=port, index_offset=0,
                                               time_scale=scale, profile=profile, startup_timeout=60, stderr=log)
        t_restart = time.monotonic()  # the new process printed its URL: it is accepting
        await asyncio.sleep(d(30, 12))
        phases["kill"] = _eviction(watcher, urls[0], t_kill, t_restart_cmd, t_restart, time.monotonic(),
                                   restart_s=t_restart - t_restart_cmd)
        phases["kill"]["_t0"] = t_kill
        await asyncio.sleep(d(5, 2))

        # 2. hang replica 1, then reset it
        t_hang = time.monotonic()
        await post_fault(urls[1], {"hang": True})
        await asyncio.sleep(d(25, 12))
        t_reset = time.monotonic()
        await post_fault(urls[1], {"reset": True})
        await asyncio.sleep(d(30, 12))
        phases["hang"] = _eviction(watcher, urls[1], t_hang, t_reset, t_reset, time.monotonic(),
                                   retry_window_s=args.first_byte_s + 2)
        hung_waits = [r.first_byte_s for r in results if t_hang - 1 <= r.started < t_reset and r.first_byte_s]
        phases["hang"]["slowest_first_byte_s"] = round(max(hung_waits), 2) if hung_waits else None
        phases["hang"]["requests_waiting_over_first_byte_s"] = sum(1 for x in hung_waits if x >= args.first_byte_s)
        phases["hang"]["_t0"] = t_hang
        await asyncio.sleep(d(5, 2))

        # 3. slow replica 2
        t_slow = time.monotonic()
        await post_fault(urls[2], {"latency": 1.0, "slow_stream": 0.05})
        await asyncio.sleep(d(30, 10))
        t_slow_end = time.monotonic()
        await post_fault(urls[2], {"reset": True})
        await asyncio.sleep(d(30, 5))
        phases["slow"] = _slow(watcher, urls[2], t_slow, t_slow_end, time.monotonic(), results)
        phases["slow"]["_t0"] = t_slow

        # 4. flap replica 3
        t_flap = time.monotonic()
        await post_fault(urls[3], {"flap_period": 8.0})
        await asyncio.sleep(d(30, 14))
        t_flap_end = time.monotonic()
        await post_fault(urls[3], {"reset": True})
        await asyncio.sleep(d(20, 10))
        phases["flap"] = _flap(watcher, urls[3], t_flap, t_flap_end, time.monotonic())
        phases["flap"]["_t0"] = t_flap

        stop_load.set()
        load_info = await load
        t_end = time.monotonic()
        await asyncio.sleep(0.5)
        await session.close()
        async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
            final = Metrics(await r.text())
        import runner  # benchmarks/runner.py: the emulated fleet's lateness

        emu = await runner.emulator_health(urls)
    finally:
        if watcher is not None:
            await watcher.stop()
        if balancer is not None:
            balancer.stop()
        for p in procs:
            p.stop()
    by_phase = _outcomes_by_phase(results, t_start, phases, t_end)
    return {
        "setup": {"replicas": 4, "processes": "one prefixlb emulate --replicas 1 each", "profile": profile,
                  "time_scale": scale, "rate_rps_wall": args.rate, "prompt_tokens": args.prompt_tokens + 100,
                  "max_tokens": args.max_tokens, "first_byte_s": args.first_byte_s,
                  "client_idle_timeout_s": idle, "balancer": "prefixlb serve, defaults except timeouts.first_byte_s",
                  "faults": {"kill": "SIGKILL of replica 0's process group, then a new process on the same port",
                             "hang": "replica 1: {hang: true}", "slow": "replica 2: {latency: 1.0, slow_stream: 0.05}",
                             "flap": "replica 3: {flap_period: 8.0}"}},
        "load": load_info, "requests": len(results), "outcomes": _count(results),
        "error_events_before_any_content": sum(1 for r in results if r.kind == ERROR_EVENT and r.content_events == 0),
        "outcomes_by_phase": by_phase, "phases": phases,
        "balancer_totals": {"retries_by_reason": final.by("prefixlb_retries_total", "reason"),
                            "requests_by_replica": final.by("prefixlb_requests_total", "replica"),
                            "stream_errors": final.sum("prefixlb_stream_errors_total"),
                            "inflight_at_end": final.sum("prefixlb_inflight_requests")},
        "emulator": emu, "watcher_samples": len(watcher.rows) if watcher else 0,
        "watcher_failures": watcher.failures if watcher else None,
        "ttft_ms": _ttft(results),
        "bad_examples": [{"kind": r.kind, "status": r.status, "error": r.error[:200], "replica": r.replica,
                          "at_s": round(r.started - t_start, 2)} for r in results if r.kind in (REFUSED, TRUNCATED, HUNG)][:20],
    }


def _count(rs) -> dict:
    out = {k: 0 for k in KINDS}
    for r in rs:
        out[r.kind] = out.get(r.kind, 0) + 1
    return out


def _ttft(rs) -> dict:
    xs = [r.first_byte_s * 1e3 for r in rs if r.kind == OK and r.first_byte_s is not None]
    return {"p50": round(percentile(xs, 0.5), 1), "p99": round(percentile(xs, 0.99), 1)} if xs else {}


def _eviction(w: Watcher, url: str, t_fault: float, t_fault_end: float, t_back: float, t_until: float,
              restart_s: float | None = None, retry_window_s: float = 0.0) -> dict:
    """Times around one replica's outage, from the watcher's series. Retries are counted from the
    fault until its end plus ``retry_window_s`` (requests already waiting on a hung replica time
    out after the reset)."""
    unavailable = w.first(t_fault, t_fault_end, lambda r: r["available"].get(url, 1) == 0)
    unhealthy = w.first(t_fault, t_fault_end, lambda r: r["healthy"].get(url, 1) == 0)
    retries = lambda r: sum(r["retries"].values())
    t_retry_end = min(t_until, t_fault_end + retry_window_s)
    last_retry = w.last_change(t_fault, t_retry_end, retries)
    back = w.first(t_back, t_until, lambda r: r["available"].get(url, 0) == 1)
    answered = None
    before = w.at(t_back)
    if before is not None:
        n0 = before["requests"].get(url, 0)
        answered = w.first(t_back, t_until, lambda r: r["requests"].get(url, 0) > n0)
    return {
        "replica": url,
        "unavailable_after_s": _secs(unavailable - t_fault if unavailable else None),
        "unhealthy_after_s": _secs(unhealthy - t_fault if unhealthy else None),
        "retries_during_outage": w.delta(t_fault, t_retry_end, retries),
        "retries_by_reason": {k: w.delta(t_fault, t_retry_end, lambda r, k=k: r["retries"].get(k, 0))
                              for k in (w.at(t_retry_end) or {"retries": {}})["retries"]},
        "last_retry_after_s": _secs(last_retry - t_fault if last_retry else None),
        "stream_errors_during_outage": w.delta(t_fault, t_fault_end, lambda r: r["stream_errors"]),
        "outage_s": round(t_fault_end - t_fault, 1),
        "process_restart_s": _secs(restart_s),
        "available_again_after_s": _secs(back - t_back if back else None),
        "first_answer_after_s": _secs(answered - t_back if answered else None),
    }


def _share(w: Watcher, url: str, t0: float, t1: float) -> float | None:
    a, b = w.at(t0), w.at(t1)
    if not a or not b:
        return None
    total = sum(b["requests"].values()) - sum(a["requests"].values())
    mine = b["requests"].get(url, 0) - a["requests"].get(url, 0)
    return round(mine / total, 3) if total else None


def _slow(w: Watcher, url: str, t0: float, t1: float, t2: float, results) -> dict:
    during = [r for r in results if t0 <= r.started < t1 and r.replica == url and r.first_byte_s is not None]
    others = [r for r in results if t0 <= r.started < t1 and r.replica != url and r.first_byte_s is not None]
    return {"replica": url, "share_before": _share(w, url, max(t0 - 15, w.rows[0]["t"]), t0),
            "share_during": _share(w, url, t0, t1), "share_after": _share(w, url, t1, t2),
            "share_after_by_5s": [_share(w, url, a, min(a + 5, t2)) for a in _steps(t1, t2, 5.0)],
            "ttft_ms_p50_on_slow_replica": round(percentile([r.first_byte_s * 1e3 for r in during], 0.5), 1)
            if during else None,
            "ttft_ms_p50_elsewhere": round(percentile([r.first_byte_s * 1e3 for r in others], 0.5), 1)
            if others else None,
            "stream_errors_during": w.delta(t0, t1, lambda r: r["stream_errors"]),
            "retries_during": w.delta(t0, t1, lambda r: sum(r["retries"].values()))}


def _steps(t0: float, t1: float, step: float) -> list[float]:
    out, t = [], t0
    while t + 1.0 < t1:
        out.append(t)
        t += step
    return out


def _flap(w: Watcher, url: str, t0: float, t1: float, t2: float) -> dict:
    transitions = 0
    prev = None
    for row in w.rows:
        if t0 <= row["t"] <= t1:
            v = row["available"].get(url)
            if prev is not None and v != prev:
                transitions += 1
            prev = v
    back = w.first(t1, t2, lambda r: r["available"].get(url, 0) == 1)
    return {"replica": url, "availability_transitions_seen": transitions,
            "retries_during": w.delta(t0, t1, lambda r: sum(r["retries"].values())),
            "stream_errors_during": w.delta(t0, t1, lambda r: r["stream_errors"]),
            "share_during": _share(w, url, t0, t1),
            "available_after_reset_s": _secs(back - t1 if back else None)}


def _outcomes_by_phase(results, t_start: float, phases: dict, t_end: float) -> dict:
    marks = [("warm-up", t_start)]
    for name in ("kill", "hang", "slow", "flap"):
        if name in phases:
            marks.append((name, phases[name]["_t0"]))
    marks.sort(key=lambda x: x[1])
    out = {}
    for i, (name, t0) in enumerate(marks):
        t1 = marks[i + 1][1] if i + 1 < len(marks) else t_end
        out[name] = _count([r for r in results if t0 <= r.started < t1])
    for p in phases.values():
        p.pop("_t0", None)
    return out


def build_checks(r: dict) -> list[dict]:
    o = r["outcomes"]
    k, h, f = r["phases"]["kill"], r["phases"]["hang"], r["phases"]["flap"]
    s = r["phases"]["slow"]
    return [
        check("requests lost before their first byte", f"{o[REFUSED]} of {r['requests']:,}", "0", o[REFUSED] == 0),
        check("streams broken after the first byte without an error event",
              f"{o[TRUNCATED]}", "0", o[TRUNCATED] == 0),
        check("requests hanging (no byte for first_byte_s + 15 s)", f"{o[HUNG]}", "0", o[HUNG] == 0),
        check("streams ended by an error event (allowed; of them, before any content)",
              f"{o[ERROR_EVENT]} ({r['error_events_before_any_content']} before any content)", "reported", True),
        check("kill: time until the dead replica is unavailable",
              f"{k['unavailable_after_s']} s (unhealthy after {k['unhealthy_after_s']} s; last retry caused by it "
              f"{k['last_retry_after_s']} s after the kill; {k['retries_during_outage']:g} retries)",
              "evicted within 10 s", k["unavailable_after_s"] is not None and k["unavailable_after_s"] <= 10),
        check("kill: time from restart until routed to again",
              f"available after {k['available_again_after_s']} s, first answer after {k['first_answer_after_s']} s",
              "within 10 s", k["first_answer_after_s"] is not None and k["first_answer_after_s"] <= 10),
        check("hang: time until the hung replica is unavailable",
              f"{h['unavailable_after_s']} s ({h['retries_during_outage']:g} retries: {h['retries_by_reason']}; "
              f"{h['requests_waiting_over_first_byte_s']} requests waited first_byte_s before their retry, "
              f"slowest first byte {h['slowest_first_byte_s']} s)",
              "within 10 s", h["unavailable_after_s"] is not None and h["unavailable_after_s"] <= 10),
        check("hang: time from reset until routed to again",
              f"available after {h['available_again_after_s']} s, first answer after {h['first_answer_after_s']} s",
              "within 10 s", h["first_answer_after_s"] is not None and h["first_answer_after_s"] <= 10),
        check("slow: traffic moves away from the slow replica",
              f"share {s['share_before']} before, {s['share_during']} during, {s['share_after']} after the reset "
              f"(by 5 s: {s['share_after_by_5s']})",
              "share during < before",
              s["share_before"] is not None and s["share_during"] is not None
              and s["share_during"] < s["share_before"]),
        check("flap: seen going up and down; back after reset",
              f"{f['availability_transitions_seen']} availability changes, {f['retries_during']:g} retries, "
              f"{f['stream_errors_during']:g} stream errors; available {f['available_after_reset_s']} s after reset",
              "reported", True),
        check("in-flight at the end", f"{r['balancer_totals']['inflight_at_end']:g}", "0",
              r["balancer_totals"]["inflight_at_end"] == 0),
    ]


def to_markdown(report: dict) -> str:
    s = report["setup"]
    lines = header_md("reliability: faults", report)
    lines += [f"4 emulated replicas ({s['profile']}, {s['time_scale']:g}x; one process each) behind `prefixlb serve` "
              f"(defaults, `timeouts.first_byte_s: {s['first_byte_s']:g}`); open-loop streaming chat at "
              f"{s['rate_rps_wall']:g} req/s (wall), ~{s['prompt_tokens']}-token prompts, {s['max_tokens']} output "
              f"tokens; {report['requests']:,} requests. Faults one at a time: {', '.join(s['faults'].values())}.", ""]
    lines += checks_md(report["checks"])
    lines += ["", "Outcomes by phase (by the time a request was sent):", "",
              "| phase | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for name, c in report["outcomes_by_phase"].items():
        lines.append(f"| {name} | " + " | ".join(str(c.get(k, 0)) for k in KINDS) + " |")
    lines += ["", "| fault | unavailable after | last retry caused | retries | stream errors | back after | "
              "first answer after |", "|---|---|---|---|---|---|---|"]
    for name in ("kill", "hang"):
        p = report["phases"][name]
        lines.append(f"| {name} | {p['unavailable_after_s']} s | {p['last_retry_after_s']} s | "
                     f"{p['retries_during_outage']:g} | {p['stream_errors_during_outage']:g} | "
                     f"{p['available_again_after_s']} s | {p['first_answer_after_s']} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter phases (~80 s)")
    ap.add_argument("--rate", type=float, default=None, help="requests per wall second (default 12; --quick 8)")
    ap.add_argument("--time-scale", type=float, default=2.0)
    ap.add_argument("--profile", default="h100-llama3-8b")
    ap.add_argument("--prompt-tokens", type=int, default=400, help="shared system prompt tokens (+100 unique)")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--first-byte-s", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.rate = args.rate or (8.0 if args.quick else 12.0)
    args.duration_cap = 150 if args.quick else 400  # the load stops earlier, when the phases are done
    report = asyncio.run(run(args))
    report.update({"benchmark": "reliability_faults", "machine": machine(), "command": command_line("faults.py")})
    report["checks"] = build_checks(report)
    report["ok"] = all(c["ok"] for c in report["checks"])
    write_report("faults", report, to_markdown(report), args.out, args.quick)
    print(to_markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
