"""Streaming an upstream response to the client: same bytes, chunk by chunk, nothing buffered.

``relay_body(resp, stream)`` writes each piece the replica sent as soon as it arrived (pieces
already queued when the client side is ready go out together, in one write); the body bytes
are equal to the replica's. The framing toward the client is the stream's own: chunked unless
a content-length is known.

``relay(request, resp)`` is the whole response: status, end-to-end headers plus extras, body,
then the upstream connection released (or aborted on any failure, so the replica stops work).
"""

from __future__ import annotations

from collections.abc import Iterable

from .server import Request, ResponseStream
from .upstream import UpstreamResponse
from .wire import end_to_end

__all__ = ["relay", "relay_body"]


async def relay_body(resp: UpstreamResponse, stream: ResponseStream) -> int:
    """Copy the upstream body to ``stream`` as it arrives and end the stream; returns body bytes.

    The last piece is written together with the end of the response (one write). Upstream
    errors (UpstreamTimeout, UpstreamClosed, ...) and ClientDisconnected propagate; the caller
    decides what to do with the upstream connection.
    """
    n = 0
    while True:
        chunk = await resp.read_chunk()
        if not chunk:
            await stream.end()
            return n
        n += len(chunk)
        if resp.at_eof:
            await stream.end(chunk)
            return n
        await stream.write(chunk)


async def relay(
    request: Request,
    resp: UpstreamResponse,
    *,
    headers: Iterable[tuple[bytes | str, bytes | str]] = (),
    drop_headers: frozenset[bytes] = frozenset(),
) -> int:
    """Answer ``request`` with ``resp``: status, end-to-end headers + ``headers``, body; returns body bytes.

    The upstream connection goes back to the pool when the body is complete; on any exception
    (client gone, upstream failure, cancellation) it is aborted and the exception propagates.
    An upstream failure after the client response started also truncates the client response
    (``request.abort()``): past the retry boundary that is the only honest signal left.
    A content-length from the replica is kept; otherwise the client gets chunked encoding.
    """
    try:
        out = end_to_end(resp.headers, drop=drop_headers)
        out.extend(headers)  # type: ignore[arg-type]
        stream = request.start(resp.status, out, content_length=None if resp.chunked else resp.content_length)
        n = await relay_body(resp, stream)
    except BaseException:
        resp.abort()
        if request.prepared:
            request.abort()
        raise
    await resp.release()
    return n
