"""What the reliability programs share: processes started in their own group and stopped by it,
``/metrics`` parsing, ``/proc`` sampling, a streaming client that classifies how each request
ended, a bounded open-loop driver, and the JSON + Markdown result files.

Nothing here kills a process it did not start: every process is a :class:`Proc` (or an
emulator :class:`~prefixlb.emulator.fleet.FleetProcess`) created by the caller, and stopping
one signals its own process group only.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from prefixlb.sim.run import machine as sim_machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable

__all__ = [
    "ERROR_EVENT", "HUNG", "OK", "REFUSED", "RESULTS", "TRUNCATED", "Balancer", "Metrics", "Proc", "StreamResult",
    "chat_body", "check", "checks_md", "command_line", "cpu_seconds", "fd_count", "git_state", "header_md",
    "linear_growth", "machine", "open_loop", "percentile", "raise_nofile", "rss_kib", "scrape", "start_balancer",
    "start_emulators", "stream_request", "summary", "write_report",
]


# -- the machine and the run ----------------------------------------------------------------------------


def machine() -> dict:
    """Every benchmark's record of where it ran (prefixlb.sim.run.machine), plus the commit and
    whether the working tree had changes."""
    return {**sim_machine(), **git_state()}


def git_state() -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "working_tree_modified": bool(dirty)}


def command_line(script: str) -> str:
    return " ".join(["python", f"benchmarks/reliability/{script}", *sys.argv[1:]])


def write_report(name: str, report: dict, markdown: str, out: Path | None, quick: bool) -> tuple[Path, Path]:
    """``reliability_<name>[_quick].{json,md}`` in ``out`` (default benchmarks/results)."""
    out = RESULTS if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    stem = f"reliability_{name}" + ("_quick" if quick else "")
    jp, mp = out / f"{stem}.json", out / f"{stem}.md"
    jp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    mp.write_text(markdown)
    return jp, mp


def header_md(title: str, report: dict) -> list[str]:
    m = report["machine"]
    tree = f", commit {m.get('commit', '?')}" + (" + local changes" if m.get("working_tree_modified") else "")
    return [f"## {title}", "",
            f"`{report['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
            f"prefixlb {m['prefixlb']}{tree}", ""]


def checks_md(checks: list[dict]) -> list[str]:
    lines = ["| check | measured | goal | met |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['check']} | {c['value']} | {c['goal']} | {'yes' if c['ok'] else '**no**'} |")
    return lines


def check(name: str, value: Any, goal: str, ok: bool) -> dict:
    return {"check": name, "value": value, "goal": goal, "ok": bool(ok)}


# -- processes ------------------------------------------------------------------------------------------


def raise_nofile(want: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit toward ``want`` (never above the hard limit);
    returns the soft limit now in force. Children started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class Proc:
    """A child process in its own session (so its own process group), stopped by that group."""

    def __init__(self, name: str, argv: list[str], *, log_path: Path | None = None,
                 env: dict | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path is not None else None
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=self._log if self._log is not None else subprocess.DEVNULL,
                                  start_new_session=True, env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def readline(self, timeout: float) -> str | None:
        """One stdout line within ``timeout`` seconds (None on timeout or EOF)."""
        import select

        assert self.p.stdout is not None
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.p.stdout.readline()
        return line.decode(errors="replace") if line else None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.p.pid, sig)  # the group this Proc created (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, wait, then SIGKILL it; the exit code."""
        if self.p.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.p.wait(5)
        if self.p.stdout is not None:
            self.p.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.p.returncode

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Balancer(Proc):
    """``prefixlb serve`` as a process: its URL, its config file, its pid for /proc sampling."""

    url: str
    config_path: str | None = None

    def stop(self, timeout: float = 15.0) -> int | None:
        rc = super().stop(timeout)
        if self.config_path:
            try:
                os.unlink(self.config_path)
            except OSError:
                pass
        return rc


