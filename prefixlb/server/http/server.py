"""The client-facing HTTP/1.1 server: one asyncio Protocol per connection, httptools parsing.

``HTTPServer(handler, limits=...)`` calls ``await handler(request)`` once per request, with the
whole body already read. Requests on one connection are handled strictly in order: a pipelined
request waits until the response before it is complete. The handler answers through the
request: ``respond()`` for a complete response, or ``start()`` for a ``ResponseStream``.

Response state machine (``Request.prepared`` is the retry boundary of the proxy)::

    NEW ──respond()──────────────────────────▶ DONE
     └──start()──▶ STARTED ──write()*──end()──▶ DONE
                  (prepared: status and headers fixed)

The server answers by itself, in OpenAI's error JSON and then closing the connection: 400 for
bytes that are not HTTP/1.1, 408 when a request takes longer than ``request_timeout`` to
arrive, 413 for a body over ``max_body_bytes``, 431 for a header block over
``max_header_bytes`` or ``max_headers``, 500 when the handler raises before responding.

A client that goes away mid-request resolves ``request.disconnected``; then, on the next loop
iteration (after the handler could see the future), the handler task is cancelled so upstream
work is abandoned and ``finally:`` blocks run. A client's EOF (half-close) counts as going away.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import Any

import httptools

from .errors import ClientDisconnected, error_body
from .limits import Limits
from .wire import (
    CONTINUE_100,
    LAST_CHUNK,
    Headers,
    chunk_frame,
    header_lines,
    status_line,
)

__all__ = ["HTTPServer", "Handler", "Request", "ResponseStream"]

_log = logging.getLogger("prefixlb.server.http")

Handler = Callable[["Request"], Awaitable[None]]

_NEW, _STARTED, _DONE = 0, 1, 2
_T_NONE, _T_IDLE, _T_REQUEST, _T_LINGER = 0, 1, 2, 3
_BIG = 16 * 1024  # above this, write pieces with writelines (one writev) instead of joining
_NO_BODY_STATUS = frozenset({204, 304})
_JSON = (b"content-type", b"application/json")


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the status is on the connection."""


