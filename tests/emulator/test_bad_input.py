"""Bad input is answered with vLLM's error JSON and a 4xx status, never a 500."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from prefixlb.emulator import EmulatedFleet

from .helpers import SMALL, TIMEOUT

MSGS = [{"role": "user", "content": "hi"}]
J = {"Content-Type": "application/json"}

# (path, raw body, headers, expected status)
CASES: list[tuple[str, bytes, dict[str, str], int]] = [
    ("/v1/completions", b"{not json", J, 400),
    ("/v1/completions", b"", J, 400),
    ("/v1/completions", b"null", J, 400),
    ("/v1/completions", b"[1, 2]", J, 400),
    ("/v1/completions", b'"a string"', J, 400),
    ("/v1/completions", b"\xff\xfe\x00garbage", J, 400),
    ("/v1/completions", b'{"prompt": "x"', J, 400),
    ("/v1/completions", json.dumps({"prompt": "x"}).encode(), {"Content-Type": "text/plain"}, 400),
    ("/v1/completions", json.dumps({"prompt": "x"}).encode(), {}, 400),
    ("/v1/chat/completions", json.dumps({"messages": MSGS}).encode(), {"Content-Type": "application/xml"}, 400),
]
JSON_CASES: list[tuple[str, Any, int]] = [
    ("/v1/completions", {"prompt": "x", "max_tokens": "lots"}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": [1]}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400),
    ("/v1/completions", {"prompt": "x", "stream": "maybe"}, 400),
    ("/v1/completions", {"prompt": "x", "stream": {}}, 400),
    ("/v1/completions", {"prompt": 5}, 400),
    ("/v1/completions", {"prompt": {"text": "x"}}, 400),
    ("/v1/completions", {"prompt": [1, "a"]}, 400),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, 400),
    ("/v1/completions", {"prompt": [True, False]}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": ""}, 400),
    ("/v1/completions", {}, 400),
    ("/v1/completions", {"prompt": [-1]}, 400),
    ("/v1/completions", {"prompt": [2**40]}, 400),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400),
    ("/v1/completions", {"prompt": "x", "stop": ["a", 1]}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": "x"}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 2}, 400),
    ("/v1/completions", {"prompt": "x", "min_tokens": -1}, 400),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": "yes"}, 400),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400),
    ("/v1/completions", {"prompt": "x", "model": 7}, 400),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
    ("/v1/completions", {"prompt": "x", "vllm_xargs": {"emulator_output_token_ids": "abc"}}, 400),
    ("/v1/completions", {"prompt": "x", "vllm_xargs": []}, 400),
    ("/v1/completions", {"prompt": "y " * 3000}, 400),
    ("/v1/completions", {"prompt": [7] * 600}, 400),
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/v1/chat/completions", {}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": 3, "content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, 400),
    ("/v1/chat/completions", {"messages": ["hi"]}, 400),
    ("/v1/chat/completions", {"messages": MSGS, "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 50}, 400),
    ("/v1/chat/completions", {"messages": MSGS, "tools": "x"}, 400),
    ("/v1/chat/completions", {"messages": MSGS, "model": "other"}, 404),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z " * 3000}]}, 400),
    ("/tokenize", {"prompt": 5}, 400),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404),
    ("/tokenize", {"messages": "x"}, 400),
    ("/detokenize", {"tokens": "abc"}, 400),
    ("/detokenize", {"tokens": [-5]}, 400),
    ("/v1/completions/render", {"prompt": 5}, 400),
    ("/v1/chat/completions/render", {"messages": []}, 400),
]


@pytest.fixture(scope="module")
def answers() -> list[tuple[str, int, int, Any]]:
    import asyncio

    async def run() -> list[tuple[str, int, int, Any]]:
        out = []
        async with EmulatedFleet(1, **SMALL) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
            url = fleet.urls[0]
            requests = [(p, raw, h, want) for p, raw, h, want in CASES]
            requests += [(p, json.dumps(b).encode(), J, want) for p, b, want in JSON_CASES]
            for path, raw, headers, want in requests:
                async with s.post(url + path, data=raw, headers=headers) as r:
                    text = await r.text()
                    out.append(
                        (f"{path} {raw[:60]!r} {headers}", want, r.status, (r.headers.get("Content-Type"), text))
                    )
            # the replica still serves after all that
            async with s.post(url + "/v1/completions", json={"prompt": "still fine", "max_tokens": 1}) as r:
                out.append(("after the battery", 200, r.status, (r.headers.get("Content-Type"), await r.text())))
        return out

    return asyncio.run(asyncio.wait_for(run(), 60))


def test_every_bad_input_gets_vllms_error_shape_and_status(answers: list[tuple[str, int, int, Any]]) -> None:
    assert len(answers) == len(CASES) + len(JSON_CASES) + 1
    for label, want, status, (ctype, text) in answers:
        assert status != 500, label
        assert status == want, (label, status, text)
        if want == 200:
            continue
        assert ctype == "application/json", label
        body = json.loads(text)
        assert set(body) == {"error"}, label
        err = body["error"]
        assert list(err) == ["message", "type", "param", "code"], label
        assert err["code"] == status and isinstance(err["message"], str) and err["message"], label
        assert err["type"] in ("Bad Request", "BadRequestError", "NotFoundError"), label
