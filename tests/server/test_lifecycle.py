"""Lifecycle of ``prefixlb serve`` as a process: SIGHUP reloads the config file without dropping a
connection, SIGTERM drains in-flight requests, JSON logs carry request ids, TLS serves HTTPS."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from .support import FakeReplica

AUTH = {"authorization": "Bearer lifecycle-token"}


async def start(cfg: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "prefixlb", "serve", "--config", str(cfg), "--port", "0",
                             "--admin-token", "lifecycle-token", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
    m = re.search(r"listening on (https?://\S+)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"did not start: {line!r} {proc.stderr.read()}")
    return proc, m.group(1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def write(cfg: Path, urls: list[str], **top) -> None:
    cfg.write_text(yaml.safe_dump({"tiers": [{"name": "small", "replicas": urls}],
                                   "health": {"interval_s": 0.2}, **top}))


async def replicas(s: aiohttp.ClientSession, base: str) -> set[str]:
    async with s.get(base + "/admin/replicas", headers=AUTH) as r:
        return {x["url"] for x in await r.json() if not x.get("draining")}


async def test_sighup_reloads_replicas_while_a_stream_is_in_flight(tmp_path: Path) -> None:
    a = await FakeReplica(mode="sse", delay=0.15).start()
    b = await FakeReplica().start()
    cfg = tmp_path / "prefixlb.yaml"
    write(cfg, [a.url])
    proc, base = await start(cfg)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            assert await replicas(s, base) == {a.url}

            async def long_stream() -> bytes:
                async with s.post(base + "/v1/completions", json={"model": "auto", "prompt": "x", "stream": True}) as r:
                    assert r.status == 200
                    return await r.read()

            task = asyncio.create_task(long_stream())  # ~1.5 s of events from replica a
            await asyncio.sleep(0.3)
            write(cfg, [b.url])  # a leaves, b joins
            os.kill(proc.pid, signal.SIGHUP)
            for _ in range(100):
                if await replicas(s, base) == {b.url}:
                    break
                await asyncio.sleep(0.05)
            assert await replicas(s, base) == {b.url}
            body = await task  # the stream on the drained replica finished whole
            assert body.rstrip().endswith(b"data: [DONE]")
            async with s.post(base + "/v1/completions", json={"model": "auto", "prompt": "y"}) as r:
                assert r.status == 200 and r.headers["x-prefixlb-replica"] == b.url
            # a broken file changes nothing, and says why
            cfg.write_text("tiers: [{name: small, replicas: [nonsense]}]")
            async with s.post(base + "/admin/reload", headers=AUTH) as r:
                assert r.status == 400
                assert "tiers[0].replicas[0]" in (await r.json())["error"]["message"]
            assert await replicas(s, base) == {b.url}
    finally:
        stop(proc)
        await a.stop()
        await b.stop()


async def test_sigterm_drains_then_exits_and_json_logs_carry_request_ids(tmp_path: Path) -> None:
    a = await FakeReplica(mode="sse", delay=0.1).start()
    cfg = tmp_path / "prefixlb.yaml"
    write(cfg, [a.url])
    proc, base = await start(cfg, "--log-format", "json", "--access-log")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            async def call() -> bytes:
                async with s.post(base + "/v1/completions", json={"model": "auto", "prompt": "x", "stream": True},
                                  headers={"x-request-id": "req-lifecycle-1"}) as r:
                    return await r.read()

            task = asyncio.create_task(call())
            await asyncio.sleep(0.3)
            os.kill(proc.pid, signal.SIGTERM)
            body = await task
            assert body.rstrip().endswith(b"data: [DONE]")  # in flight when SIGTERM came: finished
        rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
        assert rc == 0
        lines = [json.loads(x) for x in proc.stderr.read().splitlines() if x.startswith("{")]
        acc = [x for x in lines if x["logger"] == "prefixlb.access"]
        assert acc and acc[0]["request_id"] == "req-lifecycle-1" and acc[0]["status"] == 200
        assert acc[0]["replica"] == a.url and acc[0]["tier"] == "small"
        assert all("lifecycle-token" not in json.dumps(x) for x in lines)  # no secret in any log line
    finally:
        stop(proc)
        await a.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
async def test_tls_listener(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    a = await FakeReplica().start()
    cfg = tmp_path / "prefixlb.yaml"
    write(cfg, [a.url], listen={"tls_cert": str(cert), "tls_key": str(key)})
    proc, base = await start(cfg)
    try:
        base = base.replace("http://", "https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            async with s.post(base + "/v1/completions", json={"model": "auto", "prompt": "x"}) as r:
                assert r.status == 200
        async with aiohttp.ClientSession() as s:  # plain HTTP on the TLS port is refused
            with pytest.raises(aiohttp.ClientError):
                async with s.post(base.replace("https://", "http://") + "/v1/completions", json={}) as r:
                    await r.read()
    finally:
        stop(proc)
        await a.stop()
