"""Streaming responses: framing, coalesced writes, backpressure, disconnects, TCP_NODELAY."""

from __future__ import annotations

import asyncio
import itertools
import socket

import aiohttp

from prefixlb.server.http import ClientDisconnected, HTTPServer, Limits, Request

from .helpers import RawClient


async def serve(handler, **limits) -> HTTPServer:  # type: ignore[no-untyped-def]
    server = HTTPServer(handler, limits=Limits(**limits))
    await server.serve("127.0.0.1", 0)
    return server


def test_chunked_and_fixed_length_streams_carry_the_bytes_written(aio):
    big = bytes(range(256)) * 1024  # 256 KiB: goes out through writelines

    async def handler(req: Request) -> None:
        if req.path == "/fixed":
            s = req.start(200, [(b"content-type", b"application/octet-stream")], content_length=len(big) + 3)
            await s.write(b"abc")
            await s.write(big)
            await s.end()
        else:
            s = req.start(200, [(b"content-type", b"text/event-stream")])
            for i in range(5):
                await s.write(b"data: %d\n\n" % i)
            await s.write(big)
            await s.end(b"data: [DONE]\n\n")

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        r = await c.request("GET", "/sse")
        assert r.chunked and r.body == b"".join(b"data: %d\n\n" % i for i in range(5)) + big + b"data: [DONE]\n\n"
        r = await c.request("GET", "/fixed")
        assert not r.chunked and r.header(b"content-length") == str(len(big) + 3).encode() and r.body == b"abc" + big
        await server.close(1)

    aio.run(go())


def test_short_fixed_length_body_closes_the_connection(aio):
    aio.expect_logged_errors = False

    async def handler(req: Request) -> None:
        s = req.start(200, [], content_length=10)
        await s.end(b"12345")

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        await c.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 2)
        assert b"content-length: 10" in head
        assert await c.closed_by_peer(2)  # the client can tell the body is truncated
        await server.close(1)

    aio.run(go())


def test_headers_go_out_with_the_first_body_bytes_in_one_segment(aio):
    async def handler(req: Request) -> None:
        s = req.start(200, [(b"content-type", b"text/event-stream")])
        await asyncio.sleep(0.05)  # headers are held back until the first event
        await s.write(b"data: first\n\n")
        await asyncio.sleep(0.05)
        await s.end()

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        await c.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        first = await asyncio.wait_for(c.reader.read(65536), 2)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"d\r\ndata: first\n\n\r\n")
        await server.close(1)

    aio.run(go())


def test_client_disconnect_mid_stream_cancels_the_handler_after_it_saw_the_disconnect(aio):
    events = []
    done = asyncio.Event()

    async def handler(req: Request) -> None:
        s = req.start(200, [(b"content-type", b"text/event-stream")])
        await s.write(b"data: 1\n\n")
        try:
            await req.disconnected
            events.append(("saw", req.is_disconnected))
            await asyncio.sleep(5)
            events.append("not cancelled")
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        finally:
            events.append("finally")
            done.set()

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        await c.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        assert b"data: 1" in await asyncio.wait_for(c.reader.read(65536), 2)
        await c.close()
        await asyncio.wait_for(done.wait(), 2)
        await server.close(1)

    aio.run(go())
    assert events == [("saw", True), "cancelled", "finally"]