class Request:
    """One HTTP request, fully received, and the way to answer it.

    ``headers`` keeps the order and repetitions of the wire, names lower-cased bytes.
    ``path`` is the raw request path (percent-escapes kept), ``query`` the raw query bytes
    (no ``?``), ``received_at`` the ``perf_counter_ns()`` of the request's first byte.
    """

    __slots__ = (
        "_conn",
        "_disconnected",
        "_gone",
        "_state",
        "_task",
        "body",
        "client",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "path",
        "query",
        "received_at",
        "target",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        http_version: str,
        keep_alive: bool,
        received_at: int,
    ) -> None:
        self._conn = conn
        self.method = method
        self.target = target
        if target[:1] == b"/":
            j = target.find(b"#")  # a fragment is not part of a request target; llhttp lets it through
            if j >= 0:
                target = target[:j]
            i = target.find(b"?")
            if i < 0:
                path, query = target, b""
            else:
                path, query = target[:i], target[i + 1 :]
        else:  # absolute-form ("http://host/p?q") or "*"
            try:
                url = httptools.parse_url(target)
                path, query = url.path or b"/", url.query or b""
            except httptools.HttpParserInvalidURLError:
                path, query = target, b""
        self.path = path.decode("latin-1")
        self.query = query
        self.headers = headers
        self.body = body
        self.client = conn.client
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.received_at = received_at
        self._state = _NEW
        self._gone = False
        self._disconnected: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target!r} from {self.client}>"

    def header(self, name: bytes | str) -> bytes | None:
        """The first value of header ``name`` (any case), or None."""
        if name.__class__ is str:
            name = name.encode("latin-1")  # type: ignore[union-attr]
        name = name.lower()  # type: ignore[assignment]
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def prepared(self) -> bool:
        """True once the status and headers are committed (``start()`` or ``respond()`` called)."""
        return self._state != _NEW

    @property
    def finished(self) -> bool:
        """True once the whole response has been handed to the transport."""
        return self._state == _DONE

    @property
    def is_disconnected(self) -> bool:
        """True once the client has gone away before the response was complete."""
        return self._gone

    @property
    def disconnected(self) -> asyncio.Future[None]:
        """A future resolved when the client goes away before the response is complete."""
        fut = self._disconnected
        if fut is None:
            fut = self._disconnected = self._conn.loop.create_future()
            if self._gone:
                fut.set_result(None)
        return fut

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The connection transport's ``get_extra_info`` (``socket``, ``peername``, ...)."""
        t = self._conn.transport
        return default if t is None else t.get_extra_info(name, default)

    def _mark_gone(self) -> None:
        self._gone = True
        fut = self._disconnected
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- responding -----------------------------------------------------------------------

    def respond(self, status: int, headers: Headers = (), body: bytes = b"", lines: bytes = b"") -> None:
        """Send a complete response; ``content-length`` is set from ``body``.

        ``lines``: more header lines, already rendered and checked (``render_header_lines``),
        written after ``headers`` (what the proxy adds to every answer, built once instead of
        per request). Raises RuntimeError if a response was already started,
        ClientDisconnected if the client is gone. Framing headers given by the caller are
        ignored.
        """
        if self._state != _NEW:
            raise RuntimeError(f"response already {'started' if self._state == _STARTED else 'sent'}")
        conn = self._conn
        if conn.closed:
            self._state = _DONE
            raise ClientDisconnected("client disconnected before the response")
        no_body = status in _NO_BODY_STATUS or status < 200
        parts = [status_line(status)]
        header_lines(headers, parts)  # may raise ValueError: the state is still NEW then
        if lines:
            parts.append(lines)
        self._state = _DONE
        if not no_body:
            parts.append(b"content-length: %d\r\n" % len(body))
        keep_alive = self.keep_alive and not conn.closing
        conn.add_connection_header(parts, self, keep_alive)
        parts.append(b"\r\n")
        transport = conn.transport
        if no_body or not body or self.method == "HEAD":
            transport.write(b"".join(parts))
        elif len(body) > _BIG:
            parts_head = b"".join(parts)
            transport.writelines((parts_head, body))
        else:
            parts.append(body)
            transport.write(b"".join(parts))
        conn.response_complete(self, keep_alive)

    def respond_json(self, status: int, body: bytes, headers: Headers = ()) -> None:
        """``respond()`` with ``content-type: application/json`` and an already-encoded body."""
        self.respond(status, (_JSON, *headers), body)

    def respond_error(self, status: int, message: str, type: str | None = None, headers: Headers = ()) -> None:
        """``respond()`` with OpenAI's error JSON (see ``error_body``)."""
        self.respond(status, (_JSON, *headers), error_body(status, message, type))

    def abort(self) -> None:
        """Give up on the response: close the connection after whatever was already written.

        The client sees a truncated response (no final chunk, short of its content-length, or
        none at all): the honest report of a replica failing mid-stream, once ``prepared``.
        A no-op once the response is finished.
        """
        if self._state == _DONE:
            return
        self._state = _DONE
        conn = self._conn
        conn.closing = True
        if not conn.closed:
            conn.transport.close()

    def start(self, status: int, headers: Headers = (), *, content_length: int | None = None,
              lines: bytes = b"") -> ResponseStream:
        """Commit status and headers and return the stream that writes the body.

        Nothing is sent yet: the header block goes out with the first body bytes (one
        ``transport.write``), or on ``send_headers()``/``end()``. Without ``content_length``
        (argument or header) the body is sent chunked (HTTP/1.1) or close-delimited (HTTP/1.0).
        ``lines`` as in ``respond()``.
        """
        if self._state != _NEW:
            raise RuntimeError(f"response already {'started' if self._state == _STARTED else 'sent'}")
        conn = self._conn
        if conn.closed:
            self._state = _DONE
            raise ClientDisconnected("client disconnected before the response")
        parts = [status_line(status)]
        given = header_lines(headers, parts)
        if lines:
            parts.append(lines)
        if content_length is None:
            content_length = given
        no_body = status in _NO_BODY_STATUS or status < 200 or self.method == "HEAD"
        chunked = False
        keep_alive = self.keep_alive and not conn.closing
        if content_length is not None:
            if content_length < 0:
                raise ValueError(f"content_length must be >= 0, got {content_length}")
            parts.append(b"content-length: %d\r\n" % content_length)
        elif status in _NO_BODY_STATUS or status < 200:
            pass
        elif self.http_version == "1.1":
            chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        conn.add_connection_header(parts, self, keep_alive)
        parts.append(b"\r\n")
        self._state = _STARTED
        return ResponseStream(self, b"".join(parts), chunked, None if no_body else content_length, no_body, keep_alive)