def write_config(doc: dict) -> str:
    fd, path = tempfile.mkstemp(prefix="prefixlb-reliability-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f)
    return path


def start_balancer(config: dict, *, args: Iterable[str] = (), env: dict | None = None,
                   log_path: Path | None = None, startup_s: float = 60.0, want_healthy: int = 1) -> Balancer:
    """``prefixlb serve --config FILE`` (the file written from ``config``; listen port 0), waited
    for until it prints its address and ``/health`` reports ``want_healthy`` available replicas."""
    config = {**config, "listen": {"host": "127.0.0.1", "port": 0, **config.get("listen", {})}}
    path = write_config(config)
    argv = [PY, "-m", "prefixlb", "serve", "--config", path, *args]
    b = Balancer.__new__(Balancer)
    Proc.__init__(b, "prefixlb", argv, log_path=log_path, env=env)
    b.config_path = path
    deadline = time.monotonic() + startup_s
    url = None
    try:
        while time.monotonic() < deadline and url is None:
            line = b.readline(max(0.1, deadline - time.monotonic()))
            if line is None:
                if not b.alive():
                    break
                continue
            m = re.search(r"listening on (https?://\S+)", line)
            if m:
                url = m.group(1)
        if url is None:
            raise RuntimeError(f"prefixlb serve did not start: {' '.join(argv)} (log: {log_path})")
        b.url = url
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if orjson.loads(r.read()).get("available_replicas", 0) >= want_healthy:
                        return b
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prefixlb serve never reported {want_healthy} available replicas (log: {log_path})")
    except BaseException:
        b.stop()
        raise


def start_emulators(n: int, *, separate: bool = False, log_path: Path | None = None, base_port: int = 0,
                    **options: Any) -> list:
    """``prefixlb emulate`` processes (each in its own process group): one process with ``n``
    replicas, or ``n`` processes with one replica each (``separate``, so one can be killed)."""
    from prefixlb.emulator.fleet import start_fleet_process

    log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        if not separate:
            return [start_fleet_process(n, stderr=log, startup_timeout=90, base_port=base_port, **options)]
        procs = []
        try:
            for i in range(n):
                procs.append(start_fleet_process(1, stderr=log, startup_timeout=90,
                                                 base_port=base_port + i if base_port else 0,
                                                 index_offset=i, **options))
        except BaseException:
            for p in procs:
                p.stop()
            raise
        return procs
    finally:
        if log is not subprocess.DEVNULL:
            log.close()  # the children hold their own descriptor


# -- /proc ----------------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# -- /metrics -------------------------------------------------------------------------------------------


class Metrics:
    """One scrape: ``{sample name: [(labels, value), ...]}``."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, list[tuple[dict, float]]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                self.samples.setdefault(s.name, []).append((s.labels, s.value))

    def sum(self, name: str, **labels: str) -> float:
        return sum(v for lab, v in self.samples.get(name, ()) if all(lab.get(k) == x for k, x in labels.items()))

    def by(self, name: str, key: str, **labels: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for lab, v in self.samples.get(name, ()):
            if all(lab.get(k) == x for k, x in labels.items()):
                out[lab.get(key, "")] = out.get(lab.get(key, ""), 0.0) + v
        return out


async def scrape(session: aiohttp.ClientSession, base: str, timeout: float = 5.0) -> Metrics:
    async with session.get(base + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return Metrics(await r.text())


# -- a streaming request, classified ----------------------------------------------------------------------

#: how a request ended, from the client's side
OK = "ok"  # 200, events, data: [DONE], no error event
REFUSED = "refused_before_first_byte"  # non-200 status or no response at all: lost before any byte
ERROR_EVENT = "error_event_after_first_byte"  # 200, then an error event and data: [DONE]
TRUNCATED = "truncated"  # 200, bytes, then EOF/reset without an error event or [DONE]
HUNG = "hung"  # no byte for idle_timeout seconds (or the total timeout ran out)


@dataclass(slots=True)
class StreamResult:
    kind: str
    status: int = 0
    started: float = 0.0  # time.monotonic() when sent
    first_byte_s: float | None = None  # first body byte
    elapsed: float = 0.0
    content_events: int = 0  # data events before an error event (0: the error was the first event)
    replica: str = ""
    error: str = ""


async def stream_request(session: aiohttp.ClientSession, url: str, body: bytes, *, idle_timeout: float,
                         total_timeout: float, headers: dict | None = None) -> StreamResult:
    """POST a streaming request and classify how it ended (see the kinds above). ``idle_timeout``
    bounds the wait for each read (a hang), ``total_timeout`` the whole request."""
    t0 = time.monotonic()
    res = StreamResult(HUNG, started=t0)
    timeout = aiohttp.ClientTimeout(total=total_timeout, sock_read=idle_timeout, sock_connect=idle_timeout)
    got = False
    buf = b""
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json", **(headers or {})},
                                timeout=timeout) as r:
            res.status = r.status
            res.replica = r.headers.get("x-prefixlb-replica", "")
            if r.status != 200:
                res.kind = REFUSED
                res.error = (await r.text())[:300]
                return res
            async for chunk in r.content.iter_any():
                if not got:
                    got = True
                    res.first_byte_s = time.monotonic() - t0
                buf += chunk
                # count whole events as they arrive; keep the unfinished tail
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    ev = ev.strip()
                    if not ev.startswith(b"data:"):
                        continue
                    data = ev[5:].strip()
                    if data == b"[DONE]":
                        if res.kind != ERROR_EVENT:
                            res.kind = OK
                    elif data.startswith(b'{"error"'):
                        res.kind = ERROR_EVENT
                        res.error = data[:300].decode(errors="replace")
                    elif res.kind != ERROR_EVENT:
                        res.content_events += 1
            if res.kind not in (OK, ERROR_EVENT):
                res.kind = TRUNCATED
                res.error = "the stream ended without data: [DONE]"
    except asyncio.TimeoutError as exc:
        res.kind = HUNG
        res.error = f"no byte for {idle_timeout:g} s or over {total_timeout:g} s: {type(exc).__name__}"
    except aiohttp.ClientPayloadError as exc:
        res.kind = TRUNCATED if got else REFUSED
        res.error = f"{type(exc).__name__}: {exc}"
    except aiohttp.ClientError as exc:
        res.kind = TRUNCATED if got else REFUSED
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        res.elapsed = time.monotonic() - t0
    return res


# -- a bounded open-loop driver ----------------------------------------------------------------------------


async def open_loop(fire: Callable[[int], Awaitable[None]], rate: float | Callable[[float], float], *,
                    max_requests: int, duration_s: float, seed: int = 0, max_inflight: int = 2000,
                    drain_s: float = 120.0, stop: asyncio.Event | None = None) -> dict:
    """Call ``fire(i)`` at Poisson arrival times (``rate`` per wall second, or a function of the
    elapsed seconds), at most ``max_requests`` times and for at most ``duration_s`` seconds, then
    wait up to ``drain_s`` for the requests in flight. Arrivals that would exceed
    ``max_inflight`` are counted as ``skipped`` (never silently queued). Setting ``stop`` ends
    the sending early."""
    rng = random.Random(seed)
    tasks: set[asyncio.Task] = set()
    start = time.monotonic()
    t = 0.0
    sent = skipped = 0
    while sent + skipped < max_requests:
        r = rate(t) if callable(rate) else rate
        t += rng.expovariate(r) if r > 0 else 0.1
        if t >= duration_s:
            break
        delay = start + t - time.monotonic()
        if delay > 0:
            if stop is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        if stop is not None and stop.is_set():
            break
        if len(tasks) >= max_inflight:
            skipped += 1
            continue
        task = asyncio.ensure_future(fire(sent))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    sent_done = time.monotonic() - start
    left = list(tasks)
    if left:
        await asyncio.wait(left, timeout=drain_s)
    still = [t for t in left if not t.done()]
    for task in still:
        task.cancel()
    if still:
        await asyncio.wait(still, timeout=5)
    return {"sent": sent, "skipped": skipped, "send_seconds": round(sent_done, 2),
            "abandoned_after_drain": len(still)}


# -- statistics ---------------------------------------------------------------------------------------------


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def summary(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "min": min(xs), "p50": percentile(xs, 0.5), "mean": sum(xs) / len(xs),
            "p99": percentile(xs, 0.99), "max": max(xs)}


def linear_growth(ts: list[float], ys: list[float]) -> dict:
    """Least-squares line through (t, y): its value at the first and last t, the growth between
    them in percent of the start value, the slope per hour, and the standard error of the
    change (start to end) the line predicts, from its residuals."""
    n = len(ts)
    if n < 3:
        return {"start": ys[0] if ys else None, "end": ys[-1] if ys else None, "growth_pct": 0.0, "slope_per_h": 0.0,
                "change_se": None}
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else 0.0
    a = my + slope * (ts[0] - mt)
    b = my + slope * (ts[-1] - mt)
    resid = sum((y - (my + slope * (t - mt))) ** 2 for t, y in zip(ts, ys)) / (n - 2)
    se_slope = math.sqrt(resid / var) if var else 0.0
    growth = (b - a) / abs(a) * 100 if a else (0.0 if b == a else math.inf)
    return {"start": round(a, 3), "end": round(b, 3), "growth_pct": round(growth, 3),
            "slope_per_h": round(slope * 3600, 3), "change_se": round(se_slope * (ts[-1] - ts[0]), 3)}


def chat_body(content: str, *, max_tokens: int, model: str = "auto", stream: bool = True, **extra: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream, **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)

