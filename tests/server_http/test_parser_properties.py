"""Property tests of the request parser state: any split of the bytes parses the same; garbage,
split any way, never raises out of the protocol nor gets a 5xx.

These drive a connection protocol with a fake transport, because TCP would merge the pieces:
each ``data_received`` call here is one piece, so the splits really happen.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixlb.server.http import HTTPServer, Limits, Request
from prefixlb.server.http.server import _Connection

from .helpers import FakeTransport, parse_responses

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
VALUE = st.binary(min_size=0, max_size=40).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E or c == 0x20).strip()
)  # visible ASCII; leading/trailing spaces are not part of a field value


@pytest.fixture(scope="module")
def loop():
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


class Rig:
    """One connection protocol on a fake transport; collects the requests its handler sees."""

    def __init__(self, loop: asyncio.AbstractEventLoop, **limits) -> None:  # type: ignore[no-untyped-def]
        self.seen: list[Request] = []

        async def handler(req: Request) -> None:
            self.seen.append(req)
            req.respond(200, [], b"ok")

        server = HTTPServer(handler, limits=Limits(**limits))
        server.loop = loop  # driven by hand: no listening socket
        self.loop = loop
        self.transport = FakeTransport()
        self.conn = _Connection(server)

    def feed(self, pieces: list[bytes]) -> None:
        async def go() -> None:
            self.conn.connection_made(self.transport)
            for p in pieces:
                self.conn.data_received(p)
                await asyncio.sleep(0)
            for _ in range(5):
                await asyncio.sleep(0)  # let the handlers run
            self.conn.connection_lost(None)
            await asyncio.sleep(0)

        self.loop.run_until_complete(asyncio.wait_for(go(), 10))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@st.composite
def requests(draw):  # type: ignore[no-untyped-def]
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    path = "/" + "/".join(draw(st.lists(TOKEN, max_size=3)))
    query = draw(st.one_of(st.just(""), TOKEN.map(lambda t: "a=" + t)))
    headers = draw(st.lists(st.tuples(TOKEN, VALUE), max_size=6))
    headers = [(n.encode(), v) for n, v in headers if n not in ("content-length", "transfer-encoding", "connection", "expect", "upgrade")]
    body = draw(st.binary(max_size=3000)) if method != "GET" else b""
    chunked = draw(st.booleans()) and method != "GET"
    target = path + ("?" + query if query else "")
    head = [f"{method} {target} HTTP/1.1".encode()] + [n + b": " + v for n, v in headers]
    if chunked:
        sizes = draw(st.lists(st.integers(1, 700), max_size=10))
        pieces, i = [], 0
        for s in sizes + [len(body)]:
            if i >= len(body):
                break
            pieces.append(body[i : i + s])
            i += s
        head.append(b"transfer-encoding: chunked")
        raw = b"\r\n".join(head) + b"\r\n\r\n" + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        extra = [(b"transfer-encoding", b"chunked")]
    else:
        if body or method != "GET":
            head.append(b"content-length: %d" % len(body))
            extra = [(b"content-length", b"%d" % len(body))]
        else:
            extra = []
        raw = b"\r\n".join(head) + b"\r\n\r\n" + body
    expected = {"method": method, "path": path, "query": query.encode(), "headers": [(n.lower(), v) for n, v in headers] + extra, "body": body}
    return raw, expected


def view(req: Request) -> dict:
    return {"method": req.method, "path": req.path, "query": req.query, "headers": req.headers, "body": req.body}


@settings(max_examples=150, deadline=None)
@given(requests(), requests(), st.lists(st.integers(0, 10_000), max_size=20))
def test_any_split_of_pipelined_requests_parses_like_the_whole(loop, r1, r2, cuts):
    raw = r1[0] + r2[0]
    whole = Rig(loop)
    whole.feed([raw])
    assert [view(r) for r in whole.seen] == [r1[1], r2[1]]
    pieces = Rig(loop)
    pieces.feed(split(raw, cuts))
    assert [view(r) for r in pieces.seen] == [r1[1], r2[1]]
    assert [r.status for r in parse_responses(pieces.transport.written)] == [200, 200]


@settings(max_examples=25, deadline=None)
@given(requests())
def test_byte_by_byte_parses_like_the_whole(loop, r):
    rig = Rig(loop)
    rig.feed([r[0][i : i + 1] for i in range(len(r[0]))])
    assert [view(x) for x in rig.seen] == [r[1]]


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, byte in ops:
        if not b:
            break
        i = pos % len(b)
        if kind == 0:
            b[i] = byte
        elif kind == 1:
            b.insert(i, byte)
        else:
            del b[i]
    return bytes(b)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(min_size=1, max_size=400),
        st.tuples(requests(), st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5000), st.integers(0, 255)), min_size=1, max_size=4)).map(
            lambda t: mutate(t[0][0], t[1])
        ),
    ),
    st.lists(st.integers(0, 10_000), max_size=8),
)
def test_garbage_split_any_way_never_raises_nor_gets_a_5xx(loop, garbage, cuts):
    log = logging.getLogger("prefixlb.server.http")
    errors: list[logging.LogRecord] = []
    h = logging.Handler(logging.ERROR)
    h.emit = errors.append  # type: ignore[method-assign]
    log.addHandler(h)
    try:
        rig = Rig(loop, max_body_bytes=2000, max_header_bytes=1024, max_headers=8)
        rig.feed(split(garbage, cuts))  # data_received raising would fail the test here
    finally:
        log.removeHandler(h)
    assert not errors, [r.getMessage() for r in errors]
    for resp in parse_responses(rig.transport.written):
        assert resp.status < 500, (garbage, bytes(rig.transport.written))
