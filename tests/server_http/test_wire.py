"""wire.header_lines: the response header block, checked against the straightforward rule it
replaces (each name and value checked on its own), including the refusals that keep a caller
from splitting a response."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixlb.server.http.wire import FRAMING_HEADERS, header_lines


def reference(headers, skip=FRAMING_HEADERS):
    out, content_length = [], None
    for name, value in headers:
        name = name.encode("latin-1") if isinstance(name, str) else name
        value = value.encode("latin-1") if isinstance(value, str) else value
        lname = name.lower()
        if lname in skip:
            if lname == b"content-length":
                content_length = int(value)
            continue
        if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name or b":" in name or not name:
            raise ValueError(name)
        out.append(b"%s: %s\r\n" % (name, value))
    return out, content_length


def test_lines_framing_and_content_length():
    out = [b"HTTP/1.1 200 OK\r\n"]
    cl = header_lines([(b"Content-Type", b"application/json"), ("x-str", "v"), (b"Content-Length", b"12"),
                       (b"connection", b"close"), (b"x-a", b"1: 2")], out)
    assert cl == 12
    assert out == [b"HTTP/1.1 200 OK\r\n", b"Content-Type: application/json\r\n", b"x-str: v\r\n", b"x-a: 1: 2\r\n"]


@pytest.mark.parametrize("bad", [(b"x-bad", b"a\r\nset-cookie: s"), (b"x-bad", b"a\nb"), (b"x-bad", b"a\rb"),
                                 (b"x\r\ny", b"v"), (b"x:y", b"v"), (b"", b"v")])
def test_refused_headers_leave_the_block_as_it_was(bad):
    out = [b"HTTP/1.1 200 OK\r\n"]
    with pytest.raises(ValueError, match="invalid response header"):
        header_lines([(b"x-ok", b"1"), bad, (b"x-after", b"2")], out)
    assert out == [b"HTTP/1.1 200 OK\r\n"]


_part = st.lists(st.sampled_from([b"a", b"Z", b"-", b":", b"\r", b"\n", b" ", b"0"]), max_size=6).map(b"".join)
_name = st.one_of(st.sampled_from([b"content-length", b"Connection", b"x-a", b"date"]), _part)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_name, _part), max_size=6))
def test_same_as_the_reference(headers):
    headers = [(n, b"7" if n == b"content-length" else v) for n, v in headers]
    try:
        want = reference(headers)
    except ValueError:
        with pytest.raises(ValueError):
            header_lines(headers, [])
        return
    out: list[bytes] = []
    assert (out, header_lines(headers, out)) == want


def test_rendered_lines_are_the_lines_header_lines_writes():
    from prefixlb.server.http import render_header_lines

    pairs = [(b"x-a", b"1"), ("X-B", "two: 2"), (b"content-length", b"9")]
    out: list[bytes] = []
    header_lines(pairs, out)
    assert render_header_lines(pairs) == b"".join(out) == b"x-a: 1\r\nX-B: two: 2\r\n"
    with pytest.raises(ValueError, match="invalid response header"):
        render_header_lines([(b"x-a", b"1\r\nx-evil: 1")])