class ResponseStream:
    """The body of a started response. ``write()`` waits while the client is slow to read."""

    __slots__ = ("_chunked", "_conn", "_head", "_keep_alive", "_no_body", "_remaining", "_req", "bytes_written")

    def __init__(
        self, req: Request, head: bytes, chunked: bool, content_length: int | None, no_body: bool, keep_alive: bool
    ) -> None:
        self._req = req
        self._conn = req._conn
        self._head: bytes | None = head
        self._chunked = chunked
        self._remaining = content_length
        self._no_body = no_body
        self._keep_alive = keep_alive
        self.bytes_written = 0  # body bytes, before chunk framing

    @property
    def ended(self) -> bool:
        return self._req._state == _DONE

    @property
    def headers_sent(self) -> bool:
        return self._head is None

    @property
    def buffered_bytes(self) -> int:
        """Bytes handed to the transport but not yet sent to the client."""
        t = self._conn.transport
        return 0 if self._conn.closed else t.get_write_buffer_size()

    def _frame(self, data: bytes) -> tuple[bytes, ...]:
        n = len(data)
        rem = self._remaining
        if rem is not None:
            if n > rem:
                raise RuntimeError(f"body longer than its content-length ({n} bytes written, {rem} left)")
            self._remaining = rem - n
        self.bytes_written += n
        if self._no_body:
            return ()
        if self._chunked:
            if n > _BIG:
                return (b"%x\r\n" % n, data, b"\r\n")
            return (chunk_frame(data),)
        return (data,)

    def _send(self, pieces: tuple[bytes, ...]) -> None:
        head = self._head
        transport = self._conn.transport
        if head is not None:
            self._head = None
            pieces = (head, *pieces)
        if not pieces:
            return
        if len(pieces) == 1:
            transport.write(pieces[0])
        elif sum(map(len, pieces)) <= _BIG:
            transport.write(b"".join(pieces))
        else:
            transport.writelines(pieces)

    async def write(self, data: bytes) -> None:
        """Send ``data`` as body bytes now; wait while the transport's buffer is over the limit.

        Raises ClientDisconnected if the client is gone, RuntimeError after ``end()``.
        """
        req = self._req
        if req._state != _STARTED:
            raise RuntimeError("write() after end()")
        conn = self._conn
        if conn.closed:
            raise ClientDisconnected("client disconnected during the response")
        if data:
            self._send(self._frame(data))
        if conn.write_paused:
            await conn.drain()

    async def send_headers(self) -> None:
        """Send the status line and headers now, without waiting for body bytes."""
        if self._head is not None:
            if self._conn.closed:
                raise ClientDisconnected("client disconnected during the response")
            self._send(())

    def abort(self) -> None:
        """``Request.abort()``: close the connection after what was already written."""
        self._req.abort()

    async def end(self, data: bytes = b"") -> None:
        """Send the last ``data`` and finish the response (idempotent once ended).

        A fixed-length body that is short of its ``content-length`` is truncated: the connection
        is closed so the client can tell.
        """
        req = self._req
        if req._state == _DONE:
            return
        conn = self._conn
        if conn.closed:
            req._state = _DONE
            raise ClientDisconnected("client disconnected during the response")
        pieces = self._frame(data) if data else ()
        if self._chunked:
            pieces = (*pieces, LAST_CHUNK)
        keep_alive = self._keep_alive
        if self._remaining and not self._no_body:
            _log.warning("%r: response ended %d bytes short of its content-length", req, self._remaining)
            keep_alive = False
        self._send(pieces)
        req._state = _DONE
        conn.response_complete(req, keep_alive)


