"""Keep-alive HTTP/1.1 connections to one replica, and its responses streamed as they arrive.

``pool = UpstreamPool("http://10.0.0.5:8000")``; ``resp = await pool.request("POST", path,
headers, body, timeout_first_byte=...)`` returns once the status line and headers are in; the
body then comes from ``resp.read_chunk()`` / ``async for chunk in resp.iter_chunks()`` exactly as
the replica's bytes arrive (chunked framing removed). Finish with ``await resp.release()``
(the connection goes back to the pool if the response was complete and keep-alive allows) or
``resp.abort()`` (close now: the replica sees the client's abort). ``async with resp:`` releases
on success and aborts on an exception.

A request sent on a pooled connection that turns out dead (the replica closed it while idle,
reset on write, EOF before any response byte) is sent again, once, on a new connection: nothing
was received, so nothing can be duplicated toward the client. Errors are the tree in
``errors.py``; cancelling the caller's task while it waits aborts the connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httptools

from .errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .limits import UpstreamLimits

__all__ = ["PoolStats", "UpstreamPool", "UpstreamResponse"]

# Never forwarded toward the replica: connection-specific, or written by the pool itself.
_REQUEST_SKIP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"host",
        b"expect",
    }
)


class _Dead(Exception):
    """The connection died before any response byte: safe to send the request again."""


class _Stop(Exception):
    """Raised in a parser callback to stop parsing (the error is already on the response)."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    open: int  # connections alive (idle + in use)
    idle: int
    connects: int  # connections opened since the pool was made
    reuses: int  # requests sent on a pooled connection
    retries: int  # requests sent again after a pooled connection turned out dead


