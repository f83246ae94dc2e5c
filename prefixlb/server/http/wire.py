"""HTTP/1.1 bytes on the wire: status lines, header blocks, chunk framing, hop-by-hop headers.

Parsing is httptools' job; this module only writes. Header names and values are ``bytes``
(``str`` is accepted and encoded as latin-1). A value or name containing CR or LF is refused
(``ValueError``): it would let a caller split the response.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

__all__ = [
    "FRAMING_HEADERS",
    "HOP_BY_HOP",
    "LAST_CHUNK",
    "Headers",
    "chunk_frame",
    "end_to_end",
    "header_lines",
    "render_header_lines",
    "status_line",
]

Headers = Iterable[tuple[bytes | str, bytes | str]]

LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# Headers the server writes itself from the response's framing; a caller's copy is dropped.
FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})

# RFC 9110 §7.6.1 connection-specific headers: never forwarded by a proxy, in either direction.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def _status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {code} {phrase}\r\n".encode("latin-1")


_STATUS_LINES = {code: _status_line(code) for code in range(100, 600)}


def status_line(code: int) -> bytes:
    """``HTTP/1.1 <code> <phrase>\\r\\n``; codes outside 100-599 are refused."""
    line = _STATUS_LINES.get(code)
    if line is None:
        raise ValueError(f"HTTP status must be an int in 100..599, got {code!r}")
    return line


# header name -> 0 (written), 1 (a framing header: dropped), 2 (content-length: dropped, its
# value returned); names already checked, for the default ``skip`` only. Bounded: a peer that
# sends ever-new header names only makes the check run again for them.
_NAME_KIND: dict[bytes, int] = {}
_NAME_KIND_MAX = 4096


def _name_kind(name: bytes, skip: frozenset[bytes]) -> int:
    """Check a header name (not empty, no colon, CR or LF) and classify it against ``skip``."""
    if not name or b":" in name or b"\r" in name or b"\n" in name:
        raise ValueError(f"invalid response header name {name!r}")
    lname = name.lower()
    kind = (2 if lname == b"content-length" else 1) if lname in skip else 0
    if skip is FRAMING_HEADERS and len(_NAME_KIND) < _NAME_KIND_MAX:
        _NAME_KIND[name] = kind
    return kind


def header_lines(headers: Headers, out: list[bytes], skip: frozenset[bytes] = FRAMING_HEADERS) -> int | None:
    """Append ``name: value\r\n`` lines to ``out``, dropping names in ``skip``.

    Returns the value of a ``content-length`` header if the caller gave one (it is dropped from
    the lines either way: the framing is written by whoever owns it), else None. Raises
    ValueError, with ``out`` as it was, for an empty name, a colon in a name, or CR or LF
    anywhere (checked once over the lines written: each must hold exactly one CR and one LF).
    """
    content_length = None
    start = len(out)
    append = out.append
    known = _NAME_KIND if skip is FRAMING_HEADERS else {}
    try:
        for name, value in headers:
            if name.__class__ is not bytes:
                name = name.encode("latin-1")  # type: ignore[union-attr]
            if value.__class__ is not bytes:
                value = value.encode("latin-1")  # type: ignore[union-attr]
            kind = known.get(name)  # type: ignore[arg-type]
            if kind is None:
                kind = _name_kind(name, skip)  # type: ignore[arg-type]
            if kind:
                if kind == 2:
                    content_length = int(value)
                continue
            append(name + b": " + value + b"\r\n")  # type: ignore[operator]
        k = len(out) - start
        if k:
            block = b"".join(out[start:])
            if block.count(b"\n") != k or block.count(b"\r") != k:
                bad = next(x for x in out[start:] if x.count(b"\n") != 1 or x.count(b"\r") != 1)
                name, _, value = bad[:-2].partition(b": ")
                raise ValueError(f"invalid response header {name!r}: {value!r}")
    except BaseException:
        del out[start:]
        raise
    return content_length


def render_header_lines(headers: Headers) -> bytes:
    """``headers`` as the lines ``header_lines`` writes for them, joined: a ``lines=`` argument
    of ``Request.respond``/``start`` built once and sent with many responses. Raises ValueError
    as ``header_lines`` does (framing headers are dropped as there)."""
    out: list[bytes] = []
    header_lines(headers, out)
    return b"".join(out)


def end_to_end(headers: Iterable[tuple[bytes, bytes]], *, drop: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """The headers a proxy may forward: hop-by-hop ones removed, with any named in ``Connection``.

    ``content-length`` is removed too (the forwarding side writes its own framing), and any
    lower-case name in ``drop``.
    """
    out = []
    named: set[bytes] | None = None
    for name, value in headers:
        if name in HOP_BY_HOP or name == b"content-length" or name in drop:
            if name == b"connection":
                for token in value.lower().split(b","):
                    token = token.strip()
                    if token and token not in (b"close", b"keep-alive"):
                        if named is None:
                            named = set()
                        named.add(token)
            continue
        out.append((name, value))
    if named:
        out = [(n, v) for n, v in out if n not in named]
    return out


def chunk_frame(data: bytes) -> bytes:
    """One chunk of chunked transfer-coding around ``data`` (non-empty)."""
    return b"%x\r\n%b\r\n" % (len(data), data)
