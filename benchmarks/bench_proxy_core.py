"""bench_proxy_core: what one proxy hop built on prefixlb.server.http costs, against aiohttp.

Three ways to reach one fake replica that answers in ~0 ms (its own process):

- ``direct``: the client talks to the replica;
- ``core``: a pass-through proxy made of ``HTTPServer`` + ``UpstreamPool`` + ``relay`` (its
  own process; no routing, no JSON parsing: the cost of the HTTP machinery alone);
- ``aiohttp``: the same proxy with a bare ``aiohttp.web.Server`` and one ``ClientSession``.

Workloads, closed loop on loopback, keep-alive connections reused after a warm-up: a small
chat body in (~110 B) and ~440 B JSON out; a 20-event SSE stream (chunked; the first event,
then 1 ms later the other 19 back to back, so TTFT is the first event's latency and the
stream's total includes that 1 ms on every target alike). At concurrency 1 and 32. Rounds are interleaved (every target in every round, the order rotated), and each
number reported is the median over rounds; "added" is the target minus ``direct`` in the same
round. Proxy CPU per request is the proxy process's CPU time (``/proc/<pid>/task/*/schedstat``,
ns) over the c=32 phase, divided by the requests served in it.

Usage:
  python benchmarks/bench_proxy_core.py            # 3 rounds (about 1-2 minutes here)
  python benchmarks/bench_proxy_core.py --quick    # tiny smoke run (a few seconds)
  python benchmarks/bench_proxy_core.py --rounds 5 --json OUT.json --markdown OUT.md
  python benchmarks/bench_proxy_core.py --versions
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("direct", "core", "aiohttp")

CHAT_BODY = (
    b'{"model":"llama-3.1-8b","messages":[{"role":"user","content":"Hello! Tell me a very short story."}],'
    b'"max_tokens":32}'
)
CHAT_ANSWER = (
    b'{"id":"chatcmpl-0123456789abcdef","object":"chat.completion","created":1764201600,'
    b'"model":"llama-3.1-8b","choices":[{"index":0,"message":{"role":"assistant","content":'
    b'"Once upon a time, a small robot learned to route requests to the replica that already '
    b'remembered the story so far. It was fast."},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":21,"total_tokens":53,"completion_tokens":32,'
    b'"prompt_tokens_details":{"cached_tokens":16}},"system_fingerprint":null}'
)
SSE_EVENT = (
    b'data: {"id":"chatcmpl-0123456789abcdef","object":"chat.completion.chunk","created":1764201600,'
    b'"model":"llama-3.1-8b","choices":[{"index":0,"delta":{"content":" tok"},"finish_reason":null}]}\n\n'
)
SSE_EVENTS = [SSE_EVENT] * 19 + [b"data: [DONE]\n\n"]
FIRST_EVENT_GAP_S = 0.001  # the rest of the stream follows the first event after this

QUICK = {"rounds": 1, "c1": 60, "c32": 400, "s1": 30, "s32": 200, "warmup": 40}
FULL = {"rounds": 3, "c1": 1500, "c32": 6000, "s1": 300, "s32": 1500, "warmup": 300}


# -- roles run in their own processes --------------------------------------------------------


async def role_upstream() -> None:
    from prefixlb.server.http import HTTPServer, Limits, Request

    json_headers = [(b"content-type", b"application/json")]
    sse_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

    async def handle(req: Request) -> None:
        if req.path == "/v1/chat/completions/stream":
            s = req.start(200, sse_headers)
            await s.write(SSE_EVENTS[0])
            # A replica sends the first token after prefill and the rest at each decode step.
            # Without a pause the 20 writes form one burst, the proxy is scheduled only after
            # it, and "TTFT" would measure the burst instead of the hop.
            await asyncio.sleep(FIRST_EVENT_GAP_S)
            for e in SSE_EVENTS[1:-1]:
                await s.write(e)
            await s.end(SSE_EVENTS[-1])
        else:
            req.respond(200, json_headers, CHAT_ANSWER)

    server = HTTPServer(handle, limits=Limits())
    await server.serve("127.0.0.1", 0)
    await _ready_and_wait(server.port)


async def role_core(upstream: str) -> None:
    from prefixlb.server.http import HTTPServer, Limits, Request, UpstreamPool, relay

    pool = UpstreamPool(upstream, max_idle=128)

    async def handle(req: Request) -> None:
        resp = await pool.request(req.method, req.target, req.headers, req.body, timeout_first_byte=30, read_timeout=30)
        await relay(req, resp)

    server = HTTPServer(handle, limits=Limits())
    await server.serve("127.0.0.1", 0)
    await _ready_and_wait(server.port)


async def role_aiohttp(upstream: str) -> None:
    import aiohttp
    from aiohttp import web

    hop = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade", "host"}
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60), auto_decompress=False)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        async with session.request(request.method, upstream + request.path_qs, data=body, headers=headers) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in hop}
            if up.content_length is not None:
                return web.Response(status=up.status, headers=out, body=await up.read())
            resp = web.StreamResponse(status=up.status, headers=out)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    runner = web.ServerRunner(web.Server(handle), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        await _ready_and_wait(port)
    finally:
        await runner.cleanup()
        await session.close()


async def _ready_and_wait(port: int) -> None:
    print(f"READY {port}", flush=True)
    loop = asyncio.get_running_loop()
    # Runs until the parent closes our stdin (or terminates us).
    await loop.run_in_executor(None, sys.stdin.read)


def run_role(role: str, upstream: str | None) -> None:
    import uvloop

    coro = {"upstream": role_upstream, "core": role_core, "aiohttp": role_aiohttp}[role]
    uvloop.run(coro(upstream) if upstream else coro())  # type: ignore[operator]


# -- the parent: processes, load, numbers ----------------------------------------------------


class Proc:
    def __init__(self, role: str, upstream: str | None = None) -> None:
        args = [sys.executable, __file__, "--role", role] + (["--upstream", upstream] if upstream else [])
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        line = ""
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()  # type: ignore[union-attr]
            if line.startswith("READY") or not line:
                break
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"{role} process did not start (got {line!r})")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def cpu_ns(self) -> int:
        total = 0
        for task in Path(f"/proc/{self.p.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def stop(self) -> None:
        try:
            self.p.stdin.close()  # type: ignore[union-attr]
            self.p.wait(5)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def load(pool, path: str, n: int, conc: int, stream: bool) -> dict:  # type: ignore[no-untyped-def]
    """Closed loop: ``conc`` workers, ``n`` requests in all; latencies (and TTFTs) in ms."""
    lat: list[float] = []
    ttft: list[float] = []
    left = [n]
    headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer bench")]
    expected = sum(map(len, SSE_EVENTS)) if stream else len(CHAT_ANSWER)

    async def worker() -> None:
        pc = time.perf_counter_ns
        while left[0] > 0:
            left[0] -= 1
            t0 = pc()
            resp = await pool.request("POST", path, headers, CHAT_BODY, timeout_first_byte=10, read_timeout=10)
            got = 0
            first = 0
            while True:
                chunk = await resp.read_chunk()
                if not chunk:
                    break
                if not first:
                    first = pc()
                got += len(chunk)
            t1 = pc()
            await resp.release()
            if resp.status != 200 or got != expected:
                raise RuntimeError(f"bad answer: {resp.status}, {got} bytes (expected {expected})")
            lat.append((t1 - t0) / 1e6)
            ttft.append((first - t0) / 1e6)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - t0
    out = {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "rps": n / wall, "n": n}
    if stream:
        out |= {"ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99)}
    return out


async def one_round(urls: dict[str, str], procs: dict[str, Proc], order: list[str], cfg: dict) -> dict:
    from prefixlb.server.http import UpstreamPool

    res: dict[str, dict] = {}
    for target in order:
        pool = UpstreamPool(urls[target], max_idle=64, idle_timeout=60)
        r: dict[str, dict] = {}
        for name, path, stream, conc, n in (
            ("chat_c1", "/v1/chat/completions", False, 1, cfg["c1"]),
            ("stream_c1", "/v1/chat/completions/stream", True, 1, cfg["s1"]),
            ("chat_c32", "/v1/chat/completions", False, 32, cfg["c32"]),
            ("stream_c32", "/v1/chat/completions/stream", True, 32, cfg["s32"]),
        ):
            await load(pool, path, cfg["warmup"], conc, stream)  # connections opened and warm
            proc = procs.get(target)
            cpu0 = proc.cpu_ns() if proc else 0
            r[name] = await load(pool, path, n, conc, stream)
            if proc:
                r[name]["cpu_us_per_req"] = (proc.cpu_ns() - cpu0) / 1e3 / n
        await pool.close()
        res[target] = r
    return res


def summarize(rounds: list[dict]) -> dict:
    med = statistics.median
    out: dict[str, dict] = {}
    for t in TARGETS:
        s: dict[str, float] = {}
        for wl in ("chat_c1", "chat_c32", "stream_c1", "stream_c32"):
            keys = ["p50", "p99", "rps"] + (["ttft_p50", "ttft_p99"] if wl.startswith("stream") else [])
            for k in keys:
                s[f"{wl}_{k}"] = med(r[t][wl][k] for r in rounds)
                if t != "direct" and k != "rps":
                    s[f"{wl}_{k}_added"] = med(r[t][wl][k] - r["direct"][wl][k] for r in rounds)
            if t != "direct":
                s[f"{wl}_cpu_us_per_req"] = med(r[t][wl]["cpu_us_per_req"] for r in rounds)
        out[t] = s
    return out


def versions() -> dict[str, str]:
    import aiohttp
    import httptools
    import uvloop

    from prefixlb import __version__

    return {
        "python": platform.python_version(),
        "prefixlb": __version__,
        "uvloop": uvloop.__version__,
        "httptools": httptools.__version__,
        "aiohttp": aiohttp.__version__,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def markdown(result: dict, command: str) -> str:
    s = result["summary"]
    d = s["direct"]
    lines = [
        "## bench_proxy_core: one proxy hop, prefixlb.server.http vs aiohttp",
        "",
        (
            f"`{command}` — {result['date']}, {result['machine']}, Python {result['versions']['python']}, "
            f"uvloop {result['versions']['uvloop']}, httptools {result['versions']['httptools']}, "
            f"aiohttp {result['versions']['aiohttp']}; {result['config']['rounds']} interleaved rounds, medians of rounds."
        ),
        "",
        (
            f"Direct (no proxy): chat p50 {d['chat_c1_p50']:.3f} ms, p99 {d['chat_c1_p99']:.3f} ms at c=1; "
            f"stream TTFT p50 {d['stream_c1_ttft_p50']:.3f} ms; {d['chat_c32_rps']:,.0f} req/s at c=32."
        ),
        "",
        (
            "| proxy | added p50 (c=1) | added p99 (c=1) | added p50 (c=32) | added p99 (c=32) "
            "| added stream TTFT p50, reused conn (c=1) | proxy CPU µs/req chat (c=32) "
            "| proxy CPU µs/req stream (c=32) | chat req/s (c=32) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in ("core", "aiohttp"):
        x = s[t]
        lines.append(
            f"| {t} | +{x['chat_c1_p50_added']:.3f} ms | +{x['chat_c1_p99_added']:.3f} ms "
            f"| +{x['chat_c32_p50_added']:.3f} ms | +{x['chat_c32_p99_added']:.3f} ms "
            f"| +{x['stream_c1_ttft_p50_added']:.3f} ms | {x['chat_c32_cpu_us_per_req']:.1f} "
            f"| {x['stream_c32_cpu_us_per_req']:.1f} | {x['chat_c32_rps']:,.0f} |"
        )
    c = s["core"]
    lines += [
        "",
        (
            "Targets for the whole balancer (routing included, later): added p50 <= 0.25 ms, p99 <= 1 ms (c=1). "
            f"This core alone: +{c['chat_c1_p50_added']:.3f} ms / +{c['chat_c1_p99_added']:.3f} ms; "
            "overhead.md's prototype: +0.085 ms, 29 µs CPU/request."
        ),
        "",
        "Per round (ms; c=1 chat p50 / p99, stream TTFT p50):",
        "",
        "| round | " + " | ".join(TARGETS) + " |",
        "|---|" + "---|" * len(TARGETS),
    ]
    for i, r in enumerate(result["rounds"]):
        cells = [
            f"{r[t]['chat_c1']['p50']:.3f} / {r[t]['chat_c1']['p99']:.3f}, {r[t]['stream_c1']['ttft_p50']:.3f}"
            for t in TARGETS
        ]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["upstream", "core", "aiohttp"], help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--json", type=Path, help=f"default: {RESULTS}/bench_proxy_core.json (not with --quick)")
    ap.add_argument("--markdown", type=Path, help=f"default: {RESULTS}/bench_proxy_core.md (not with --quick)")
    ap.add_argument("--versions", action="store_true", help="print the versions measured and exit")
    args = ap.parse_args(argv)
    if args.role:
        run_role(args.role, args.upstream)
        return None
    if args.versions:
        print(json.dumps(versions(), indent=2))
        return None
    cfg = dict(QUICK if args.quick else FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    json_out = args.json or (None if args.quick else RESULTS / "bench_proxy_core.json")
    md_out = args.markdown or (None if args.quick else RESULTS / "bench_proxy_core.md")

    import uvloop

    procs: dict[str, Proc] = {}
    try:
        procs["upstream"] = Proc("upstream")
        procs["core"] = Proc("core", procs["upstream"].url)
        procs["aiohttp"] = Proc("aiohttp", procs["upstream"].url)
        urls = {"direct": procs["upstream"].url, "core": procs["core"].url, "aiohttp": procs["aiohttp"].url}
        rounds = []
        for i in range(cfg["rounds"]):
            order = list(TARGETS[i % 3 :] + TARGETS[: i % 3])
            t0 = time.perf_counter()
            rounds.append(uvloop.run(one_round(urls, procs, order, cfg)))
            print(f"round {i + 1}/{cfg['rounds']} ({', '.join(order)}): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    finally:
        for p in procs.values():
            p.stop()

    command = "python benchmarks/bench_proxy_core.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    result = {
        "benchmark": "bench_proxy_core",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
        "config": cfg,
        "workload": {
            "chat_request_bytes": len(CHAT_BODY),
            "chat_answer_bytes": len(CHAT_ANSWER),
            "sse_events": len(SSE_EVENTS),
            "sse_bytes": sum(map(len, SSE_EVENTS)),
        },
        "rounds": rounds,
        "summary": summarize(rounds),
    }
    md = markdown(result, command)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n")
    if md_out:
        md_out.parent.mkdir(parents=True, exist_ok=True)
        md_out.write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
