"""HTTPServer: keep-alive, pipelining, HTTP/1.0, bodies, Expect, HEAD, handler failures, shutdown."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import orjson

from prefixlb.server.http import HTTPServer, Limits, Request

from .helpers import RawClient


async def echo(req: Request) -> None:
    """Answers with what it received, as JSON."""
    info = {
        "method": req.method,
        "path": req.path,
        "query": req.query.decode(),
        "body_len": len(req.body),
        "sha": hashlib.sha256(req.body).hexdigest(),
        "client_port": req.client[1],
        "http_version": req.http_version,
        "x": (req.header("X-Test") or b"").decode(),
    }
    req.respond_json(200, orjson.dumps(info))


async def serve(handler, **limits) -> HTTPServer:  # type: ignore[no-untyped-def]
    server = HTTPServer(handler, limits=Limits(**limits))
    await server.serve("127.0.0.1", 0)
    return server


def test_two_requests_reuse_one_connection(aio):
    async def go():
        server = await serve(echo)
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn) as s:
            ports = []
            for i in range(2):
                async with s.post(f"http://127.0.0.1:{server.port}/v1/x?a={i}", data=b"abc") as r:
                    assert r.status == 200
                    info = await r.json()
                    assert info["query"] == f"a={i}" and info["body_len"] == 3
                    ports.append(info["client_port"])
        assert ports[0] == ports[1]
        await server.close(1)

    aio.run(go())


def test_raw_keep_alive_then_connection_close_is_honoured(aio):
    async def go():
        server = await serve(echo)
        c = await RawClient.connect(server.port)
        r1 = await c.request("GET", "/a")
        assert r1.status == 200 and r1.header(b"connection") is None
        r2 = await c.request("GET", "/b", headers=[("connection", "close")])
        assert r2.status == 200 and r2.header(b"connection") == b"close"
        assert await c.closed_by_peer(2)
        await server.close(1)

    aio.run(go())


def test_pipelined_requests_are_answered_in_order_one_at_a_time(aio):
    events = []

    async def handler(req: Request) -> None:
        events.append(("start", req.path))
        await asyncio.sleep(0.05 if req.path == "/slow" else 0)
        events.append(("end", req.path))
        req.respond(200, [(b"x-path", req.path.encode())], req.path.encode())

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        await c.send(b"".join(b"GET %s HTTP/1.1\r\nhost: t\r\n\r\n" % p for p in (b"/slow", b"/fast", b"/fast2")))
        bodies = [(await c.response()).body for _ in range(3)]
        assert bodies == [b"/slow", b"/fast", b"/fast2"]
        assert events == [
            ("start", "/slow"), ("end", "/slow"),
            ("start", "/fast"), ("end", "/fast"),
            ("start", "/fast2"), ("end", "/fast2"),
        ]  # fmt: skip
        await server.close(1)

    aio.run(go())


def test_content_length_and_chunked_request_bodies(aio):
    async def go():
        server = await serve(echo)
        body = bytes(range(256)) * 300  # 76,800 bytes, arrives in several reads
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{server.port}/cl", data=body) as r:
                info = await r.json()
                assert info["body_len"] == len(body) and info["sha"] == hashlib.sha256(body).hexdigest()

            async def gen():
                for i in range(0, len(body), 10_000):
                    yield body[i : i + 10_000]
                    await asyncio.sleep(0.001)

            async with s.post(f"http://127.0.0.1:{server.port}/chunked", data=gen()) as r:
                info = await r.json()
                assert info["body_len"] == len(body) and info["sha"] == hashlib.sha256(body).hexdigest()
        # and by hand, with chunk extensions and odd sizes, one byte at a time
        c = await RawClient.connect(server.port)
        msg = b"POST /c HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n1\r\nd\r\n0\r\n\r\n"
        for i in range(len(msg)):
            await c.send(msg[i : i + 1])
        r = await c.response()
        assert r.json()["sha"] == hashlib.sha256(b"abcd").hexdigest()
        await server.close(1)

    aio.run(go())


def test_http10_is_answered_without_chunking_and_closed_unless_keep_alive(aio):
    async def streamer(req: Request) -> None:
        s = req.start(200, [(b"content-type", b"text/plain")])
        await s.write(b"hello ")
        await s.end(b"world")

    async def go():
        server = await serve(echo)
        c = await RawClient.connect(server.port)
        await c.send(b"GET /a HTTP/1.0\r\n\r\n")
        r = await c.response()
        assert r.status == 200 and r.header(b"connection") == b"close" and r.json()["http_version"] == "1.0"
        assert await c.closed_by_peer(2)
        c = await RawClient.connect(server.port)
        for _ in range(2):
            await c.send(b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            r = await c.response()
            assert r.status == 200 and r.header(b"connection") == b"keep-alive"
        await c.close()
        await server.close(1)

        server = await serve(streamer)
        c = await RawClient.connect(server.port)
        await c.send(b"GET /s HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        r = await c.response()  # close-delimited: read to EOF
        assert r.body == b"hello world" and not r.chunked and r.header(b"connection") == b"close"
        await server.close(1)

    aio.run(go())


def test_expect_100_continue_is_answered_before_the_body(aio):
    async def go():
        server = await serve(echo, max_body_bytes=1000)
        c = await RawClient.connect(server.port)
        await c.send(b"POST /e HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n")
        interim = await c.response(timeout=2)
        assert interim.status == 100
        await c.send(b"hello")
        r = await c.response()
        assert r.status == 200 and r.json()["body_len"] == 5
        # over the limit: the final answer comes instead of 100 Continue
        await c.send(b"POST /e HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 5000\r\n\r\n")
        r = await c.response(timeout=2)
        assert r.status == 413
        await server.close(1)

    aio.run(go())


def test_head_and_204_have_no_body(aio):
    async def handler(req: Request) -> None:
        if req.path == "/204":
            req.respond(204, [], b"")
        else:
            req.respond(200, [(b"content-type", b"text/plain")], b"twelve bytes")

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        r = await c.request("HEAD", "/x")
        assert r.status == 200 and r.header(b"content-length") == b"12" and r.body == b""
        r = await c.request("GET", "/204")
        assert r.status == 204 and r.header(b"content-length") is None
        r = await c.request("GET", "/x")  # the connection is still in sync
        assert r.body == b"twelve bytes"
        await server.close(1)

    aio.run(go())


def test_request_fields_and_header_lookup(aio):
    seen = {}

    async def handler(req: Request) -> None:
        seen.update(
            method=req.method, path=req.path, query=req.query, headers=req.headers,
            auth=req.header(b"AUTHORIZATION"), missing=req.header("nope"), received_at=req.received_at,
        )  # fmt: skip
        req.respond(200)

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        await c.send(b"PUT /p%20q/r?x=1&y=%2F#frag HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer k\r\nX-A: 1\r\nX-A: 2\r\n\r\n")
        assert (await c.response()).status == 200
        await server.close(1)

    aio.run(go())
    assert seen["method"] == "PUT" and seen["path"] == "/p%20q/r" and seen["query"] == b"x=1&y=%2F"
    assert seen["headers"] == [(b"host", b"t"), (b"authorization", b"Bearer k"), (b"x-a", b"1"), (b"x-a", b"2")]
    assert seen["auth"] == b"Bearer k" and seen["missing"] is None and seen["received_at"] > 0


def test_handler_exception_before_responding_is_a_500_in_openai_shape_and_keeps_the_connection(aio):
    aio.expect_logged_errors = True

    async def handler(req: Request) -> None:
        if req.path == "/boom":
            raise KeyError("boom")
        if req.path == "/forgot":
            return
        req.respond(200, [], b"ok")

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        for path in ("/boom", "/forgot"):
            r = await c.request("GET", path)
            assert r.status == 500 and r.header(b"content-type") == b"application/json"
            err = r.json()["error"]
            assert err["type"] == "server_error" and err["code"] == 500 and err["param"] is None
        assert (await c.request("GET", "/fine")).body == b"ok"
        await server.close(1)

    aio.run(go())
    assert any("handler failed" in m for m in aio.logged_errors)


def test_response_state_machine_refuses_a_second_response_and_late_writes(aio):
    outcomes = []

    async def handler(req: Request) -> None:
        assert not req.prepared
        stream = req.start(200, [(b"content-type", b"text/plain")])
        assert req.prepared and not req.finished
        for attempt in (lambda: req.respond(200), lambda: req.start(200)):
            try:
                attempt()
            except RuntimeError:
                outcomes.append("refused")
        await stream.write(b"a")
        await stream.end(b"b")
        await stream.end()  # idempotent
        assert req.finished
        try:
            await stream.write(b"c")
        except RuntimeError:
            outcomes.append("refused")

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        r = await c.request("GET", "/")
        assert r.body == b"ab" and r.chunked
        await server.close(1)

    aio.run(go())
    assert outcomes == ["refused"] * 3


def test_header_injection_is_refused(aio):
    aio.expect_logged_errors = True

    async def handler(req: Request) -> None:
        req.respond(200, [(b"x-evil", b"a\r\nset-cookie: x")], b"")

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        r = await c.request("GET", "/")
        assert r.status == 500 and r.header(b"set-cookie") is None
        await server.close(1)

    aio.run(go())


def test_graceful_close_finishes_in_flight_closes_idle_and_stops_accepting(aio):
    started = asyncio.Event()

    async def handler(req: Request) -> None:
        if req.path == "/slow":
            started.set()
            await asyncio.sleep(0.2)
        req.respond(200, [], req.path.encode())

    async def go():
        server = await serve(handler)
        port = server.port
        idle = await RawClient.connect(port)
        assert (await idle.request("GET", "/warm")).status == 200
        busy = await RawClient.connect(port)
        await busy.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
        await asyncio.wait_for(started.wait(), 2)
        t0 = asyncio.get_running_loop().time()
        closing = asyncio.create_task(server.close(drain_timeout=5))
        assert await idle.closed_by_peer(1)  # idle keep-alive connection closed at once
        r = await busy.response()
        assert r.body == b"/slow" and r.header(b"connection") == b"close"
        await asyncio.wait_for(closing, 5)
        assert asyncio.get_running_loop().time() - t0 < 2
        try:
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
        except OSError:
            pass
        else:
            raise AssertionError("server still accepts connections after close()")

    aio.run(go())


def test_close_cancels_handlers_still_running_at_the_drain_deadline(aio):
    cancelled = []

    async def handler(req: Request) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(req.path)
            raise

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        await c.send(b"GET /stuck HTTP/1.1\r\nhost: t\r\n\r\n")
        await asyncio.sleep(0.05)
        t0 = asyncio.get_running_loop().time()
        await server.close(drain_timeout=0.2)
        assert asyncio.get_running_loop().time() - t0 < 1.5
        assert await c.closed_by_peer(1)

    aio.run(go())
    assert cancelled == ["/stuck"]


def test_many_pipelined_requests_beyond_the_queue_bound_are_all_answered_in_order(aio):
    async def handler(req: Request) -> None:
        await asyncio.sleep(0.001)
        req.respond(200, [], req.path.encode())

    async def go():
        server = await serve(handler, max_pipelined=4)
        c = await RawClient.connect(server.port)
        await c.send(b"".join(b"GET /%d HTTP/1.1\r\nhost: t\r\n\r\n" % i for i in range(40)))
        bodies = [(await c.response()).body for _ in range(40)]
        assert bodies == [b"/%d" % i for i in range(40)]
        await server.close(1)

    aio.run(go())


def test_rendered_lines_go_after_the_headers_in_respond_and_start(aio):
    """``lines=``: header lines rendered ahead (the balancer's x-prefixlb-*), written after the
    caller's headers and before the framing ones, in a whole response and a streamed one."""

    async def handler(req: Request) -> None:
        lines = b"x-one: 1\r\nx-two: 2\r\n"
        if req.path == "/whole":
            req.respond(200, [(b"x-first", b"0")], b"abc", lines)
        else:
            out = req.start(200, [(b"x-first", b"0")], lines=lines)
            await out.write(b"abc")
            await out.end()

    async def go():
        server = await serve(handler)
        c = await RawClient.connect(server.port)
        whole = await c.request("GET", "/whole")
        streamed = await c.request("GET", "/stream")
        for r in (whole, streamed):
            assert r.status == 200 and r.body == b"abc"
            names = [k for k, _ in r.headers]
            assert names[:3] == [b"x-first", b"x-one", b"x-two"]
            assert r.header(b"x-two") == b"2"
        assert whole.header(b"content-length") == b"3" and streamed.header(b"transfer-encoding") == b"chunked"
        await c.close()
        await server.close(1)

    aio.run(go())
