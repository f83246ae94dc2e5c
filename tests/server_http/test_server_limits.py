"""What the server answers by itself: 400, 408, 413, 431, idle timeouts; garbage never a 5xx."""

from __future__ import annotations

import asyncio
import random

import pytest

from prefixlb.server.http import HTTPServer, Limits, Request, error_body

from .helpers import RawClient, RawResponse, read_response

handled: list[str] = []


async def ok(req: Request) -> None:
    handled.append(req.path)
    req.respond(200, [], b"ok")


async def serve(**limits) -> HTTPServer:  # type: ignore[no-untyped-def]
    handled.clear()
    server = HTTPServer(ok, limits=Limits(**limits))
    await server.serve("127.0.0.1", 0)
    return server


def assert_openai_error(r: RawResponse, status: int) -> dict:
    assert r.status == status
    assert r.header(b"content-type") == b"application/json"
    assert r.header(b"connection") == b"close"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["param"] is None and err["message"]
    return err


def test_error_body_is_openai_shaped():
    import orjson

    assert orjson.loads(error_body(404, "no such model: x", "not_found_error")) == {
        "error": {"message": "no such model: x", "type": "not_found_error", "param": None, "code": 404}
    }
    assert orjson.loads(error_body(503, "no healthy replica"))["error"]["type"] == "service_unavailable"
    assert orjson.loads(error_body(500, "x"))["error"]["type"] == "server_error"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_over_the_limit_is_413_and_the_connection_closes(aio, framing):
    async def go():
        server = await serve(max_body_bytes=1000)
        c = await RawClient.connect(server.port)
        if framing == "content-length":
            await c.send(b"POST /big HTTP/1.1\r\nhost: t\r\ncontent-length: 1001\r\n\r\n" + b"x" * 500)
        else:
            await c.send(b"POST /big HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(3):
                await c.send(b"190\r\n" + b"x" * 400 + b"\r\n")  # 1,200 bytes in all
        err = assert_openai_error(await c.response(), 413)
        assert "1000" in err["message"]
        assert await c.closed_by_peer(3)
        assert handled == []
        # exactly at the limit is fine
        c = await RawClient.connect(server.port)
        assert (await c.request("POST", "/fits", body=b"y" * 1000)).status == 200
        await server.close(1)

    aio.run(go())


def test_huge_headers_or_too_many_are_431(aio):
    async def go():
        server = await serve(max_header_bytes=4096, max_headers=20)
        c = await RawClient.connect(server.port)
        await c.send(b"GET / HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n")
        assert_openai_error(await c.response(), 431)
        assert await c.closed_by_peer(2)

        c = await RawClient.connect(server.port)
        await c.send(b"GET / HTTP/1.1\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(30)) + b"\r\n")
        assert_openai_error(await c.response(), 431)

        # a header that never ends, trickled in: bounded by raw bytes, not by the header's end
        c = await RawClient.connect(server.port)
        await c.send(b"GET / HTTP/1.1\r\nhost: t\r\nx-endless: ")
        for _ in range(10):
            await c.send(b"b" * 1000)
            await asyncio.sleep(0.01)
        assert_openai_error(await c.response(), 431)

        c = await RawClient.connect(server.port)
        await c.send(b"GET /" + b"p" * 5000 + b" HTTP/1.1\r\n\r\n")
        assert_openai_error(await c.response(), 431)
        assert handled == []
        await server.close(1)

    aio.run(go())


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /a b HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"GET / HTTP/1.1\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
    ],
    ids=[
        "request-line", "version", "space-in-target", "dup-content-length", "cl-and-te", "bad-chunk-size",
        "header-without-colon", "upgrade", "connect",
    ],
)
def test_malformed_requests_are_400_and_the_connection_closes(aio, raw):
    async def go():
        server = await serve()
        c = await RawClient.connect(server.port)
        await c.send(raw)
        assert_openai_error(await c.response(), 400)
        assert await c.closed_by_peer(3)
        assert handled == []
        await server.close(1)

    aio.run(go())


def test_bad_request_after_a_good_pipelined_one_is_answered_after_it(aio):
    async def go():
        server = await serve()
        c = await RawClient.connect(server.port)
        await c.send(b"GET /good HTTP/1.1\r\nhost: t\r\n\r\nNONSENSE\r\n\r\n")
        assert (await c.response()).body == b"ok"
        assert_openai_error(await c.response(), 400)
        assert await c.closed_by_peer(2)
        await server.close(1)

    aio.run(go())