class UpstreamResponse:
    """One response from the replica: status and headers now, body as it arrives."""

    __slots__ = (
        "_body_waiter",
        "_complete",
        "_conn",
        "_error",
        "_head_bytes",
        "_head_only",
        "_headers_done",
        "_headers_waiter",
        "_pool",
        "_queue",
        "_queued",
        "_read_timeout",
        "_released",
        "bytes_received",
        "chunked",
        "content_length",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, pool: UpstreamPool, conn: _UpstreamConnection, head_only: bool, read_timeout: float | None) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.content_length: int | None = None
        self.keep_alive = False
        self.bytes_received = 0  # raw bytes of this response seen on the socket
        self._pool = pool
        self._conn = conn
        self._head_only = head_only
        self._read_timeout = read_timeout
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._complete = False
        self._error: UpstreamError | None = None
        self._released = False
        self._headers_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._head_bytes = 0
        self._headers_done = False

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} from {self._pool.origin}>"

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case bytes), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def complete(self) -> bool:
        """The whole body has been received (maybe not yet read)."""
        return self._complete

    @property
    def at_eof(self) -> bool:
        """The whole body has been received and read: the next ``read_chunk()`` returns b""."""
        return self._complete and not self._queue

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        t = self._conn.transport
        return default if t is None else t.get_extra_info(name, default)

    # -- reading --------------------------------------------------------------------------

    async def read_chunk(self) -> bytes:
        """The body bytes received since the last call (waiting for some), b"" at the end.

        Raises UpstreamTimeout if nothing arrives within the read timeout, UpstreamClosed if the
        replica closes mid-body; either way (and on cancellation) the connection is closed.
        """
        q = self._queue
        while not q:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            conn = self._conn
            fut = self._body_waiter = conn.loop.create_future()
            if self._read_timeout is not None:
                conn.set_deadline(fut, self._read_timeout, "next body chunk")
            try:
                await fut
            except BaseException:
                self.abort()
                raise
            finally:
                self._body_waiter = None
                conn.deadline_fut = None
        data = q.popleft() if len(q) == 1 else b"".join(q)
        q.clear()
        self._queued = 0
        conn = self._conn
        if conn.reading_paused:
            conn.reading_paused = False
            if not conn.closed:
                conn.transport.resume_reading()
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """``read_chunk()`` until the end of the body."""
        while True:
            chunk = await self.read_chunk()
            if not chunk:
                return
            yield chunk

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; UpstreamProtocolError if it grows beyond ``limit`` bytes."""
        parts = []
        n = 0
        while True:
            chunk = await self.read_chunk()
            if not chunk:
                return b"".join(parts)
            n += len(chunk)
            if limit is not None and n > limit:
                self.abort()
                raise UpstreamProtocolError(
                    f"{self._pool.origin}: response body over {limit} bytes", origin=self._pool.origin, bytes_received=n
                )
            parts.append(chunk)

    # -- finishing ------------------------------------------------------------------------

    async def release(self) -> None:
        """Give the connection back to the pool if the response is complete, else close it."""
        self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        conn = self._conn
        if conn.resp is self:
            conn.resp = None
        if self._complete and self.keep_alive and self._error is None and not conn.closed:
            self._pool._put_idle(conn)
        else:
            conn.close(abort=not self._complete)

    def abort(self) -> None:
        """Close the connection now (the replica sees the request abandoned)."""
        if self._error is None and not self._complete:
            self._error = UpstreamClosed(f"{self._pool.origin}: response aborted", origin=self._pool.origin)
        self._released = True
        conn = self._conn
        if conn.resp is self:
            conn.resp = None
        conn.close(abort=True)

    async def __aenter__(self) -> UpstreamResponse:  # noqa: PYI034 - no typing.Self on 3.10
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self._release()
        else:
            self.abort()

    # -- fed by the connection ------------------------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        if self._complete or self._error is not None:
            return
        self._error = error
        w = self._headers_waiter
        if w is not None and not w.done():
            w.set_exception(error)
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_exception(error)

    def _finish(self) -> None:
        self._complete = True
        w = self._headers_waiter
        if w is not None and not w.done():
            w.set_result(None)
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)


class _UpstreamConnection(asyncio.Protocol):
    """One TCP connection to the replica; parses the response of the request in flight."""

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.resp: UpstreamResponse | None = None
        self.closed = False
        self.reading_paused = False
        self.idle_since = 0.0
        self.lost_exc: BaseException | None = None
        # One lazily re-armed timer per connection: a deadline moved later costs assignments,
        # not a new uvloop timer (call_later + cancel is ~2 us, and streams wait once per chunk).
        self.deadline_fut: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._deadline_what = ""
        self._deadline_timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def set_deadline(self, fut: asyncio.Future[None], timeout: float, what: str) -> None:
        """Fail ``fut`` with UpstreamTimeout unless it is done within ``timeout`` seconds."""
        deadline = self.loop.time() + timeout
        self.deadline_fut = fut
        self._deadline = deadline
        self._deadline_what = what
        self._deadline_timeout = timeout
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        fut = self.deadline_fut
        if fut is None or fut.done() or self.closed:
            return
        if self.loop.time() + 0.001 < self._deadline:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self.deadline_fut = None
        resp = self.resp
        origin = self.pool.origin
        fut.set_exception(
            UpstreamTimeout(
                f"{origin}: no {self._deadline_what} within {self._deadline_timeout:g} s; "
                "the replica may be overloaded or stuck",
                origin=origin,
                bytes_received=0 if resp is None else resp.bytes_received,
            )
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover
                pass

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.lost_exc = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pool._forget(self)
        resp = self.resp
        if resp is None or resp._complete:
            return
        origin = self.pool.origin
        if resp.bytes_received == 0:
            err: Exception = _Dead(f"{exc}" if exc else "EOF")
            err.__cause__ = exc
            w = resp._headers_waiter
            if w is not None and not w.done():
                w.set_exception(err)
            else:
                resp._fail(UpstreamClosed(f"{origin}: connection closed before any response byte", origin=origin))
        elif not resp._headers_done:
            resp._fail(
                UpstreamClosed(
                    f"{origin}: connection closed in the middle of the response headers",
                    origin=origin,
                    bytes_received=resp.bytes_received,
                )
            )
        elif not resp.chunked and resp.content_length is None:
            resp.keep_alive = False
            resp._finish()  # a close-delimited body ends at EOF (httptools exposes no llhttp_finish)
        else:
            why = f" ({exc})" if exc else ""
            err = UpstreamClosed(
                f"{origin}: connection closed mid-body after {resp.bytes_received} bytes{why}",
                origin=origin,
                bytes_received=resp.bytes_received,
            )
            err.__cause__ = exc
            resp._fail(err)

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None or resp._complete or resp._error is not None:
            # Bytes nobody asked for (after a complete response, or while idle): not HTTP we trust.
            self.close(abort=True)
            return
        resp.bytes_received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if resp._error is None and not resp._complete:  # a bug of ours, not the replica's
                origin = self.pool.origin
                err = UpstreamProtocolError(f"{origin}: cannot process the response: {exc.__context__!r}", origin=origin)
                err.__cause__ = exc.__context__
                resp._fail(err)
            self.close(abort=True)
        except httptools.HttpParserUpgrade:
            origin = self.pool.origin
            resp._fail(UpstreamProtocolError(f"{origin}: replica switched protocols (101/upgrade)", origin=origin))
            self.close(abort=True)
        except httptools.HttpParserError as exc:
            origin = self.pool.origin
            err = UpstreamProtocolError(
                f"{origin}: malformed HTTP response: {exc}", origin=origin, bytes_received=resp.bytes_received
            )
            err.__cause__ = exc
            resp._fail(err)
            self.close(abort=True)
        else:
            if resp._head_only and resp._headers_done and not resp._complete:
                resp.keep_alive = False  # llhttp cannot be told the request was HEAD: do not reuse
                resp._finish()

    # parser callbacks (the response in flight is self.resp)

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        assert resp is not None
        resp._head_bytes += len(name) + len(value) + 4
        resp.headers.append((name.lower(), value))
        lim = self.pool.limits
        if resp._head_bytes > lim.max_header_bytes or len(resp.headers) > lim.max_headers:
            origin = self.pool.origin
            resp._fail(UpstreamProtocolError(f"{origin}: response header block over the limit", origin=origin))
            raise _Stop

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        if resp._headers_done:  # a second response to one request: not a replica we can trust
            origin = self.pool.origin
            resp.keep_alive = False
            resp._fail(UpstreamProtocolError(f"{origin}: unexpected bytes after the response", origin=origin))
            raise _Stop
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            resp.headers = []  # interim response (100 Continue, 103 Early Hints): wait for the final one
            resp._head_bytes = 0
            return
        resp.status = status
        resp.keep_alive = parser.should_keep_alive()
        for name, value in resp.headers:
            if name == b"transfer-encoding":
                resp.chunked = value.lower().rstrip().endswith(b"chunked")
            elif name == b"content-length":
                resp.content_length = int(value)
        resp._headers_done = True
        w = resp._headers_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        assert resp is not None
        resp._queue.append(body)
        resp._queued += len(body)
        if resp._queued > self.pool.limits.read_buffer_high and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        w = resp._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_message_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        if resp._headers_done:
            resp._finish()

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool._forget(self)
        if abort:
            self.transport.abort()
        else:
            self.transport.close()


class UpstreamPool:
    """Pooled keep-alive connections to one replica (``http://host:port``)."""

    def __init__(
        self,
        origin: str,
        *,
        max_idle: int = 64,
        connect_timeout: float = 3.0,
        idle_timeout: float = 4.0,
        limits: UpstreamLimits | None = None,
    ) -> None:
        """``idle_timeout`` closes connections idle longer than that; keep it below the replica's
        own keep-alive timeout (uvicorn's default, which vLLM uses, is 5 s)."""
        parts = urlsplit(origin)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream origin must look like http://host:port, got {origin!r}")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"upstream origin must not have a path or query, got {origin!r}")
        self.origin = origin.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.limits = limits if limits is not None else UpstreamLimits()
        self._host_line = b"host: %s\r\n" % parts.netloc.encode("idna")
        self._idle: list[_UpstreamConnection] = []  # LIFO: the warmest connection first
        self._conns: set[_UpstreamConnection] = set()
        self._closed = False
        self._connects = 0
        self._reuses = 0
        self._retries = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.origin} open={len(self._conns)} idle={len(self._idle)}>"

    def stats(self) -> PoolStats:
        return PoolStats(len(self._conns), len(self._idle), self._connects, self._reuses, self._retries)

    # -- requests -------------------------------------------------------------------------

    def _encode(self, method: bytes, path: bytes, headers: Iterable[tuple[bytes | str, bytes | str]], body: bytes) -> bytes:
        parts = [method + b" " + path + b" HTTP/1.1\r\n", self._host_line]
        for name, value in headers:
            if name.__class__ is str:
                name = name.encode("latin-1")  # type: ignore[union-attr]
            if value.__class__ is str:
                value = value.encode("latin-1")  # type: ignore[union-attr]
            if name.lower() in _REQUEST_SKIP:  # type: ignore[union-attr]
                continue
            parts.append(name + b": " + value + b"\r\n")  # type: ignore[operator]
        # a CR or LF inside a header would end it early (request splitting): every line holds
        # exactly one of each. Checked once over the block: ``x in bytes`` costs ~2K instructions
        # a test here (CPython first tries ``x`` as an int and formats a TypeError it drops)
        head = b"".join(parts)
        if head.count(b"\n") != len(parts) or head.count(b"\r") != len(parts):
            bad = next(x for x in parts if x.count(b"\n") != 1 or x.count(b"\r") != 1)
            raise ValueError(f"invalid request line or header: {bad!r}")
        if body or method not in (b"GET", b"HEAD"):
            return b"".join((head, b"content-length: %d\r\n\r\n" % len(body), body))
        return head + b"\r\n"

    async def request(
        self,
        method: str | bytes,
        path: str | bytes,
        headers: Iterable[tuple[bytes | str, bytes | str]] = (),
        body: bytes = b"",
        *,
        timeout_first_byte: float | None = None,
        read_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; return when the response's status line and headers are in.

        ``timeout_first_byte`` bounds the wait for the response headers (for a non-streaming
        completion that is the whole generation); ``read_timeout`` bounds each wait for the
        next body chunk. Connection-specific headers, ``host`` and ``content-length`` in
        ``headers`` are replaced by the pool's own.
        """
        if self._closed:
            raise UpstreamConnectError(f"{self.origin}: pool is closed", origin=self.origin)
        if method.__class__ is str:
            method = method.encode("ascii")  # type: ignore[union-attr]
        if path.__class__ is str:
            path = path.encode("latin-1")  # type: ignore[union-attr]
        # a space here; CR and LF anywhere in the head are refused by _encode (``find``, not ``in``: see there)
        if path.find(b" ") >= 0:  # type: ignore[union-attr]
            raise ValueError(f"invalid request path {path!r}")
        data = self._encode(method, path, headers, body)  # type: ignore[arg-type]
        head_only = method == b"HEAD"
        conn = self._take_idle()
        if conn is not None:
            self._reuses += 1
            try:
                return await self._exchange(conn, data, head_only, timeout_first_byte, read_timeout)
            except _Dead:
                self._retries += 1  # the replica had closed it while idle: once more, on a new one
        conn = await self._connect()
        try:
            return await self._exchange(conn, data, head_only, timeout_first_byte, read_timeout)
        except _Dead as exc:
            raise UpstreamConnectError(
                f"{self.origin}: connection closed before any response byte ({exc})", origin=self.origin
            ) from (exc.__cause__ or exc)

    async def _exchange(
        self,
        conn: _UpstreamConnection,
        data: bytes,
        head_only: bool,
        timeout_first_byte: float | None,
        read_timeout: float | None,
    ) -> UpstreamResponse:
        loop = conn.loop
        resp = UpstreamResponse(self, conn, head_only, read_timeout)
        conn.resp = resp
        fut = resp._headers_waiter = loop.create_future()
        try:
            conn.transport.write(data)
        except (OSError, RuntimeError) as exc:  # the transport died under us
            conn.close(abort=True)
            raise _Dead(exc) from exc
        if conn.closed:
            raise _Dead(conn.lost_exc or "closed")
        if timeout_first_byte is not None:
            conn.set_deadline(fut, timeout_first_byte, "response")
        try:
            await fut
        except _Dead:
            conn.resp = None
            raise
        except BaseException:
            resp._released = True
            conn.resp = None
            conn.close(abort=True)
            raise
        finally:
            resp._headers_waiter = None
            conn.deadline_fut = None
        return resp

    async def _connect(self) -> _UpstreamConnection:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _UpstreamConnection(self, loop), self.host, self.port),
                self.connect_timeout,
            )
        except asyncio.TimeoutError as exc:
            raise UpstreamConnectError(
                f"{self.origin}: connect timed out after {self.connect_timeout:g} s", origin=self.origin
            ) from exc
        except OSError as exc:  # refused, unreachable, reset, DNS (socket.gaierror)
            raise UpstreamConnectError(f"{self.origin}: cannot connect: {exc}", origin=self.origin) from exc
        if self._closed:
            conn.close(abort=True)
            raise UpstreamConnectError(f"{self.origin}: pool is closed", origin=self.origin)
        self._connects += 1
        self._conns.add(conn)
        return conn

    # -- pooling --------------------------------------------------------------------------

    def _take_idle(self) -> _UpstreamConnection | None:
        idle = self._idle
        if not idle:
            return None
        now = idle[-1].loop.time()
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport.is_closing():
                continue
            if now - conn.idle_since > self.idle_timeout:
                conn.close()
                continue
            return conn
        return None

    def _put_idle(self, conn: _UpstreamConnection) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        now = conn.loop.time()
        conn.idle_since = now
        idle = self._idle
        # The oldest sits at the bottom of the stack; drop it once stale so it does not linger.
        if idle and now - idle[0].idle_since > self.idle_timeout:
            idle.pop(0).close()
        idle.append(conn)

    def _forget(self, conn: _UpstreamConnection) -> None:
        self._conns.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    async def close(self) -> None:
        """Close every connection, idle or in use; later requests fail with UpstreamConnectError."""
        self._closed = True
        for conn in list(self._conns):
            conn.close(abort=conn.resp is not None)
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost
