"""Limits and timeouts of the HTTP layer: one frozen value per side (client-facing, upstream)."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Limits", "UpstreamLimits"]


def _check_positive(obj: object) -> None:
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{f.name}: must be a positive number, got {value!r}")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client connection may cost the server.

    Sizes are bytes, times seconds. ``request_timeout`` runs from a request's first byte to its
    last (slow-loris bound, answered 408); ``keep_alive_timeout`` closes a connection idle
    between requests; ``linger_timeout`` bounds how long the server keeps reading (and
    discarding) after an error response before it closes, so the client can read the error
    instead of a reset.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 32 * 1024  # request line + header names and values
    max_headers: int = 100
    request_timeout: float = 30.0
    keep_alive_timeout: float = 75.0
    linger_timeout: float = 2.0
    write_buffer_high: int = 256 * 1024  # a stream write awaits above this many unsent bytes
    write_buffer_low: int = 64 * 1024
    max_pipelined: int = 16  # complete requests queued behind the one in flight; reading pauses beyond

    def __post_init__(self) -> None:
        _check_positive(self)
        if self.write_buffer_low > self.write_buffer_high:
            raise ValueError("Limits.write_buffer_low: must be <= write_buffer_high")


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """What one upstream response may cost the balancer.

    ``read_buffer_high``: body bytes received but not yet consumed above which the pool stops
    reading from the replica (TCP backpressure toward it); reading resumes once the consumer
    has taken what was queued.
    """

    max_header_bytes: int = 64 * 1024
    max_headers: int = 200
    read_buffer_high: int = 256 * 1024

    def __post_init__(self) -> None:
        _check_positive(self)
