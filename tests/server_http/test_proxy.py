"""The pieces together as a pass-through proxy: HTTPServer + UpstreamPool + relay."""

from __future__ import annotations

import asyncio
import itertools
import statistics

import aiohttp
import pytest

from prefixlb.server.http import (
    HTTPServer,
    Limits,
    Request,
    UpstreamError,
    UpstreamPool,
    relay,
)

from .helpers import FakeUpstream, RawClient, chunk, http_response, sse_head

EVENTS = [b'data: {"choices": [{"delta": {"content": "tok%d"}}]}\n\n' % i for i in range(3)] + [b"data: [DONE]\n\n"]


def sse_every(gap: float):  # type: ignore[no-untyped-def]
    async def sse(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(sse_head()[:-2] + b"x-upstream: 1\r\nkeep-alive: timeout=5\r\n\r\n")
        await writer.drain()
        for i, e in enumerate(EVENTS):
            if i:
                await asyncio.sleep(gap)
            writer.write(chunk(e))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return sse


class Proxy:
    """The benchmark's proxy shape: forward the request to one replica, relay the answer."""

    def __init__(self, *origins: str, first_byte: float = 2.0) -> None:
        self.first_byte = first_byte
        self.pools = [UpstreamPool(o) for o in origins]
        self.finally_ran = 0
        self.server = HTTPServer(self.handle, limits=Limits())

    async def handle(self, req: Request) -> None:
        try:
            last: UpstreamError | None = None
            for pool in self.pools:  # retry elsewhere only while nothing reached the client
                assert not req.prepared
                try:
                    resp = await pool.request(
                        req.method, req.target, req.headers, req.body, timeout_first_byte=self.first_byte, read_timeout=2
                    )
                except UpstreamError as exc:
                    last = exc
                    continue
                try:
                    await relay(req, resp, headers=[(b"x-prefixlb-replica", pool.origin.encode())])
                except UpstreamError:
                    assert req.finished  # relay() truncated the client response; record and stop
                return
            assert last is not None
            req.respond_error(last.status, str(last), last.error_type)
        finally:
            self.finally_ran += 1

    async def start(self) -> Proxy:
        await self.server.serve("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.port}"
        return self

    async def stop(self) -> None:
        await self.server.close(1)
        for p in self.pools:
            await p.close()


def test_sse_events_pass_through_one_by_one_with_their_timing(aio):
    async def go():
        up = await FakeUpstream(sse_every(0.05)).start()
        proxy = await Proxy(up.origin).start()
        loop = asyncio.get_running_loop()
        url = proxy.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as s, s.post(url, data=b'{"stream": true}') as r:
            assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
            assert r.headers["x-upstream"] == "1" and r.headers["x-prefixlb-replica"] == up.origin
            assert "keep-alive" not in r.headers  # hop-by-hop, not forwarded
            buf, stamps = b"", []
            async for piece in r.content.iter_any():
                buf += piece
                stamps.extend([loop.time()] * piece.count(b"\n\n"))
        assert buf == b"".join(EVENTS)  # bytes equal
        assert len(stamps) == len(EVENTS)
        assert stamps[-1] - stamps[0] >= 0.04 * 3  # the first one came >= 40 ms before the last...
        assert all(b - a >= 0.02 for a, b in itertools.pairwise(stamps))  # ...and each on its own
        assert up.requests[0].body == b'{"stream": true}'
        await proxy.stop()
        await up.stop()

    aio.run(go())


def test_non_stream_answer_keeps_its_content_length_and_connections_are_reused(aio):
    body = b'{"id": "cmpl-1", "choices": [{"text": "' + b"x" * 380 + b'"}]}'

    async def answer(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(http_response(200, body))
        await writer.drain()

    async def go():
        up = await FakeUpstream(answer).start()
        proxy = await Proxy(up.origin).start()
        c = await RawClient.connect(proxy.server.port)
        for _ in range(3):
            r = await c.request("POST", "/v1/completions", body=b"{}")
            assert r.status == 200 and not r.chunked and r.body == body
            assert r.header(b"content-length") == str(len(body)).encode()
        assert up.accepted == 1 and proxy.pools[0].stats().reuses == 2
        await proxy.stop()
        await up.stop()

    aio.run(go())


def test_client_disconnect_mid_stream_aborts_the_upstream_request(aio):
    async def go():
        up = await FakeUpstream(sse_every(0.2)).start()
        proxy = await Proxy(up.origin).start()
        c = await RawClient.connect(proxy.server.port)
        await c.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}")
        first = await asyncio.wait_for(c.reader.read(65536), 2)
        assert b"tok0" in first
        await c.close()
        await up.wait_connection_closed(2)  # vLLM would abort the generation here
        assert up.peer_disconnects == 1
        for _ in range(40):
            if proxy.finally_ran:
                break
            await asyncio.sleep(0.01)
        assert proxy.finally_ran == 1
        assert proxy.pools[0].stats().open == 0
        await proxy.stop()
        await up.stop()

    aio.run(go())


def test_failure_before_the_first_byte_can_go_elsewhere_then_maps_to_openai_errors(aio):
    async def answer(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(http_response(200, b'{"ok": true}'))
        await writer.drain()

    async def silent(req, writer, n):  # type: ignore[no-untyped-def]
        await asyncio.sleep(10)

    async def go():
        good = await FakeUpstream(answer).start()
        dead = "http://127.0.0.1:1"  # nothing listens on port 1
        proxy = await Proxy(dead, good.origin).start()
        c = await RawClient.connect(proxy.server.port)
        r = await c.request("POST", "/v1/completions", body=b"{}")
        assert r.status == 200 and r.header(b"x-prefixlb-replica") == good.origin.encode()
        await proxy.stop()

        stuck = await FakeUpstream(silent).start()
        proxy = await Proxy(dead, stuck.origin, first_byte=0.3).start()
        c = await RawClient.connect(proxy.server.port)
        r = await c.request("POST", "/v1/completions", body=b"{}")
        err = r.json()["error"]
        assert r.status == 504 and err["type"] == "upstream_timeout" and err["code"] == 504
        await proxy.stop()
        await good.stop()
        await stuck.stop()

    aio.run(go())


def test_replica_dying_mid_stream_truncates_the_client_response(aio):
    async def dies(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(sse_head() + chunk(EVENTS[0]))
        await writer.drain()
        await asyncio.sleep(0.05)
        return False  # EOF mid-body

    async def go():
        up = await FakeUpstream(dies).start()
        proxy = await Proxy(up.origin).start()
        async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/chat/completions", data=b"{}") as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        await proxy.stop()
        await up.stop()

    aio.run(go())


def test_stream_ttft_through_the_proxy_is_within_a_few_ms_of_direct_on_reused_connections(aio):
    """The streaming stall of sglang-router (~43 ms, no TCP_NODELAY) must not happen here."""

    async def go():
        up = await FakeUpstream(sse_every(0.0)).start()
        proxy = await Proxy(up.origin).start()
        loop = asyncio.get_running_loop()

        async def ttfts(url: str) -> list[float]:
            out = []
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
                for i in range(12):
                    t0 = loop.time()
                    async with s.post(url + "/v1/chat/completions", data=b"{}") as r:
                        first = await r.content.readuntil(b"\n\n")
                        t1 = loop.time()
                        assert first == EVENTS[0]
                        await r.read()
                    if i >= 2:  # reused connection, warmed up
                        out.append(t1 - t0)
            return out

        direct = statistics.median(await ttfts(up.origin))
        proxied = statistics.median(await ttfts(proxy.url))
        assert proxied - direct < 0.005, (direct, proxied)
        await proxy.stop()
        await up.stop()

    aio.run(go())