class _Connection(asyncio.Protocol):
    """One client connection: parser callbacks, the request queue, timers, flow control."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self._handler = server.handler
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: Any = None
        self._parser = httptools.HttpRequestParser(self)
        # connection state
        self.closed = False  # connection_lost seen
        self.closing = False  # finish the response in flight, then close (server shutdown)
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._current: Request | None = None
        self._pipeline: deque[Request] = deque()
        self._reading_paused = False
        self._rejected: tuple[int, str] | None = None  # error answer pending; parsing stopped
        self._reject_sent = False
        self._continue_pending = False
        # request being parsed
        self._in_message = False
        self._headers_done = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._raw_head = 0
        self._body: list[bytes] = []
        self._body_len = 0
        self._received_at = 0
        self._expect_continue = False
        self._content_length = -1
        self._method = ""
        self._version = "1.1"
        self._keep_alive = True
        # one lazily re-armed timer per connection (see _arm)
        self._deadline_kind = _T_NONE
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- transport callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Without it a small SSE event waits for the client's delayed ACK (~40 ms).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - platform without TCP_NODELAY
                pass
        self.client = transport.get_extra_info("peername")
        lim = self.limits
        self.transport.set_write_buffer_limits(high=lim.write_buffer_high, low=lim.write_buffer_low)
        self.server._connection_made(self)
        if self.server.closing:
            self.closing = True
            transport.close()
            return
        self._arm(_T_IDLE, lim.keep_alive_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._deadline_kind = _T_NONE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server._connection_lost(self)
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(ClientDisconnected("client disconnected while the response was being written"))
        self._pipeline.clear()
        req = self._current
        self._current = None
        if req is not None and req._state != _DONE:
            req._mark_gone()
            task = req._task
            if task is not None and self.server.cancel_on_disconnect:
                # call_soon: wakeups from `disconnected` are queued first, so the handler sees
                # the disconnect before it is cancelled.
                self.loop.call_soon(_cancel_task, task)

    def eof_received(self) -> bool:
        return False  # half-close = the client is gone; let the transport close

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        if self.closed:
            raise ClientDisconnected("client disconnected while the response was being written")
        if not self.write_paused:
            return
        w = self.loop.create_future()
        self._drain_waiters.append(w)
        await w

    def data_received(self, data: bytes) -> None:
        if self._rejected is not None:
            return  # lingering after an error answer: discard
        was_in_head = self._in_message and not self._headers_done
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if self._rejected is None:
                _log.error("HTTP parser callback failed on %s", self.client, exc_info=exc.__context__ or exc)
                self._reject(500, "internal error while reading the request")
            return
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed HTTP request: {exc}")
            return
        if was_in_head and self._in_message and not self._headers_done:
            # llhttp buffers a header inside httptools until it is complete: bound the raw bytes.
            self._raw_head += len(data)
            if self._raw_head > self.limits.max_header_bytes:
                self._reject(431, f"request header block over {self.limits.max_header_bytes} bytes")

    # -- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._headers_done = False
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._raw_head = 0
        self._body = []
        self._body_len = 0
        self._expect_continue = False
        self._content_length = -1
        self._received_at = perf_counter_ns()
        self._arm(_T_REQUEST, self.limits.request_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_header_bytes:
            self._stop(431, f"request line over {self.limits.max_header_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._head_bytes += len(name) + len(value) + 4
        headers = self._headers
        headers.append((name, value))
        lim = self.limits
        if self._head_bytes > lim.max_header_bytes:
            self._stop(431, f"request header block over {lim.max_header_bytes} bytes")
        if len(headers) > lim.max_headers:
            self._stop(431, f"more than {lim.max_headers} request headers")
        if name == b"content-length":
            self._content_length = int(value)  # llhttp has checked the digits and refused duplicates
        elif name == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True

    def on_headers_complete(self) -> None:
        self._headers_done = True
        parser = self._parser
        self._method = parser.get_method().decode("ascii")
        self._version = parser.get_http_version()
        self._keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():
            # llhttp stops parsing at an upgrade (body included); serving it would need a second parser.
            self._stop(400, "protocol upgrades (Upgrade/CONNECT) are not supported; send plain HTTP/1.1")
        if self._content_length > self.limits.max_body_bytes:
            self._stop(413, f"request body over {self.limits.max_body_bytes} bytes")
        if self._expect_continue and self._version == "1.1":
            self._continue_pending = True
            if self._current is None and not self._pipeline:
                self._send_continue()

    def on_body(self, body: bytes) -> None:
        n = self._body_len + len(body)
        if n > self.limits.max_body_bytes:
            self._stop(413, f"request body over {self.limits.max_body_bytes} bytes")
        self._body_len = n
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._continue_pending = False
        parts = self._body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._body = []
        req = Request(
            self, self._method, self._url, self._headers, body, self._version, self._keep_alive, self._received_at
        )
        self._deadline_kind = _T_NONE
        if self._current is None:
            self._start(req)
        else:
            self._pipeline.append(req)
            if len(self._pipeline) >= self.limits.max_pipelined and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()

    # -- request dispatch -----------------------------------------------------------------

    def _start(self, req: Request) -> None:
        self._current = req
        task = self.loop.create_task(self._run(req))
        req._task = task
        self.server.tasks.add(task)

    async def _run(self, req: Request) -> None:
        try:
            await self._handler(req)
        except asyncio.CancelledError:
            if req._state != _DONE and not self.closed:
                self.transport.close()  # cancelled by shutdown: nothing sensible to send
        except ClientDisconnected:
            pass
        except Exception:  # noqa: BLE001 - any handler bug becomes a 500, never a dead connection
            _log.exception("handler failed on %r", req)
            if self.closed:
                pass
            elif req._state == _NEW:
                req.respond_error(500, "internal error in the balancer", "server_error")
            elif req._state == _STARTED:
                self.transport.close()  # the client sees a truncated response
        else:
            if req._state == _NEW and not self.closed:
                _log.error("handler returned without responding to %r", req)
                req.respond_error(500, "internal error in the balancer: no response", "server_error")
            elif req._state == _STARTED and not self.closed:
                _log.error("handler returned without ending the response to %r", req)
                self.transport.close()
        finally:
            server = self.server
            server.tasks.discard(req._task)  # type: ignore[arg-type]
            if server.closing:
                server._maybe_idle()

    def add_connection_header(self, parts: list[bytes], req: Request, keep_alive: bool) -> None:
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        elif req.http_version == "1.0":
            parts.append(b"connection: keep-alive\r\n")

    def response_complete(self, req: Request, keep_alive: bool) -> None:
        """The last byte of ``req``'s response is in the transport: move on to the next one."""
        if self._current is req:
            self._current = None
        if self.closed:
            return
        if not keep_alive or self.closing:
            self.transport.close()
            return
        if self._pipeline:
            nxt = self._pipeline.popleft()
            if self._reading_paused and len(self._pipeline) < self.limits.max_pipelined:
                self._reading_paused = False
                self.transport.resume_reading()
            self._start(nxt)
            return
        if self._rejected is not None:
            self._send_reject()
            return
        if self._continue_pending:
            self._send_continue()
        if not self._in_message:
            self._arm(_T_IDLE, self.limits.keep_alive_timeout)

    def _send_continue(self) -> None:
        self._continue_pending = False
        self.transport.write(CONTINUE_100)

    # -- errors the server answers itself -------------------------------------------------

    def _stop(self, status: int, message: str) -> None:
        """From a parser callback: answer ``status`` and stop parsing this connection."""
        self._reject(status, message)
        raise _Reject(message)

    def _reject(self, status: int, message: str) -> None:
        if self._rejected is not None:
            return
        self._rejected = (status, message)
        self._deadline_kind = _T_NONE
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()  # keep reading (and discarding) until close
        if self._current is None and not self._pipeline:
            self._send_reject()
        # else: answered after the responses already owed on this connection

    def _send_reject(self) -> None:
        if self._reject_sent or self.closed or self._rejected is None:
            return
        self._reject_sent = True
        status, message = self._rejected
        body = error_body(status, message)
        self.transport.write(
            b"%scontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b"
            % (status_line(status), len(body), body)
        )
        # Lingering close: stop writing, keep reading a while, so the client reads this answer
        # instead of a reset caused by its unread request bytes.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm(_T_LINGER, self.limits.linger_timeout)

    # -- timers ---------------------------------------------------------------------------

    def _arm(self, kind: int, timeout: float) -> None:
        # A timer is re-armed lazily: moving a deadline later costs two assignments, and the
        # handle fires at most once per expiry of the earliest deadline set.
        deadline = self.loop.time() + timeout
        self._deadline_kind = kind
        self._deadline = deadline
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._deadline_kind
        if kind == _T_NONE or self.closed:
            return
        if self.loop.time() + 0.001 < self._deadline:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._deadline_kind = _T_NONE
        if kind == _T_REQUEST:
            self._reject(408, f"request not received within {self.limits.request_timeout:g} s")
        else:  # idle keep-alive, or the linger after an error answer
            self.transport.close()

    # -- shutdown -------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop taking requests: close now if idle, else after the response in flight."""
        self.closing = True
        if self._current is None and not self._pipeline and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        req = self._current
        if req is not None and req._task is not None:
            req._task.cancel()
        if not self.closed:
            self.transport.abort()


