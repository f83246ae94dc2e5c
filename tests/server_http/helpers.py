"""Test tools for the HTTP layer: a raw client with its own response reader (not httptools, so
the server is checked against an independent parser), a scriptable fake replica, and a fake
transport for feeding a connection protocol byte by byte."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

T = 5.0  # default bound on any single wait in these tests


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def json(self) -> dict:
        return orjson.loads(self.body)


async def read_response(reader: asyncio.StreamReader, *, timeout: float = T, head: bool = False) -> RawResponse:
    """Read one response (status line, headers, body by content-length/chunked/EOF)."""

    async def go() -> RawResponse:
        block = await reader.readuntil(b"\r\n\r\n")
        lines = block[:-4].split(b"\r\n")
        version, code, *_ = lines[0].split(b" ", 2)
        assert version in (b"HTTP/1.1", b"HTTP/1.0"), lines[0]
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        resp = RawResponse(int(code), headers, b"")
        if head or resp.status in (204, 304) or 100 <= resp.status < 200:
            return resp
        te = resp.header(b"transfer-encoding")
        cl = resp.header(b"content-length")
        if te is not None and te.lower() == b"chunked":
            resp.chunked = True
            parts = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    assert await reader.readuntil(b"\r\n") == b"\r\n"  # no trailers expected
                    break
                parts.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            resp.body = b"".join(parts)
        elif cl is not None:
            resp.body = await reader.readexactly(int(cl))
        else:
            resp.body = await reader.read()  # close-delimited
        return resp

    return await asyncio.wait_for(go(), timeout)


class RawClient:
    """A client socket speaking bytes the test writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), T)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    @property
    def local_port(self) -> int:
        return self.writer.get_extra_info("sockname")[1]

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), T)

    async def request(
        self, method: str = "GET", path: str = "/", headers: list[tuple[str, str]] = (), body: bytes = b""
    ) -> RawResponse:
        lines = [f"{method} {path} HTTP/1.1", "host: test"] + [f"{k}: {v}" for k, v in headers]
        if body or method == "POST":
            lines.append(f"content-length: {len(body)}")
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return await read_response(self.reader, head=method == "HEAD")

    async def response(self, timeout: float = T, head: bool = False) -> RawResponse:
        return await read_response(self.reader, timeout=timeout, head=head)

    async def closed_by_peer(self, timeout: float = T) -> bool:
        """True once the server closed (EOF or reset) within ``timeout``; reads and discards data."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), T)
        except (ConnectionError, asyncio.TimeoutError):
            pass


@dataclass
class UpstreamRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


async def read_request(reader: asyncio.StreamReader) -> UpstreamRequest | None:
    """One request from the pool (content-length bodies only: that is what the pool sends)."""
    try:
        block = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = block[:-4].split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    req = UpstreamRequest(method, target, headers, b"")
    cl = req.header(b"content-length")
    if cl is not None:
        req.body = await reader.readexactly(int(cl))
    return req


Behaviour = Callable[[UpstreamRequest, asyncio.StreamWriter, int], Awaitable[bool | None]]


@dataclass
class FakeUpstream:
    """A replica scripted per test: ``behaviour(request, writer, n)`` answers the n-th request
    (0-based, across connections) and returns False to close the connection after it."""

    behaviour: Behaviour
    accepted: int = 0
    closed_connections: int = 0
    peer_disconnects: int = 0  # the balancer went away in the middle of an answer
    requests: list[UpstreamRequest] = field(default_factory=list)

    async def start(self) -> FakeUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self._closed_event = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._tasks.add(asyncio.current_task())
        try:
            while True:
                req = await read_request(reader)
                if req is None:
                    break
                n = len(self.requests)
                self.requests.append(req)
                # Answer while watching the socket, as a replica does: a client that goes away
                # mid-answer (EOF or reset) stops the answer. The pool sends nothing else before
                # the answer is complete, so this read consumes no request bytes.
                answer = asyncio.ensure_future(self.behaviour(req, writer, n))
                watch = asyncio.ensure_future(reader.read(1))
                try:
                    await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:  # stop(): settle both before leaving
                    for t in (answer, watch):
                        t.cancel()
                    await asyncio.gather(answer, watch, return_exceptions=True)
                    raise
                if answer.done():
                    watch.cancel()
                    await asyncio.gather(watch, return_exceptions=True)
                    if answer.result() is False:
                        break
                else:
                    watch.exception()  # EOF (b"") or a reset: either way, gone
                    answer.cancel()
                    await asyncio.gather(answer, return_exceptions=True)
                    self.peer_disconnects += 1
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(asyncio.current_task())
            writer.close()
            self.closed_connections += 1
            self._closed_event.set()

    async def wait_connection_closed(self, timeout: float = T) -> None:
        """Wait until some connection has ended (the peer closed, reset, or we closed)."""
        await asyncio.wait_for(self._closed_event.wait(), timeout)

    async def stop(self) -> None:
        self.server.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def http_response(status: int = 200, body: bytes = b"{}", headers: list[tuple[str, str]] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}", "content-type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def sse_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class FakeTransport(asyncio.Transport):
    """Enough of a transport to drive a connection protocol by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.eof = False
        self.paused = False

    def get_extra_info(self, name, default=None):  # type: ignore[no-untyped-def]
        return {"peername": ("127.0.0.1", 1)}.get(name, default)

    def set_write_buffer_limits(self, high=None, low=None):  # type: ignore[no-untyped-def]
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data) -> None:  # type: ignore[no-untyped-def]
        assert not self.eof, "write after write_eof"
        self.written += data

    def writelines(self, parts) -> None:  # type: ignore[no-untyped-def]
        for p in parts:
            self.write(p)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def parse_responses(data: bytes) -> list[RawResponse]:
    """Every complete response in ``data`` (content-length or chunked framed), synchronously."""
    out = []
    buf = bytes(data)
    pos = 0
    while True:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return out
        lines = buf[pos:end].split(b"\r\n")
        code = int(lines[0].split(b" ")[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        resp = RawResponse(code, headers, b"")
        pos = end + 4
        if 100 <= code < 200 or code in (204, 304):
            out.append(resp)
            continue
        cl = resp.header(b"content-length")
        if resp.header(b"transfer-encoding") == b"chunked":
            parts = []
            while True:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    return out
                size = int(buf[pos:nl], 16)
                pos = nl + 2
                if size == 0:
                    pos += 2
                    break
                parts.append(buf[pos : pos + size])
                pos += size + 2
            resp.body = b"".join(parts)
        elif cl is not None:
            if len(buf) < pos + int(cl):
                return out
            resp.body = buf[pos : pos + int(cl)]
            pos += int(cl)
        out.append(resp)
