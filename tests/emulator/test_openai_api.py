"""The emulator through the real ``openai`` client: completions and chat, stream and non-stream."""

from __future__ import annotations

import json

import aiohttp
import pytest
from openai import AsyncOpenAI

from prefixlb.emulator import EmulatedFleet

from .helpers import SMALL, TIMEOUT, TINY_TOKENIZER, metrics, one, post

LONG_PREFIX = " ".join(f"word{i} alpha beta gamma" for i in range(40))  # ~170 tokens


def client(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10.0)


async def test_completion_non_stream_and_cached_tokens_grow_on_a_repeated_prefix() -> None:
    async with EmulatedFleet(1, **SMALL) as fleet:
        oai = client(fleet.urls[0])
        r1 = await oai.completions.create(model="tiny-llama", prompt=LONG_PREFIX + " question one", max_tokens=5)
        r2 = await oai.completions.create(model="tiny-llama", prompt=LONG_PREFIX + " question two", max_tokens=5)
        r3 = await oai.completions.create(model="tiny-llama", prompt=LONG_PREFIX + " question three", max_tokens=5)
        await oai.close()
    assert r1.object == "text_completion" and r1.id.startswith("cmpl-")
    assert r1.choices[0].finish_reason == "length" and r1.usage.completion_tokens == 5
    assert r1.choices[0].text  # decoded text of the 5 tokens
    c1, c2, c3 = (r.usage.prompt_tokens_details.cached_tokens for r in (r1, r2, r3))
    assert c1 == 0
    # the shared prefix is whole 16-token blocks, cached after the first request
    assert c2 > 0 and c2 % 16 == 0 and c2 <= r2.usage.prompt_tokens - 1
    assert c3 == c2
    assert r1.usage.total_tokens == r1.usage.prompt_tokens + 5


async def test_completion_stream_with_usage_chunk() -> None:
    async with EmulatedFleet(1, **SMALL) as fleet:
        oai = client(fleet.urls[0])
        await oai.completions.create(model="tiny-llama", prompt=LONG_PREFIX, max_tokens=2)
        stream = await oai.completions.create(
            model="tiny-llama",
            prompt=LONG_PREFIX + " more",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        await oai.close()
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 6  # one chunk per generated token, as vLLM
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * 5 + ["length"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 6
    assert usage.usage.prompt_tokens_details.cached_tokens > 0
    assert len({c.id for c in chunks}) == 1


async def test_chat_non_stream_and_stream() -> None:
    msgs = [{"role": "system", "content": LONG_PREFIX}, {"role": "user", "content": "What is a prefix cache?"}]
    async with EmulatedFleet(1, **SMALL) as fleet:
        oai = client(fleet.urls[0])
        r = await oai.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=4)
        stream = await oai.chat.completions.create(
            model="tiny-llama", messages=msgs, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        await oai.close()
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens_details.cached_tokens == 0
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content == ""
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == r.choices[0].message.content  # same prompt, same seed material: same answer
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


async def test_logprobs_in_vllm_shapes() -> None:
    async with EmulatedFleet(1, **SMALL) as fleet:
        oai = client(fleet.urls[0])
        c = await oai.completions.create(model="tiny-llama", prompt="hello there", max_tokens=3, logprobs=2)
        ch = await oai.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            logprobs=True,
            top_logprobs=2,
        )
        await oai.close()
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(v <= 0 for v in lp.token_logprobs)
    # vLLM: the sampled token plus the top `logprobs` (so up to logprobs + 1 entries)
    assert all(2 <= len(top) <= 3 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
    content = ch.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token


async def test_model_list_and_unknown_model_error() -> None:
    async with EmulatedFleet(1, **SMALL) as fleet:
        oai = client(fleet.urls[0])
        models = await oai.models.list()
        with pytest.raises(Exception) as err:
            await oai.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        await oai.close()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert getattr(err.value, "status_code", None) == 404
    assert "The model `no-such-model` does not exist." in str(err.value)


async def test_x_request_id_becomes_the_response_id() -> None:
    async with EmulatedFleet(1, **SMALL) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, body, resp = await post(
            s, fleet.urls[0] + "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers={"X-Request-Id": "abc123"}
        )
    assert status == 200 and body["id"] == "cmpl-abc123" and resp.headers["X-Request-Id"] == "abc123"


async def test_prompt_forms_and_chat_without_bos_with_a_real_tokenizer() -> None:
    async with (
        EmulatedFleet(1, **{**SMALL, "tokenizer": TINY_TOKENIZER}) as fleet,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        url = fleet.urls[0]
        _, tok, _ = await post(s, url + "/tokenize", {"prompt": "hello world"})
        ids = tok["tokens"]
        assert ids[0] == 0  # BOS (<s>) added to completion prompts, as vLLM does
        outs = []
        for prompt in ("hello world", ids, ["hello world"], [ids]):
            status, body, _ = await post(
                s, url + "/v1/completions", {"prompt": prompt, "max_tokens": 2, "return_token_ids": True}
            )
            assert status == 200, body
            outs.append(body["choices"][0]["prompt_token_ids"])
        assert outs == [ids] * 4
        msgs = [{"role": "user", "content": "hello world"}]
        _, chat_tok, _ = await post(s, url + "/tokenize", {"messages": msgs})
        _, render, _ = await post(s, url + "/v1/chat/completions/render", {"messages": msgs})
        status, body, _ = await post(
            s, url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 1, "return_token_ids": True}
        )
    assert chat_tok["tokens"][0] != 0  # the chat template has no BOS and no special tokens are added
    assert render["token_ids"] == chat_tok["tokens"] == body["prompt_token_ids"]
    assert body["usage"]["prompt_tokens"] == chat_tok["count"]


async def test_stop_string_cuts_the_text_and_finishes_with_stop() -> None:
    async with EmulatedFleet(1, **SMALL) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        url = fleet.urls[0]
        _, free, _ = await post(s, url + "/v1/completions", {"prompt": "count", "max_tokens": 12, "ignore_eos": True})
        text = free["choices"][0]["text"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        _, cut, _ = await post(
            s, url + "/v1/completions", {"prompt": "count", "max_tokens": 12, "ignore_eos": True, "stop": [stop]}
        )
        _, streamed, _ = await post(
            s,
            url + "/v1/completions",
            {"prompt": "count", "max_tokens": 12, "ignore_eos": True, "stop": stop, "stream": True},
        )
        m = await metrics(s, url)
    choice = cut["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == text[: text.index(stop)]
    assert cut["usage"]["completion_tokens"] < 12
    chunks = [line[6:] for line in streamed.split("\n") if line.startswith("data: {")]
    parsed = [json.loads(c) for c in chunks]
    assert "".join(p["choices"][0]["text"] for p in parsed) == choice["text"]
    assert parsed[-1]["choices"][0]["stop_reason"] == stop
    # the frontend aborted the engine request; vLLM counts it as finished_reason="stop"
    assert one(m["vllm:request_success_total"], finished_reason="stop") == 2
    assert one(m["vllm:request_success_total"], finished_reason="abort") == 0