def _cancel_task(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()


class HTTPServer:
    """HTTP/1.1 server for the request path. ``handler(request)`` is awaited once per request."""

    def __init__(self, handler: Handler, *, limits: Limits | None = None, cancel_on_disconnect: bool = True) -> None:
        self.handler = handler
        self.limits = limits if limits is not None else Limits()
        self.cancel_on_disconnect = cancel_on_disconnect
        self.closing = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # handlers running, incl. after their response
        self._idle_waiter: asyncio.Future[None] | None = None

    async def serve(
        self,
        host: str | None = "127.0.0.1",
        port: int = 0,
        *,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
        backlog: int = 1024,
        ssl: Any = None,
    ) -> asyncio.Server:
        """Start listening (``port=0``: an ephemeral port, see ``port``); returns the asyncio.Server.
        ``ssl``: an ``ssl.SSLContext`` to serve HTTPS."""
        if self._server is not None:
            raise RuntimeError("HTTPServer.serve() called twice")
        self.loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=backlog,
                                                         ssl=ssl)
        else:
            self._server = await self.loop.create_server(
                lambda: _Connection(self), host, port, reuse_port=reuse_port or None, backlog=backlog, ssl=ssl
            )
        return self._server

    @property
    def port(self) -> int:
        """The port of the first listening socket."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("HTTPServer is not serving")
        return self._server.sockets[0].getsockname()[1]

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _connection_made(self, conn: _Connection) -> None:
        self._connections.add(conn)

    def _connection_lost(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        w = self._idle_waiter
        if w is not None and not self._connections and not self.tasks and not w.done():
            w.set_result(None)

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, close idle connections, let requests in flight finish.

        After ``drain_timeout`` seconds, remaining handlers are cancelled and their connections
        aborted. Handler tasks still running after their response (feedback work) are awaited
        within the same deadline.
        """
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.shutdown()
        if self._connections or self.tasks:
            self._idle_waiter = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._idle_waiter), drain_timeout)
            except asyncio.TimeoutError:
                pass
        for conn in list(self._connections):
            conn.abort()
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:  # pragma: no cover - a transport that will not close
                _log.warning("HTTPServer.close: listening socket did not close within 1 s")