def test_slow_loris_gets_408_and_is_closed_within_the_request_timeout(aio):
    async def go():
        server = await serve(request_timeout=0.5)
        c = await RawClient.connect(server.port)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await c.send(b"GET / HTTP/1.1\r\n")

        async def trickle():
            for b in b"host: t\r\nx-slow: " + b"z" * 100:
                await c.send(bytes([b]))
                await asyncio.sleep(0.05)

        trickler = asyncio.create_task(trickle())
        try:
            r = await read_response(c.reader, timeout=2)
            elapsed = loop.time() - t0
            assert_openai_error(r, 408)
            assert 0.45 <= elapsed < 1.0, elapsed
            assert await c.closed_by_peer(2.5)  # lingers at most linger_timeout (2 s default)
        finally:
            trickler.cancel()
            await asyncio.gather(trickler, return_exceptions=True)
        assert handled == []
        await server.close(1)

    aio.run(go())


def test_slow_body_also_counts_toward_the_request_timeout(aio):
    async def go():
        server = await serve(request_timeout=0.3)
        c = await RawClient.connect(server.port)
        await c.send(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nabc")
        assert_openai_error(await c.response(timeout=2), 408)
        await server.close(1)

    aio.run(go())


def test_idle_keep_alive_connection_is_closed_after_the_timeout(aio):
    async def go():
        server = await serve(keep_alive_timeout=0.3, request_timeout=5)
        c = await RawClient.connect(server.port)
        assert (await c.request("GET", "/")).status == 200
        t0 = asyncio.get_running_loop().time()
        assert await c.closed_by_peer(2)
        assert 0.25 <= asyncio.get_running_loop().time() - t0 < 1.0
        # a connection that never sends a byte is bounded too
        c = await RawClient.connect(server.port)
        assert await c.closed_by_peer(2)
        # a busy connection is not idle: a handler running longer than the keep-alive timeout is fine
        assert server.connection_count == 0
        await server.close(1)

    aio.run(go())


def test_long_handler_is_not_cut_by_keep_alive_or_request_timeouts(aio):
    async def slow(req: Request) -> None:
        await asyncio.sleep(0.5)
        req.respond(200, [], b"late")

    async def go():
        server = HTTPServer(slow, limits=Limits(keep_alive_timeout=0.2, request_timeout=0.2))
        await server.serve("127.0.0.1", 0)
        c = await RawClient.connect(server.port)
        assert (await c.request("GET", "/")).body == b"late"
        await server.close(1)

    aio.run(go())


def test_random_garbage_never_crashes_the_server_nor_gets_a_5xx(aio):
    """Seeded garbage over real sockets: random bytes, and valid requests with bytes mutated."""
    rng = random.Random(20261127)
    print("seed 20261127")
    base = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: t\r\ncontent-length: 11\r\nx-a: b\r\n\r\n{\"a\": true}"
    inputs = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(25)]
    for _ in range(35):
        b = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(3)
            i = rng.randrange(len(b))
            if op == 0:
                b[i] = rng.randrange(256)
            elif op == 1:
                b.insert(i, rng.choice(b"\r\n :\x00\x7f0123456789abcdef-;"))
            else:
                del b[i]
        inputs.append(bytes(b))

    async def go():
        server = await serve(request_timeout=0.3, linger_timeout=0.3)
        statuses = []
        for data in inputs:
            c = await RawClient.connect(server.port)
            await c.send(data)
            c.writer.write_eof()  # no more bytes: the server answers what it has, then closes
            raw = b""
            try:
                while chunk := await asyncio.wait_for(c.reader.read(65536), 2):
                    raw += chunk
            except ConnectionResetError:
                pass
            r = asyncio.StreamReader()
            r.feed_data(raw)
            r.feed_eof()
            while not r.at_eof():
                resp = await read_response(r, timeout=1)
                statuses.append(resp.status)
                assert resp.status < 500, (data, raw)
            await c.close()
        # the server is still fine
        c = await RawClient.connect(server.port)
        assert (await c.request("GET", "/after")).body == b"ok"
        await server.close(1)
        return statuses

    statuses = aio.run(go(), timeout=60)
    assert 400 in statuses  # the garbage was really looked at
