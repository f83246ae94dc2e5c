"""The confidence cascade in the running balancer, against emulated tiers with real logprobs:
escalation on each signal (low logprobs, JSON and tool-call parse failures, the verifier),
bounded by max_tiers and the deadline, and streaming clients receiving only the final answer."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp import web

from prefixlb.routing.decision_log import read_log

from .support import call, chat, metric_lines, tiered

ALWAYS_FAIL = -0.0001  # no answer has a mean token logprob this close to 0: every check fails
NEVER_FAIL = -50.0


def url_of(b, tier: str) -> str:
    return next(iter(b.tiers[tier].replicas.values())).url


def sse_events(raw: bytes) -> list:
    out = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                out.append(orjson.loads(line[6:]))
    return out


async def test_low_logprobs_escalate_and_a_confident_answer_stays_on_the_cheap_tier(tmp_path):
    log = tmp_path / "d.jsonl"
    tr = {"cascade": {"min_mean_logprob": -1.0, "max_tiers": 2}, "decision_log": {"path": str(log)}}
    async with tiered(tr) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, raw = await call(s, base, chat("what is the boiling point of water?", model="auto-cascade"))
            assert st == 200 and h["x-prefixlb-tier"] == "medium" and h["x-prefixlb-escalations"] == "1"
            assert orjson.loads(raw)["model"] == "m-medium"
            m = await metric_lines(s, base, "prefixlb_cascade")
            assert m['prefixlb_cascade_escalations_total{reason="low_mean_logprob",tier="small"}'] == 1
            assert m['prefixlb_cascade_outcomes_total{outcome="top",tier="medium"}'] == 1
    row = next(r for r in read_log(log) if r["type"] == "request")
    f = row["cascade"]["features"][0]  # the rejected answer: every feature recorded, not just the mean
    assert f["mean"] < -1.0 and set(f) == {"tokens", "mean", "min", "low_fraction", "margin"}
    tr = {"cascade": {"min_mean_logprob": NEVER_FAIL}}
    async with tiered(tr) as (b, base):
        async with aiohttp.ClientSession() as s:
            body = chat("what is the boiling point of water?", model="auto-cascade")
            st, h, raw = await call(s, base, body)
            assert h["x-prefixlb-tier"] == "small" and h["x-prefixlb-escalations"] == "0"
            resp = orjson.loads(raw)
            # logprobs were asked of the replica for the check, and removed before the client saw them
            assert resp["choices"][0]["logprobs"] is None
            st, _, direct = await call(s, url_of(b, "small"), dict(body, model="m-small"))
            assert resp["choices"][0]["message"] == orjson.loads(direct)["choices"][0]["message"]
            m = await metric_lines(s, base, "prefixlb_cascade_outcomes_total")
            assert m['prefixlb_cascade_outcomes_total{outcome="accepted",tier="small"}'] == 1


async def test_a_rule_can_send_matching_auto_requests_through_the_cascade():
    tr = {"rules": [{"name": "proofs", "tier": "small", "cascade": True, "when": {"keywords_any": ["prove"]}}],
          "cascade": {"min_mean_logprob": ALWAYS_FAIL, "max_tiers": 2}}
    async with tiered(tr) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, _ = await call(s, base, chat("prove that 2 is prime"))
            assert (h["x-prefixlb-tier"], h["x-prefixlb-step"], h["x-prefixlb-escalations"]) == ("medium", "rules", "1")
            st, h, _ = await call(s, base, chat("say hi"))
            assert h["x-prefixlb-tier"] == "small" and "x-prefixlb-escalations" not in h


async def test_low_token_fraction_escalates_even_without_a_mean_threshold():
    tr = {"cascade": {"low_token_logprob": -0.5, "max_low_token_fraction": 0.2, "max_tiers": 2}}
    async with tiered(tr) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, _ = await call(s, base, chat("name a colour", model="auto-cascade"))
            assert h["x-prefixlb-tier"] == "medium"
            m = await metric_lines(s, base, "prefixlb_cascade_escalations_total")
            assert m['prefixlb_cascade_escalations_total{reason="low_token_fraction",tier="small"}'] == 1


async def test_json_parse_failure_escalates():
    tr = {"cascade": {"max_tiers": 2}}  # no logprob thresholds: only the JSON check can fail
    async with tiered(tr) as (b, base):
        async with aiohttp.ClientSession() as s:
            body = chat("reply in JSON", model="auto-cascade", response_format={"type": "json_object"})
            st, h, _ = await call(s, base, body)
            assert h["x-prefixlb-tier"] == "medium"
            st, h, _ = await call(s, base, chat("reply in prose", model="auto-cascade"))
            assert h["x-prefixlb-tier"] == "small"
            m = await metric_lines(s, base, "prefixlb_cascade_escalations_total")
            assert m == {'prefixlb_cascade_escalations_total{reason="json",tier="small"}': 1.0}


class ToolReplica:
    """A scripted OpenAI replica that answers with one tool call (its arguments as given)."""

    def __init__(self, arguments: str) -> None:
        self.arguments = arguments
        self.hits = 0

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.ok)
        app.router.add_get("/metrics", self.ok)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def ok(self, request):
        return web.Response(text="")

    async def models(self, request):
        return web.json_response({"data": [{"id": "m-small"}]})

    async def chat(self, request):
        self.hits += 1
        call = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": self.arguments}}
        return web.json_response({
            "id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": "m-small",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                         "logprobs": None, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}})


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


async def test_tool_call_parse_failure_escalates_and_a_good_call_is_returned():
    for args, tier in (('{"city": "Par', "medium"), ('{"city": "Paris"}', "small")):
        rep = ToolReplica(args)
        url = await rep.start()
        try:
            async with tiered({"cascade": {"max_tiers": 2}}, urls={"small": [url]}) as (b, base):
                async with aiohttp.ClientSession() as s:
                    st, h, raw = await call(s, base, chat("weather in Paris?", model="auto-cascade", tools=TOOLS))
                    assert st == 200 and h["x-prefixlb-tier"] == tier and rep.hits == 1
                    if tier == "small":
                        calls = orjson.loads(raw)["choices"][0]["message"]["tool_calls"]
                        assert calls[0]["function"]["arguments"] == args
                        # a streaming client gets the same call as SSE deltas
                        st, h, raw = await call(s, base, chat("weather?", model="auto-cascade", tools=TOOLS,
                                                              stream=True))
                        ev = sse_events(raw)
                        deltas = [c["delta"] for e in ev for c in e["choices"]]
                        assert any(d.get("tool_calls") for d in deltas) and raw.endswith(b"data: [DONE]\n\n")
                    else:
                        m = await metric_lines(s, base, "prefixlb_cascade_escalations_total")
                        assert m == {'prefixlb_cascade_escalations_total{reason="tool_call",tier="small"}': 1.0}
        finally:
            await rep.runner.cleanup()


class Verifier:
    """A verifier endpoint: rejects answers from the tiers in ``reject``; ``delay`` before answering."""

    def __init__(self, reject=("small",), delay: float = 0.0) -> None:
        self.reject = set(reject)
        self.delay = delay
        self.seen: list[str] = []

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/verify", self.verify)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/verify"

    async def verify(self, request):
        body = await request.json()
        self.seen.append(body["tier"])
        assert body["request"]["messages"] and body["response"]["choices"]
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.json_response({"accept": body["tier"] not in self.reject})


async def test_verifier_endpoint_that_says_no_escalates():
    v = Verifier(reject=("small",))
    url = await v.start()
    try:
        async with tiered({"cascade": {"verifier_url": url}}) as (b, base):
            async with aiohttp.ClientSession() as s:
                st, h, _ = await call(s, base, chat("is this right?", model="auto-cascade"))
                assert h["x-prefixlb-tier"] == "medium" and v.seen == ["small", "medium"]
                m = await metric_lines(s, base, "prefixlb_cascade")
                assert m['prefixlb_cascade_escalations_total{reason="verifier",tier="small"}'] == 1
                assert m['prefixlb_cascade_outcomes_total{outcome="accepted",tier="medium"}'] == 1
                assert m['prefixlb_cascade_verifier_calls_total{result="reject"}'] == 1
    finally:
        await v.runner.cleanup()


async def test_a_verifier_that_times_out_follows_verifier_on_error():
    v = Verifier(reject=("small", "medium"), delay=2.0)
    url = await v.start()
    try:
        for on_error, tier in (("accept", "small"), ("escalate", "large")):
            cfg = {"cascade": {"verifier_url": url, "verifier_timeout_s": 0.1, "verifier_on_error": on_error}}
            async with tiered(cfg) as (b, base):
                async with aiohttp.ClientSession() as s:
                    st, h, _ = await call(s, base, chat("slow check", model="auto-cascade"))
                    assert st == 200 and h["x-prefixlb-tier"] == tier
                    m = await metric_lines(s, base, "prefixlb_cascade_verifier_calls_total")
                    assert m['prefixlb_cascade_verifier_calls_total{result="error"}'] >= 1
    finally:
        await v.runner.cleanup()


async def test_verifier_as_a_python_callable(tmp_path, monkeypatch):
    (tmp_path / "my_verifier.py").write_text(
        "SEEN = []\n"
        "async def check(request, response, tier):\n"
        "    SEEN.append(tier)\n"
        "    return tier != 'small'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    async with tiered({"cascade": {"verifier_python": "my_verifier:check"}}) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, _ = await call(s, base, chat("check me", model="auto-cascade"))
            assert h["x-prefixlb-tier"] == "medium"
    import my_verifier  # type: ignore[import-not-found]

    assert my_verifier.SEEN == ["small", "medium"]


async def test_escalation_is_bounded_by_max_tiers_and_by_the_deadline():
    async with tiered({"cascade": {"min_mean_logprob": ALWAYS_FAIL, "max_tiers": 2}}) as (b, base):
        async with aiohttp.ClientSession() as s:
            for i in range(3):
                st, h, _ = await call(s, base, chat(f"q{i}", model="auto-cascade"))
                assert h["x-prefixlb-tier"] == "medium"  # never the third tier
            assert {k[0] for k in b.metrics.requests.series} == {"small", "medium"}
    async with tiered({"cascade": {"min_mean_logprob": ALWAYS_FAIL}}) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, _ = await call(s, base, chat("q", model="auto-cascade"))
            assert h["x-prefixlb-tier"] == "large" and h["x-prefixlb-escalations"] == "2"
    async with tiered({"cascade": {"min_mean_logprob": ALWAYS_FAIL, "deadline_s": 0}}) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, raw = await call(s, base, chat("q", model="auto-cascade"))
            # past the deadline: the failing answer in hand is returned rather than waiting for more tiers
            assert st == 200 and h["x-prefixlb-tier"] == "small" and h["x-prefixlb-escalations"] == "0"
            assert orjson.loads(raw)["choices"][0]["logprobs"] is None
            m = await metric_lines(s, base, "prefixlb_cascade_outcomes_total")
            assert m == {'prefixlb_cascade_outcomes_total{outcome="deadline",tier="small"}': 1.0}


async def test_per_tier_thresholds_override_the_global_check():
    tr = {"cascade": {"min_mean_logprob": NEVER_FAIL, "per_tier": {"small": {"min_mean_logprob": ALWAYS_FAIL}}}}
    async with tiered(tr) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, _ = await call(s, base, chat("q", model="auto-cascade"))
            # small is held to the strict threshold, medium to the global one, so medium answers
            assert h["x-prefixlb-tier"] == "medium" and h["x-prefixlb-escalations"] == "1"
            m = await metric_lines(s, base, "prefixlb_cascade_outcomes_total")
            assert m == {'prefixlb_cascade_outcomes_total{outcome="accepted",tier="medium"}': 1.0}


async def test_escalating_into_a_precise_mode_tier_routes_on_its_token_ids():
    tr = {"cascade": {"min_mean_logprob": ALWAYS_FAIL, "max_tiers": 2}}
    extra = {"medium": {"precise": {"tokenizer": "byte", "block_size": 16}}}
    async with tiered(tr, tier_extra=extra) as (b, base):
        assert b.tiers["medium"].encoder is not None and b.tiers["small"].encoder is None
        async with aiohttp.ClientSession() as s:
            for i in range(2):
                st, h, _ = await call(s, base, chat("the same long question " * 8, model="auto-cascade"))
                assert st == 200 and h["x-prefixlb-tier"] == "medium"
            m = await metric_lines(s, base, "prefixlb_precise_fallbacks_total")
            assert not any(v for v in m.values())


async def test_a_streaming_client_receives_only_the_final_answers_stream():
    tr = {"cascade": {"min_mean_logprob": ALWAYS_FAIL, "max_tiers": 2}}
    async with tiered(tr) as (b, base):
        async with aiohttp.ClientSession() as s:
            body = chat("tell me a story", model="auto-cascade", stream=True,
                        stream_options={"include_usage": True})
            st, h, raw = await call(s, base, body)
            assert st == 200 and h["x-prefixlb-tier"] == "medium"
            assert h["content-type"].startswith("text/event-stream")
            ev = sse_events(raw)
            assert {e["model"] for e in ev} == {"m-medium"} and raw.count(b"data: [DONE]") == 1
            assert ev[-1]["usage"]["completion_tokens"] > 0  # the final tier's own stream, usage event included
            assert b": x-emulator-quality: " in raw and b"skill=0.694" in raw
    async with tiered({"cascade": {"min_mean_logprob": NEVER_FAIL}}) as (b, base):
        async with aiohttp.ClientSession() as s:
            body = chat("tell me a story", model="auto-cascade", stream=True, stream_options={"include_usage": True})
            st, h, raw = await call(s, base, body)
            assert st == 200 and h["x-prefixlb-tier"] == "small" and h["content-type"] == "text/event-stream"
            ev = sse_events(raw)
            text = "".join(c["delta"].get("content", "") for e in ev for c in e["choices"])
            direct_body = {k: v for k, v in body.items() if k != "stream_options"}
            st, _, direct = await call(s, url_of(b, "small"), dict(direct_body, model="m-small", stream=False))
            d = orjson.loads(direct)
            assert text == d["choices"][0]["message"]["content"] and ev[-1]["usage"] == d["usage"]
            assert all(c.get("logprobs") is None for e in ev for c in e["choices"])
            assert raw.endswith(b"data: [DONE]\n\n") and h["x-emulator-quality"].startswith("correct=")


async def test_a_dead_tier_escalates_and_a_client_error_is_passed_back():
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    async with tiered({"cascade": {"max_tiers": 2}}, urls={"small": [dead]}, health_interval_s=30) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, _ = await call(s, base, chat("anyone there?", model="auto-cascade"))
            assert st == 200 and h["x-prefixlb-tier"] == "medium"
            m = await metric_lines(s, base, "prefixlb_cascade_escalations_total")
            assert m == {'prefixlb_cascade_escalations_total{reason="upstream_error",tier="small"}': 1.0}
    async with tiered({"cascade": {}}) as (b, base):
        async with aiohttp.ClientSession() as s:
            # a replica's 400 is the client's mistake, not a reason to escalate
            st, h, raw = await call(s, base, chat("hi", model="auto-cascade", max_tokens=4, min_tokens=10))
            assert st == 400 and b"min_tokens" in raw
            m = await metric_lines(s, base, "prefixlb_cascade_outcomes_total")
            assert m == {'prefixlb_cascade_outcomes_total{outcome="error_passed",tier="small"}': 1.0}
