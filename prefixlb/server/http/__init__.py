"""HTTP/1.1 machinery of the request path: uvloop protocols with httptools parsers.

No routing here: a server that hands each request to a handler, a pool of keep-alive
connections to one replica, and the helper that streams a replica's response to the client.

- ``HTTPServer(handler, limits=Limits())``, ``await server.serve(host, port)``,
  ``await server.close(drain_timeout)``; the handler gets a ``Request`` and answers with
  ``request.respond(...)`` or ``stream = request.start(...)``, ``await stream.write(...)``,
  ``await stream.end()``.
- ``UpstreamPool("http://host:port")``, ``resp = await pool.request(...)``,
  ``resp.read_chunk()`` / ``resp.iter_chunks()``, ``await resp.release()`` / ``resp.abort()``.
- ``relay(request, resp)``: the replica's response to the client, byte for byte, as it arrives.
- ``error_body(status, message, type)``: OpenAI's error JSON; the exception tree is in
  ``errors.py``.

Measured costs and the reasons for leaving aiohttp on this path: ``../shared/overhead.md`` and
``benchmarks/bench_proxy_core.py``.
"""

from __future__ import annotations

from .errors import (
    ClientDisconnected,
    HTTPLayerError,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    default_error_type,
    error_body,
)
from .limits import Limits, UpstreamLimits
from .relay import relay, relay_body
from .server import Handler, HTTPServer, Request, ResponseStream
from .upstream import PoolStats, UpstreamPool, UpstreamResponse
from .wire import HOP_BY_HOP, end_to_end, render_header_lines

__all__ = [
    "HOP_BY_HOP",
    "ClientDisconnected",
    "HTTPLayerError",
    "HTTPServer",
    "Handler",
    "Limits",
    "PoolStats",
    "Request",
    "ResponseStream",
    "UpstreamClosed",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamLimits",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "default_error_type",
    "end_to_end",
    "error_body",
    "relay",
    "relay_body",
    "render_header_lines",
]
