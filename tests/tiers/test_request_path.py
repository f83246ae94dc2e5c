"""What the request path's cheaper structures must keep exactly: the decision headers rendered
ahead (request id, step, escalations, in their wire order), the metric series created only when
first counted, the prompt text and the decision without a RequestView."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson
import pytest

from prefixlb.routing.tiers import TierPipeline, UserOffsets, prompt_text, request_view

from .support import chat, keyword_model, metric_lines, tiered

_OURS = re.compile(rb"^x-prefixlb-[a-z-]+$")


async def raw_post(base: str, body: dict, headers: dict[str, bytes] | None = None) -> tuple[int, list]:
    """(status, the x-prefixlb-* headers in wire order) of one request over a raw socket."""
    host, port = base.split("//")[1].split(":")
    data = orjson.dumps(body)
    head = [b"POST /v1/chat/completions HTTP/1.1", b"host: x", b"content-type: application/json",
            b"content-length: %d" % len(data), b"connection: close"]
    head += [k.encode() + b": " + v for k, v in (headers or {}).items()]
    r, w = await asyncio.open_connection(host, int(port))
    w.write(b"\r\n".join(head) + b"\r\n\r\n" + data)
    resp = await r.read()
    w.close()
    lines = resp.partition(b"\r\n\r\n")[0].split(b"\r\n")
    ours = [tuple(x.split(b": ", 1)) for x in lines[1:]]
    return int(lines[0].split()[1]), [(k.decode(), v) for k, v in ours if _OURS.match(k)]


async def test_decision_headers_are_written_as_the_pairs_were(tmp_path):
    tr = {"classifier": {"model": keyword_model(tmp_path / "m")}, "cascade": {"min_mean_logprob": -0.0001,
                                                                             "max_tiers": 2}}
    async with tiered(tr) as (b, base):
        urls = {t: next(iter(b.tiers[t].replicas.values())).url.encode() for t in b.tiers}
        st, h = await raw_post(base, chat("a difficult question"))
        assert st == 200 and [k for k, _ in h] == ["x-prefixlb-tier", "x-prefixlb-replica", "x-prefixlb-request-id",
                                                   "x-prefixlb-step"]
        assert h[0][1] == b"large" and h[1][1] == urls["large"] and h[3][1] == b"classifier"
        assert re.fullmatch(rb"plb-[0-9a-f]{8}-[0-9a-f]+", h[2][1])
        # a client's id comes back as it was decoded (latin-1) and encoded (UTF-8) before
        st, h = await raw_post(base, chat("hi"), {"x-request-id": "caf\xe9".encode()})
        assert dict(h)["x-prefixlb-request-id"] == "caf\xe9".encode().decode("latin-1").encode()
        st, h = await raw_post(base, chat("hi", model="medium"))
        assert dict(h)["x-prefixlb-step"] == b"explicit" and dict(h)["x-prefixlb-tier"] == b"medium"
        # a cascade: every answer carries the escalations so far, the streamed one too
        for stream in (False, True):
            st, h = await raw_post(base, chat("hi", model="auto-cascade", stream=stream), {"x-request-id": b"c-1"})
            assert st == 200 and [k for k, _ in h][-1] == "x-prefixlb-escalations"
            assert dict(h) == {"x-prefixlb-tier": b"medium", "x-prefixlb-replica": urls["medium"],
                               "x-prefixlb-request-id": b"c-1", "x-prefixlb-step": b"classifier",
                               "x-prefixlb-escalations": b"1"}


async def test_a_request_id_that_is_not_a_header_value_is_refused_by_the_parser():
    # the rendered x-prefixlb-request-id line relies on it: CR or LF never reach the decision
    async with tiered({}, tiers=("small",)) as (_, base):
        for bad in (b"a\rb", b"a\nb"):
            host, port = base.split("//")[1].split(":")
            r, w = await asyncio.open_connection(host, int(port))
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: " + bad + b"\r\n"
                    b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
            status = (await r.readline()).split()[1]
            w.close()
            assert status == b"400"
        st, h = await raw_post(base, chat("hi"))  # and the balancer goes on serving
        assert st == 200 and dict(h)["x-prefixlb-tier"] == b"small"


async def test_the_accounting_series_appear_when_first_counted_as_before():
    async with tiered({}, tiers=("small", "medium")) as (b, base), aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(base + "/v1/chat/completions", json=chat("hi")) as r:
                assert r.status == 200
        m = await metric_lines(s, base, "prefixlb_")
    url = next(iter(b.tiers["small"].replicas.values())).url
    assert m[f'prefixlb_requests_total{{replica="{url}",status="200",tier="small"}}'] == 2
    assert m['prefixlb_request_duration_seconds_count{tier="small"}'] == 2
    assert m['prefixlb_route_decision_seconds_count{tier="small"}'] == 2
    assert m['prefixlb_tier_decisions_total{step="default",tier="small"}'] == 2
    assert m['prefixlb_prompt_tokens_total{tier="small"}'] > 0
    counted = ("requests", "request_duration_seconds", "route_decision_seconds", "predicted_cached_tokens",
               "actual_cached_tokens", "prompt_tokens", "completion_tokens", "cost_dollars")
    assert not any('tier="medium"' in k for k in m
                   if k.split("{")[0].removesuffix("_total").removesuffix("_count").removesuffix("_sum")
                   .removesuffix("_bucket").removeprefix("prefixlb_") in counted)  # nothing answered there


@pytest.mark.parametrize("body, chat_", [
    ({"messages": [{"role": "user", "content": "one"}]}, True),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
     True),
    ({"messages": ["not a message"]}, True),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}, True),
    ({"messages": [{"role": "user"}]}, True),
    ({"prompt": ["a", "b"]}, False),
])
def test_the_prompt_is_the_messages_texts_joined(body, chat_):
    msgs = body.get("messages") or []
    want = "\n".join(m.get("content") if isinstance(m.get("content"), str) else
                     "\n".join(p["text"] for p in m.get("content") or ()) for m in msgs if isinstance(m, dict))
    assert prompt_text(body, chat_) == (want if chat_ else "a\nb")


class _Scorer:
    def __init__(self, tier="large", fail=False):
        self.tier, self.fail = tier, fail

    def choose(self, prompt, tiers):
        if self.fail:
            raise RuntimeError("broken")
        return self.tier, len(prompt) / 100


@pytest.mark.parametrize("mode", ["enabled", "shadow", "killed"])
@pytest.mark.parametrize("scorer", [_Scorer(), _Scorer("nope"), _Scorer(fail=True), None])
def test_a_decision_without_a_request_view_is_the_pipelines(mode, scorer):
    tiers = ("small", "medium", "large")
    body = {"messages": [{"role": "user", "content": "hello there"}]}
    for cascade in (False, True):
        p = TierPipeline(tiers, "small", (), scorer, mode)
        view = request_view(body, "/v1/chat/completions", {}, None, True)
        d, prompt = p.decide_body(body, True, cascade)
        assert d == p.decide(view, 0.0, cascade=cascade) and prompt == view.prompt_if_built
    p = TierPipeline(tiers, "small", (), scorer, mode, UserOffsets())
    assert p.user_offsets is not None  # (with offsets TierRouting builds the view: not this path)
