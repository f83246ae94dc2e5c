"""Errors of the HTTP layer, and OpenAI's error JSON.

Exception tree (each upstream class carries the status and OpenAI error ``type`` the balancer
answers with when it gives up; ``raise ... from`` keeps the socket-level cause)::

    HTTPLayerError
    ├── ClientDisconnected        the client went away (also a ConnectionResetError); answer nothing
    └── UpstreamError             502 upstream_error
        ├── UpstreamConnectError  502  refused, reset, DNS failure, connect timeout, or the replica
        │                              closed the connection before sending any response byte
        ├── UpstreamTimeout       504  no response (status line + headers) in time, or no next
        │                              body chunk within the read timeout
        ├── UpstreamProtocolError 502  the replica sent something that is not HTTP/1.1
        └── UpstreamClosed        502  EOF or reset after the response had begun, before its end

``bytes_received`` on an UpstreamError says whether the replica had answered anything: 0 means
the request can be sent elsewhere without the client noticing (if nothing reached the client).
"""

from __future__ import annotations

import orjson

__all__ = [
    "ClientDisconnected",
    "HTTPLayerError",
    "UpstreamClosed",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "default_error_type",
    "error_body",
]


class HTTPLayerError(Exception):
    """Base of every error this package raises on purpose."""


class ClientDisconnected(HTTPLayerError, ConnectionResetError):
    """The client closed its connection; writing to it is pointless."""


class UpstreamError(HTTPLayerError):
    """The replica could not give a complete response."""

    status = 502
    error_type = "upstream_error"

    def __init__(self, message: str, *, origin: str = "", bytes_received: int = 0) -> None:
        super().__init__(message)
        self.origin = origin
        self.bytes_received = bytes_received


class UpstreamConnectError(UpstreamError):
    """No usable connection: refused, reset, DNS, connect timeout, closed before answering."""


class UpstreamTimeout(UpstreamError):
    """The replica did not answer (or send the next chunk) within the timeout."""

    status = 504
    error_type = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    """The replica's bytes are not a valid HTTP/1.1 response."""


class UpstreamClosed(UpstreamError):
    """The replica closed the connection in the middle of a response."""


_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


def default_error_type(status: int) -> str:
    """The OpenAI error ``type`` used for a status when the caller names none."""
    t = _TYPES.get(status)
    if t is not None:
        return t
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(status: int, message: str, type: str | None = None) -> bytes:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param": null, "code": status}}``."""
    return orjson.dumps(
        {"error": {"message": message, "type": type or default_error_type(status), "param": None, "code": status}}
    )
