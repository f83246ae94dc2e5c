"""UpstreamPool against scripted replicas: reuse, streaming, retries, and each failure mapped."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct

import pytest

from prefixlb.server.http import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamLimits,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeout,
)

from .helpers import FakeUpstream, chunk, http_response, sse_head


async def answer_json(req, writer, n):  # type: ignore[no-untyped-def]
    writer.write(http_response(200, b'{"n": %d, "len": %d}' % (n, len(req.body))))
    await writer.drain()


def test_keep_alive_connections_are_reused(aio):
    async def go():
        up = await FakeUpstream(answer_json).start()
        pool = UpstreamPool(up.origin)
        for i in range(3):
            resp = await pool.request("POST", "/v1/completions", [(b"content-type", b"application/json")], b"abc")
            assert resp.status == 200 and resp.content_length is not None and not resp.chunked
            assert await resp.read() == b'{"n": %d, "len": 3}' % i
            await resp.release()
        assert up.accepted == 1
        st = pool.stats()
        assert (st.open, st.idle, st.connects, st.reuses, st.retries) == (1, 1, 1, 2, 0)
        req = up.requests[0]
        assert req.header(b"host") == f"127.0.0.1:{up.port}".encode() and req.header(b"content-length") == b"3"
        await pool.close()
        assert pool.stats().open == 0
        await up.stop()

    aio.run(go())


def test_concurrent_requests_open_parallel_connections_then_pool_them(aio):
    async def slow(req, writer, n):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.05)
        await answer_json(req, writer, n)

    async def go():
        up = await FakeUpstream(slow).start()
        pool = UpstreamPool(up.origin, max_idle=3)

        async def one() -> None:
            async with await pool.request("GET", "/x") as resp:
                await resp.read()

        await asyncio.gather(*(one() for _ in range(5)))
        assert up.accepted == 5
        assert pool.stats().idle == 3  # max_idle: the rest were closed
        await asyncio.gather(*(one() for _ in range(3)))
        assert up.accepted == 5
        await pool.close()
        await up.stop()

    aio.run(go())


def test_stream_chunks_arrive_one_by_one_as_sent(aio):
    events = [b"data: {\"i\": %d}\n\n" % i for i in range(4)]

    async def sse(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(sse_head())
        await writer.drain()
        for e in events:
            await asyncio.sleep(0.05)
            writer.write(chunk(e))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async def go():
        up = await FakeUpstream(sse).start()
        pool = UpstreamPool(up.origin)
        loop = asyncio.get_running_loop()
        resp = await pool.request("POST", "/v1/chat/completions", body=b"{}", timeout_first_byte=2, read_timeout=2)
        assert resp.chunked and resp.header(b"content-type") == b"text/event-stream"
        got, times = [], []
        async for piece in resp.iter_chunks():
            got.append(piece)
            times.append(loop.time())
        await resp.release()
        assert got == events  # each event on its own, chunk framing removed
        assert times[-1] - times[0] >= 0.12
        assert all(b - a >= 0.02 for a, b in itertools.pairwise(times))  # not coalesced
        assert pool.stats().idle == 1
        await pool.close()
        await up.stop()

    aio.run(go())


def test_dead_idle_connection_is_retried_once_on_a_fresh_one(aio):
    async def flaky(req, writer, n):  # type: ignore[no-untyped-def]
        if n == 1:
            return False  # read the 2nd request, close without a byte: "closed while idle"
        await answer_json(req, writer, n)

    async def go():
        up = await FakeUpstream(flaky).start()
        pool = UpstreamPool(up.origin)
        for i in range(2):
            resp = await pool.request("POST", "/x", body=b"hello", timeout_first_byte=2)
            assert resp.status == 200
            await resp.read()
            await resp.release()
        assert up.accepted == 2
        assert pool.stats().retries == 1
        assert [r.body for r in up.requests] == [b"hello"] * 3  # the retry sent the same bytes
        await pool.close()
        await up.stop()

    aio.run(go())


def test_reset_on_a_pooled_connection_is_retried(aio):
    async def rst(req, writer, n):  # type: ignore[no-untyped-def]
        if n == 1:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            return False
        await answer_json(req, writer, n)

    async def go():
        up = await FakeUpstream(rst).start()
        pool = UpstreamPool(up.origin)
        for _ in range(2):
            async with await pool.request("GET", "/x", timeout_first_byte=2) as resp:
                assert resp.status == 200
                await resp.read()
        assert pool.stats().retries == 1
        await pool.close()
        await up.stop()

    aio.run(go())


def test_fresh_connection_closed_before_any_byte_is_a_connect_error_not_a_loop(aio):
    async def hang_up(req, writer, n):  # type: ignore[no-untyped-def]
        return False

    async def go():
        up = await FakeUpstream(hang_up).start()
        pool = UpstreamPool(up.origin)
        with pytest.raises(UpstreamConnectError) as ei:
            await pool.request("GET", "/x", timeout_first_byte=2)
        assert ei.value.bytes_received == 0 and ei.value.status == 502
        assert up.accepted == 1
        await pool.close()
        await up.stop()

    aio.run(go())


def test_connection_refused_is_upstream_connect_error(aio):
    async def go():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        pool = UpstreamPool(f"http://127.0.0.1:{port}")
        with pytest.raises(UpstreamConnectError) as ei:
            await pool.request("GET", "/")
        assert isinstance(ei.value.__cause__, ConnectionRefusedError)
        assert f"127.0.0.1:{port}" in str(ei.value)
        await pool.close()

    aio.run(go())


def test_connect_timeout_is_upstream_connect_error(aio):
    async def go():
        # a listening socket with a full backlog and nobody accepting: SYNs go unanswered
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                f = socket.socket()
                f.setblocking(False)
                try:
                    f.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
                fillers.append(f)
            pool = UpstreamPool(f"http://127.0.0.1:{port}", connect_timeout=0.2)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(UpstreamConnectError) as ei:
                await pool.request("GET", "/")
            assert loop.time() - t0 < 1.5
            assert "timed out" in str(ei.value) or isinstance(ei.value.__cause__, OSError)
        finally:
            for f in fillers:
                f.close()
            lsock.close()

    aio.run(go())


def test_no_first_byte_in_time_is_upstream_timeout_and_closes_the_connection(aio):
    async def silent(req, writer, n):  # type: ignore[no-untyped-def]
        await asyncio.sleep(10)

    async def go():
        up = await FakeUpstream(silent).start()
        pool = UpstreamPool(up.origin)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(UpstreamTimeout) as ei:
            await pool.request("POST", "/x", body=b"{}", timeout_first_byte=0.2)
        assert 0.15 <= loop.time() - t0 < 1.0
        assert ei.value.status == 504
        assert pool.stats().open == 0
        await up.stop()

    aio.run(go())


def test_no_next_chunk_in_time_is_upstream_timeout(aio):
    async def stall(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(sse_head() + chunk(b"data: 1\n\n"))
        await writer.drain()
        await asyncio.sleep(10)

    async def go():
        up = await FakeUpstream(stall).start()
        pool = UpstreamPool(up.origin)
        resp = await pool.request("GET", "/x", timeout_first_byte=1, read_timeout=0.2)
        assert await resp.read_chunk() == b"data: 1\n\n"
        with pytest.raises(UpstreamTimeout):
            await resp.read_chunk()
        await up.wait_connection_closed(2)  # the replica saw the abort
        await up.stop()

    aio.run(go())


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_eof_mid_body_is_upstream_closed(aio, framing):
    async def cut(req, writer, n):  # type: ignore[no-untyped-def]
        if framing == "chunked":
            writer.write(sse_head() + chunk(b"data: 1\n\n") + b"20\r\npartial")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        return False

    async def go():
        up = await FakeUpstream(cut).start()
        pool = UpstreamPool(up.origin)
        resp = await pool.request("GET", "/x", timeout_first_byte=2, read_timeout=2)
        with pytest.raises(UpstreamClosed) as ei:
            while await resp.read_chunk():
                pass
        assert ei.value.bytes_received > 0
        await resp.release()
        assert pool.stats().open == 0
        await up.stop()

    aio.run(go())


def test_eof_mid_headers_is_upstream_closed(aio):
    async def cut(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-le")
        await writer.drain()
        return False

    async def go():
        up = await FakeUpstream(cut).start()
        pool = UpstreamPool(up.origin)
        with pytest.raises(UpstreamClosed):
            await pool.request("GET", "/x", timeout_first_byte=2)
        await up.stop()

    aio.run(go())


@pytest.mark.parametrize(
    "raw",
    [b"SPDY/3 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nxyz\r\n"],
    ids=["not-http", "cl-and-te", "bad-chunk"],
)
def test_malformed_response_is_upstream_protocol_error(aio, raw):
    async def bad(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(1)

    async def go():
        up = await FakeUpstream(bad).start()
        pool = UpstreamPool(up.origin)
        with pytest.raises(UpstreamProtocolError):
            resp = await pool.request("GET", "/x", timeout_first_byte=2)
            while await resp.read_chunk():
                pass
        assert pool.stats().open == 0
        await up.stop()

    aio.run(go())


def test_abort_closes_the_upstream_connection(aio):
    async def endless(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(sse_head())
        for i in range(200):
            writer.write(chunk(b"data: %d\n\n" % i))
            await writer.drain()
            await asyncio.sleep(0.01)

    async def go():
        up = await FakeUpstream(endless).start()
        pool = UpstreamPool(up.origin)
        resp = await pool.request("POST", "/x", body=b"{}", timeout_first_byte=2)
        assert await resp.read_chunk()
        resp.abort()
        await up.wait_connection_closed(1)
        assert up.closed_connections == 1 and pool.stats().open == 0
        with pytest.raises(UpstreamClosed):
            await resp.read_chunk()
        await up.stop()

    aio.run(go())


def test_cancelling_the_caller_while_waiting_aborts_the_upstream_connection(aio):
    async def silent(req, writer, n):  # type: ignore[no-untyped-def]
        await asyncio.sleep(10)

    async def go():
        up = await FakeUpstream(silent).start()
        pool = UpstreamPool(up.origin)
        task = asyncio.create_task(pool.request("POST", "/x", body=b"{}"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await up.wait_connection_closed(1)
        assert pool.stats().open == 0
        await up.stop()

    aio.run(go())


def test_release_before_the_end_closes_instead_of_pooling(aio):
    async def two_parts(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(1)

    async def go():
        up = await FakeUpstream(two_parts).start()
        pool = UpstreamPool(up.origin)
        resp = await pool.request("GET", "/x", timeout_first_byte=2)
        assert await resp.read_chunk() == b"hello"
        await resp.release()
        st = pool.stats()
        assert st.open == 0 and st.idle == 0
        await up.wait_connection_closed(1)
        await up.stop()

    aio.run(go())


def test_connection_close_from_the_replica_is_not_pooled_and_close_delimited_body_is_read(aio):
    async def close_delimited(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        return False

    async def go():
        up = await FakeUpstream(close_delimited).start()
        pool = UpstreamPool(up.origin)
        resp = await pool.request("GET", "/x", timeout_first_byte=2)
        assert await resp.read() == b"all of it" and not resp.keep_alive
        await resp.release()
        assert pool.stats().idle == 0
        await up.stop()

    aio.run(go())


def test_interim_100_continue_is_skipped(aio):
    async def interim(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + http_response(201, b"made"))
        await writer.drain()

    async def go():
        up = await FakeUpstream(interim).start()
        pool = UpstreamPool(up.origin)
        async with await pool.request("POST", "/x", body=b"a", timeout_first_byte=2) as resp:
            assert resp.status == 201 and await resp.read() == b"made"
        assert pool.stats().idle == 1
        await pool.close()
        await up.stop()

    aio.run(go())


def test_hop_by_hop_request_headers_are_not_forwarded(aio):
    async def go():
        up = await FakeUpstream(answer_json).start()
        pool = UpstreamPool(up.origin)
        headers = [(b"authorization", b"Bearer k"), (b"connection", b"close"), (b"transfer-encoding", b"chunked"),
                   (b"content-length", b"999"), (b"host", b"evil"), ("x-str", "ok")]  # fmt: skip
        async with await pool.request("POST", "/x", headers, b"body") as resp:
            await resp.read()
        got = up.requests[0].headers
        names = [n for n, _ in got]
        assert (b"authorization", b"Bearer k") in got and (b"x-str", b"ok") in got
        assert b"connection" not in names and b"transfer-encoding" not in names
        assert names.count(b"host") == 1 and names.count(b"content-length") == 1
        assert up.requests[0].header(b"content-length") == b"4"
        with pytest.raises(ValueError):
            await pool.request("GET", "/x", [(b"x-bad", b"a\r\nb: c")])
        await pool.close()
        await up.stop()

    aio.run(go())


def test_request_splitting_is_refused_and_nothing_is_sent(aio):
    """A CR or LF anywhere in a header line (name or value, alone or paired) or in the path is
    refused before anything is written; clean requests of every shape go through intact."""
    async def go():
        up = await FakeUpstream(answer_json).start()
        pool = UpstreamPool(up.origin)
        for headers in ([(b"x-bad", b"a\nb")], [(b"x-bad", b"a\rb")], [(b"x-b\r\nad", b"v")], [("x-str", "a\r\nb: c")],
                        [(b"ok", b"1"), (b"x-bad", b"\n"), (b"ok2", b"2")]):
            with pytest.raises(ValueError):
                await pool.request("POST", "/x", headers, b"{}")
        for path in ("/x y", "/x\r\nhost: evil", "/x\n"):
            with pytest.raises(ValueError):
                await pool.request("GET", path)
        assert up.requests == []
        big = b"x" * 200_000
        for method, headers, body in (("GET", [], b""), ("POST", [(b"a", b"1"), ("b", "2")], b"{}"),
                                      ("POST", [], big)):
            async with await pool.request(method, "/y", headers, body) as resp:
                await resp.read()
            got = up.requests[-1]
            assert got.body == body and got.header(b"content-length") == (str(len(body)).encode() if method == "POST"
                                                                            else None)
            for name, value in headers:
                assert got.header(name.encode() if isinstance(name, str) else name) == (
                    value.encode() if isinstance(value, str) else value)
        await pool.close()
        await up.stop()

    aio.run(go())


def test_slow_consumer_stops_reading_from_the_replica(aio):
    """Body bytes queued but not read stay bounded: the pool pauses reading (TCP backpressure)."""
    total = 8 * 1024 * 1024
    sent = {}

    async def firehose(req, writer, n):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        block = b"f" * 65536
        for i in range(total // len(block)):
            writer.write(block)
            try:
                await asyncio.wait_for(writer.drain(), 0.3)
            except asyncio.TimeoutError:
                sent["stalled_at"] = i * len(block)
                await asyncio.sleep(5)
                return False

    async def go():
        up = await FakeUpstream(firehose).start()
        high = 128 * 1024
        pool = UpstreamPool(up.origin, limits=UpstreamLimits(read_buffer_high=high))
        resp = await pool.request("GET", "/x", timeout_first_byte=2)
        await asyncio.sleep(1.0)  # read nothing for a while
        queued = sum(map(len, resp._queue))
        assert queued <= high + 512 * 1024, queued  # one read past the mark at most
        assert "stalled_at" in sent and sent["stalled_at"] < total
        resp.abort()
        await up.stop()

    aio.run(go())


def test_pool_sockets_have_tcp_nodelay(aio):
    async def go():
        up = await FakeUpstream(answer_json).start()
        pool = UpstreamPool(up.origin)
        resp = await pool.request("GET", "/")
        assert resp.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        await resp.read()
        await resp.release()
        await pool.close()
        await up.stop()

    aio.run(go())


def test_bad_origins_are_refused():
    for bad in ("https://x:1", "x:1", "http://x:1/v1", "http://"):
        with pytest.raises(ValueError):
            UpstreamPool(bad)


def test_connections_idle_longer_than_idle_timeout_are_not_reused(aio):
    async def go():
        up = await FakeUpstream(answer_json).start()
        pool = UpstreamPool(up.origin, idle_timeout=0.1)
        for pause in (0, 0.25):
            await asyncio.sleep(pause)
            async with await pool.request("GET", "/x") as resp:
                await resp.read()
        assert up.accepted == 2 and pool.stats().reuses == 0
        await up.wait_connection_closed(1)  # the stale one was closed, not leaked
        await pool.close()
        await up.stop()

    aio.run(go())
