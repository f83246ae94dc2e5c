"""bench_overhead: what a whole balancer adds to a request, prefixlb against the peer routers.

One fake replica answering in ~0 ms (its own process) behind each target (each its own
process), the same closed-loop client (bench_proxy_core's: keep-alive, our upstream pool as
the client so the client is cheap), rounds interleaved with the order rotated, medians over
rounds, "added" = target minus ``direct`` in the same round:

- ``direct``: the client talks to the replica;
- ``prefixlb``: ``prefixlb serve --replica URL --policy cache_aware`` (the full request path:
  JSON parse, prompt key, hash + match + cost model, proxy, metrics, feedback);
- ``prefixlb-rr``: the same with ``--policy round_robin``;
- ``prefixlb-w2``: ``prefixlb`` with ``--workers 2`` (two processes on one port, SO_REUSEPORT,
  peer sync between them), as the Rust routers use both cores;
- ``sglang-router``: ``sglang_router.launch_router --policy cache_aware`` (0.3.2);
- ``vllm-router``: ``vllm-router --policy round_robin`` (0.1.17; its cache_aware adds one
  render call per worker per request, see ../shared/peers.md, so round_robin is its fastest).

Workloads: a small chat request (~110 B in, ~440 B out) and the same with ``"stream": true``
(20 SSE events: the first, then 1 ms later the other 19), at concurrency 1 and 32. Proxy CPU
per request is the target process's CPU time over the c=32 phase divided by its requests.

Usage:
  python benchmarks/bench_overhead.py [--rounds 3] [--quick] [--json OUT] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_proxy_core as core  # noqa: E402
from targets import Target, start_target  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BODY = core.CHAT_BODY
STREAM_BODY = BODY[:-1] + b',"stream":true}'
MODEL = b"llama-3.1-8b"


async def role_replica() -> None:
    """The fake replica, answering what the balancers and peer routers probe as well."""
    from prefixlb.server.http import HTTPServer, Limits, Request

    jh = [(b"content-type", b"application/json")]
    sse = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    models = b'{"object":"list","data":[{"id":"llama-3.1-8b","object":"model","owned_by":"vllm"}]}'
    info = b'{"model_path":"llama-3.1-8b","tokenizer_path":"llama-3.1-8b","is_generation":true}'

    async def handle(req: Request) -> None:
        p = req.path
        if p in ("/v1/chat/completions", "/v1/completions"):
            if b'"stream":true' in req.body:
                s = req.start(200, sse)
                await s.write(core.SSE_EVENTS[0])
                await asyncio.sleep(core.FIRST_EVENT_GAP_S)
                for e in core.SSE_EVENTS[1:-1]:
                    await s.write(e)
                await s.end(core.SSE_EVENTS[-1])
            else:
                req.respond(200, jh, core.CHAT_ANSWER)
        elif p == "/v1/models":
            req.respond(200, jh, models)
        elif p in ("/model_info", "/get_model_info", "/server_info", "/get_server_info"):
            req.respond(200, jh, info)
        elif p in ("/health", "/health_generate", "/ping"):
            req.respond(200, jh, b"{}")
        elif p == "/metrics":
            req.respond(200, [(b"content-type", b"text/plain")], b"")
        elif p.endswith("/render") or p == "/tokenize":
            req.respond(200, jh, b'{"token_ids":[1,2,3],"tokens":[1,2,3],"count":3}')
        else:
            req.respond(404, jh, b'{"error":{"message":"not found","type":"NotFoundError","code":404}}')

    server = HTTPServer(handle, limits=Limits())
    await server.serve("127.0.0.1", 0)
    await core._ready_and_wait(server.port)  # noqa: SLF001


def start_replica() -> tuple[subprocess.Popen, str]:
    """The fake replica in its own process, and its URL (stop it by closing its stdin)."""
    p = subprocess.Popen([sys.executable, __file__, "--role", "replica"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()  # type: ignore[union-attr]
    if not line.startswith("READY"):
        p.kill()
        raise RuntimeError(f"replica did not start: {line!r}")
    return p, f"http://127.0.0.1:{int(line.split()[1])}"


def start_targets(replica: str, wanted: list[str]) -> tuple[dict[str, Target], dict[str, str]]:
    probe = ("/v1/chat/completions", BODY)
    how = {"prefixlb": ("prefixlb", "cache_aware"), "prefixlb-rr": ("round_robin", "cache_aware"),
           "prefixlb-w2": ("prefixlb", "cache_aware"),
           "sglang-router": ("sglang-router", "cache_aware"), "vllm-router": ("vllm-router", "round_robin")}
    targets: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    for name in wanted:
        kind, peer_policy = how[name]
        try:
            extra = ["--workers", "2"] if name == "prefixlb-w2" else None
            targets[name] = start_target(kind, [replica], probe=probe, peer_policy=peer_policy, extra=extra)
        except RuntimeError as exc:
            skipped[name] = str(exc)
    return targets, skipped


async def one_round(urls: dict[str, str], targets: dict[str, Target], order: list[str], cfg: dict) -> dict:
    from prefixlb.server.http import UpstreamPool

    res: dict[str, dict] = {}
    for name in order:
        pool = UpstreamPool(urls[name], max_idle=64, idle_timeout=60)
        r: dict[str, dict] = {}
        for wl, body, stream, conc, n in (
            ("chat_c1", BODY, False, 1, cfg["c1"]),
            ("stream_c1", STREAM_BODY, True, 1, cfg["s1"]),
            ("chat_c32", BODY, False, 32, cfg["c32"]),
            ("stream_c32", STREAM_BODY, True, 32, cfg["s32"]),
        ):
            core.CHAT_BODY = body  # load() sends core.CHAT_BODY
            await core.load(pool, "/v1/chat/completions", cfg["warmup"], conc, stream)
            t = targets.get(name)
            cpu0 = t.cpu_ns() if t else 0
            r[wl] = await core.load(pool, "/v1/chat/completions", n, conc, stream)
            if t:
                r[wl]["cpu_us_per_req"] = (t.cpu_ns() - cpu0) / 1e3 / n
        core.CHAT_BODY = BODY
        await pool.close()
        res[name] = r
    return res


def summarize(rounds: list[dict], names: list[str]) -> dict:
    med = statistics.median
    out: dict[str, dict] = {}
    for t in names:
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


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = ["## bench_overhead: what a balancer adds to a request (same fake replica, same client)", "",
             f"`{result['command']}` — {result['date']}, {result['machine']}, {result['rounds']} interleaved rounds "
             f"(medians); versions: {result['versions']}", ""]
    if result.get("targets_check"):
        lines += ["| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['ok'] else '**no**'} |" for t in result["targets_check"]]
        lines.append("")
    lines += ["| target | added p50 ms (c=1) | added p99 ms (c=1) | added stream TTFT ms (c=1) | req/s chat c=32 | "
              "req/s stream c=32 | CPU µs/req chat | CPU µs/req stream |", "|---|---|---|---|---|---|---|---|"]
    d = s["direct"]
    lines.append(f"| direct | p50 {d['chat_c1_p50']:.3f} | p99 {d['chat_c1_p99']:.3f} | TTFT {d['stream_c1_ttft_p50']:.3f} | "
                 f"{d['chat_c32_rps']:.0f} | {d['stream_c32_rps']:.0f} | – | – |")
    for name, v in s.items():
        if name == "direct":
            continue
        lines.append(f"| {name} | +{v['chat_c1_p50_added']:.3f} | +{v['chat_c1_p99_added']:.3f} | "
                     f"+{v['stream_c1_ttft_p50_added']:.3f} | {v['chat_c32_rps']:.0f} | {v['stream_c32_rps']:.0f} | "
                     f"{v['chat_c32_cpu_us_per_req']:.0f} | {v['stream_c32_cpu_us_per_req']:.0f} |")
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["replica"], help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--targets", default="prefixlb,prefixlb-rr,prefixlb-w2,sglang-router,vllm-router")
    ap.add_argument("--json", type=Path, default=RESULTS / "bench_overhead.json")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "bench_overhead.md")
    args = ap.parse_args(argv)
    if args.role == "replica":
        import uvloop

        uvloop.run(role_replica())
        return 0
    cfg = dict(core.QUICK if args.quick else core.FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    replica, rurl = start_replica()
    targets, skipped = start_targets(rurl, args.targets.split(","))
    try:
        urls = {"direct": rurl, **{n: t.url for n, t in targets.items()}}
        names = list(urls)
        rounds = []
        for i in range(cfg["rounds"]):
            order = names[i % len(names):] + names[: i % len(names)]
            rounds.append(asyncio.run(one_round(urls, targets, order, cfg)))
            print(f"round {i + 1}/{cfg['rounds']} done", file=sys.stderr)
    finally:
        for t in targets.values():
            t.stop()
        replica.stdin.close()  # type: ignore[union-attr]
        replica.wait(5)
    summary = summarize(rounds, names)
    checks = []
    if "prefixlb" in summary:
        p = summary["prefixlb"]
        checks += [
            {"target": "prefixlb added p50 <= 0.25 ms (chat, c=1)", "value": f"{p['chat_c1_p50_added']:.3f} ms",
             "ok": p["chat_c1_p50_added"] <= 0.25},
            {"target": "prefixlb added p99 <= 1 ms (chat, c=1)", "value": f"{p['chat_c1_p99_added']:.3f} ms",
             "ok": p["chat_c1_p99_added"] <= 1.0},
        ]
        if "sglang-router" in summary:
            g = summary["sglang-router"]
            for wl in ("chat_c32", "stream_c32"):
                checks.append({"target": f"prefixlb throughput >= sglang-router ({wl})",
                               "value": f"{p[wl + '_rps']:.0f} vs {g[wl + '_rps']:.0f} req/s",
                               "ok": p[wl + "_rps"] >= g[wl + "_rps"]})
    result = {"benchmark": "bench_overhead", "command": " ".join(["python"] + sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": core.machine(),
              "versions": _versions(), "rounds": cfg["rounds"], "summary": summary, "skipped": skipped,
              "targets_check": checks, "raw": rounds}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    args.markdown.write_text(md)
    print(md)
    return 0 if all(c["ok"] for c in checks) else 1


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("prefixlb", "sglang-router", "vllm-router"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