def test_client_disconnect_while_the_handler_awaits_something_else_cancels_it(aio):
    finally_ran = asyncio.Event()

    async def handler(req: Request) -> None:
        try:
            await asyncio.sleep(10)  # e.g. waiting for the replica's first byte
            req.respond(200, [], b"never")
        finally:
            finally_ran.set()

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        await c.send(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\nhi")
        await asyncio.sleep(0.05)
        await c.close()
        await asyncio.wait_for(finally_ran.wait(), 2)
        await server.close(1)

    aio.run(go())


def test_writes_after_the_client_left_raise_client_disconnected(aio):
    outcome = []

    async def handler(req: Request) -> None:
        s = req.start(200, [])
        await s.write(b"x")
        await asyncio.sleep(0.2)
        try:
            await s.write(b"y")
        except ClientDisconnected:
            outcome.append("raised")

    async def go():
        server = HTTPServer(handler, limits=Limits(), cancel_on_disconnect=False)
        await server.serve("127.0.0.1", 0)
        c = await RawClient.connect(server.port)
        await c.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        await asyncio.wait_for(c.reader.read(100), 2)
        await c.close()
        await asyncio.sleep(0.4)
        await server.close(1)

    aio.run(go())
    assert outcome == ["raised"]


def test_a_client_that_does_not_read_makes_writes_wait_instead_of_buffering(aio):
    """64 KiB chunks to a client that never reads: write() must block long before memory grows."""
    result = {}
    chunk = b"z" * 65536
    high = 256 * 1024

    async def handler(req: Request) -> None:
        s = req.start(200, [(b"content-type", b"application/octet-stream")])
        written = 0
        peak = 0
        while written < 256 * 1024 * 1024:
            try:
                await asyncio.wait_for(s.write(chunk), 0.5)
            except asyncio.TimeoutError:
                result["stalled_after"] = written
                break
            written += len(chunk)
            peak = max(peak, s.buffered_bytes)
        result["peak_buffer"] = peak
        result["written"] = written
        await req.disconnected  # then cancelled

    async def go():
        server = await serve(handler, write_buffer_high=high, write_buffer_low=high // 4)
        c = await RawClient.connect(server.port)
        sock = c.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await c.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        for _ in range(100):
            if "written" in result:
                break
            await asyncio.sleep(0.05)
        await c.close()
        await server.close(1)

    aio.run(go(), timeout=30)
    assert "stalled_after" in result, result
    # kernel buffers on both ends plus our high-water mark: a few MB, not the 256 MB offered
    assert result["written"] < 32 * 1024 * 1024, result
    assert result["peak_buffer"] <= high + len(chunk), result


def test_slow_reader_still_gets_every_byte(aio):
    total = 3 * 1024 * 1024

    async def handler(req: Request) -> None:
        s = req.start(200, [])
        block = b"q" * 65536
        for _ in range(total // len(block)):
            await s.write(block)
        await s.end()

    async def go():
        server = await serve(handler, write_buffer_high=128 * 1024, write_buffer_low=32 * 1024)
        url = f"http://127.0.0.1:{server.port}/"
        async with aiohttp.ClientSession() as session, session.get(url) as r:
            got = 0
            async for piece in r.content.iter_chunked(32768):
                got += len(piece)
                if got < 512 * 1024:
                    await asyncio.sleep(0.005)  # slow at first: the server must wait, then resume
        assert got == total
        await server.close(1)

    aio.run(go())


def test_accepted_sockets_have_tcp_nodelay(aio):
    seen = {}

    async def handler(req: Request) -> None:
        sock = req.get_extra_info("socket")
        seen["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        req.respond(200, [], b"")

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        await c.request("GET", "/")
        await server.close(1)

    aio.run(go())
    assert seen["nodelay"] == 1


def test_sse_events_written_apart_arrive_apart_on_a_reused_connection(aio):
    """Small events 20 ms apart must not wait for the client's delayed ACK (Nagle: ~40 ms).

    Without TCP_NODELAY every stream on a reused connection shows one ~40 ms gap; the best of
    three streams is used so that one scheduler hiccup on a busy machine is not a failure.
    """
    gap = 0.02

    async def handler(req: Request) -> None:
        s = req.start(200, [(b"content-type", b"text/event-stream")])
        for i in range(6):
            await s.write(b"data: %d\n\n" % i)
            await asyncio.sleep(gap)
        await s.end()

    async def go():
        server = await serve(handler)
        loop = asyncio.get_running_loop()
        worst_gaps = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            for attempt in range(4):  # the first opens the connection, the others reuse it
                times = []
                t0 = loop.time()
                async with session.get(f"http://127.0.0.1:{server.port}/") as r:
                    buf = b""
                    async for piece in r.content.iter_any():
                        buf += piece
                        while b"\n\n" in buf:
                            _, buf = buf.split(b"\n\n", 1)
                            times.append(loop.time() - t0)
                assert len(times) == 6
                if attempt:
                    worst_gaps.append(max(b - a for a, b in itertools.pairwise(times)))
        assert min(worst_gaps) < gap + 0.015, worst_gaps  # a Nagle stall shows as ~40 ms
        await server.close(1)

    aio.run(go())
