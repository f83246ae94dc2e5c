"""Request validation with vLLM's error JSON and statuses.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status equal to
``code``, as vLLM's ``ErrorResponse``. Two families, as in vLLM 0.32:

* schema failures (wrong content type, malformed JSON, a field of the wrong type): 400 with
  ``type "Bad Request"`` and a pydantic-style message
  ``1 validation error:\\n  {'type': 'int_parsing', 'loc': 'body.max_tokens', ...}`` whose
  ``param`` is the location (the message text follows pydantic's wording for the common cases;
  unions such as ``prompt`` and ``messages`` get one simplified error instead of pydantic's list);
* semantic failures (``max_tokens`` < 1, a prompt longer than ``max_model_len``, ...): 400
  ``BadRequestError`` with vLLM's message, and 404 ``NotFoundError`` for an unknown model.

Unknown fields are ignored. Pydantic's lax coercions are accepted (``"5"`` for an int).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "APIError",
    "ChatParams",
    "CompletionParams",
    "bad_request",
    "error_body",
    "get_bool",
    "get_str",
    "parse_chat",
    "parse_completion",
    "parse_json_body",
    "schema_error",
]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class APIError(Exception):
    """An error answered with vLLM's error JSON."""

    def __init__(self, status: int, type_: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.status, self.param)


def error_body(message: str, type_: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, value: Any = ..., *, suffix: bool = True) -> APIError:
    """vLLM's ``VLLMValidationError``: the message gets ``(parameter=X, value=Y)`` appended."""
    if param is not None and suffix:
        message = f"{message} (parameter={param})" if value is ... else f"{message} (parameter={param}, value={value})"
    return APIError(400, "BadRequestError", message, param)


def _input_repr(v: Any) -> str:
    if isinstance(v, dict):
        return f"'<dict of {len(v)} items>'"
    if isinstance(v, list):
        return f"'<list of {len(v)} items>'"
    return repr(v)


def _schema_error(kind: str, loc: str, msg: str, value: Any, ctx: dict[str, Any] | None = None) -> APIError:
    detail = f"{{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}', 'input': {_input_repr(value)}"
    if ctx is not None:
        detail += f", 'ctx': {ctx!r}"
    return APIError(400, "Bad Request", f"1 validation error:\n  {detail}}}", loc)


def parse_json_body(content_type: str | None, raw: bytes) -> dict[str, Any]:
    """The request body as a dict, or the APIError vLLM answers (content type, JSON, not an object)."""
    media = (content_type or "").lower().split(";", 1)[0].strip()
    if media != "application/json":
        raise APIError(
            400, "Bad Request", "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            body = json.loads(raw)  # orjson is stricter (NaN); the stdlib gives pydantic-like messages
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            pos = getattr(exc, "pos", 0) or 0
            reason = getattr(exc, "msg", None) or str(exc)
            raise _schema_error("json_invalid", f"body.{pos}", "JSON decode error", {}, {"error": reason}) from None
    if not isinstance(body, dict):
        raise _schema_error(
            "model_attributes_type", "body", "Input should be a valid dictionary or object to extract fields from", body
        )
    return body


# -- field coercion (pydantic v2 lax mode) --------------------------------------------------------

_MISSING: Any = object()
_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}


def _int(body: Mapping[str, Any], key: str, default: Any, *, nullable: bool = True) -> Any:
    v = body.get(key, _MISSING)
    if v is _MISSING:
        return default
    if v is None and nullable:
        return None
    loc = f"body.{key}"
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        if math.isfinite(v):
            raise _schema_error(
                "int_from_float", loc, "Input should be a valid integer, got a number with a fractional part", v
            )
        raise _schema_error("finite_number", loc, "Input should be a finite number", v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            raise _schema_error(
                "int_parsing", loc, "Input should be a valid integer, unable to parse string as an integer", v
            ) from None
    raise _schema_error("int_type", loc, "Input should be a valid integer", v)


def _float(body: Mapping[str, Any], key: str, default: Any) -> Any:
    v = body.get(key, _MISSING)
    if v is _MISSING:
        return default
    if v is None:
        return None
    loc = f"body.{key}"
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            raise _schema_error(
                "float_parsing", loc, "Input should be a valid number, unable to parse string as a number", v
            ) from None
    raise _schema_error("float_type", loc, "Input should be a valid number", v)


def _bool(body: Mapping[str, Any], key: str, default: Any) -> Any:
    v = body.get(key, _MISSING)
    if v is _MISSING:
        return default
    if v is None:
        return None
    loc = f"body.{key}"
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    if isinstance(v, (int, float, str)):
        raise _schema_error("bool_parsing", loc, "Input should be a valid boolean, unable to interpret input", v)
    raise _schema_error("bool_type", loc, "Input should be a valid boolean", v)


def _str(body: Mapping[str, Any], key: str, default: Any) -> Any:
    v = body.get(key, _MISSING)
    if v is _MISSING:
        return default
    if v is None or isinstance(v, str):
        return v
    raise _schema_error("string_type", f"body.{key}", "Input should be a valid string", v)


def _dict(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    v = body.get(key)
    if v is None or isinstance(v, dict):
        return v
    raise _schema_error("dict_type", f"body.{key}", "Input should be a valid dictionary", v)


def _stop(body: Mapping[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list):
        for i, s in enumerate(v):
            if not isinstance(s, str):
                raise _schema_error("string_type", f"body.stop.list[str].{i}", "Input should be a valid string", s)
        return [s for s in v if s]
    raise _schema_error("string_type", "body.stop.str", "Input should be a valid string", v)


def get_bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    """An optional boolean field (pydantic lax coercion); APIError when it is not one."""
    v = _bool(body, key, default)
    return default if v is None else bool(v)


def get_str(body: Mapping[str, Any], key: str) -> str | None:
    """An optional string field; APIError when it is not one."""
    return _str(body, key, None)  # type: ignore[no-any-return]


def schema_error(kind: str, loc: str, msg: str, value: Any) -> APIError:
    """A pydantic-style 400 ``Bad Request`` for field ``loc``."""
    return _schema_error(kind, loc, msg, value)


def _token_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


# -- parsed requests ------------------------------------------------------------------------------


@dataclass
class _Common:
    model: str | None
    max_tokens: int | None
    min_tokens: int
    ignore_eos: bool
    seed: int | None
    stop: list[str]
    include_stop_str_in_output: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool
    return_token_ids: bool
    cache_salt: str | None
    output_token_ids: list[int] | None  # vllm_xargs.emulator_output_token_ids (scripted output)
    skip_special_tokens: bool


@dataclass
class CompletionParams(_Common):
    prompt_text: str | None = None
    prompt_token_ids: list[int] | None = None
    logprobs: int | None = None
    add_special_tokens: bool = True
    echo: bool = False


@dataclass
class ChatParams(_Common):
    messages: list[dict[str, Any]] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    tools: list[Any] | None = None


def _common(body: Mapping[str, Any], default_max_tokens: int | None, max_logprobs: int) -> dict[str, Any]:
    model = _str(body, "model", None)
    max_tokens = _int(body, "max_tokens", default_max_tokens)
    min_tokens = _int(body, "min_tokens", 0, nullable=False)
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise bad_request("n must be 1: the emulator samples one sequence per request.", "n", n)
    seed = _int(body, "seed", None)
    if seed is not None and not _INT64_MIN <= seed <= _INT64_MAX:
        raise _schema_error("less_than_equal", "body.seed", f"Input should be less than or equal to {_INT64_MAX}", seed)
    stream = bool(_bool(body, "stream", False))
    opts = _dict(body, "stream_options")
    include_usage = continuous = False
    if opts and not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    if opts is not None:
        include_usage = bool(_bool(opts, "include_usage", False))
        continuous = bool(_bool(opts, "continuous_usage_stats", False))
    for key in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_p"):
        _float(body, key, None)
    _int(body, "top_k", None)
    _int(body, "priority", 0)
    xargs = _dict(body, "vllm_xargs") or {}
    scripted = xargs.get("emulator_output_token_ids")
    if scripted is not None and not _token_list(scripted):
        raise _schema_error(
            "list_type",
            "body.vllm_xargs.emulator_output_token_ids",
            "Input should be a valid list of token ids",
            scripted,
        )
    del max_logprobs
    return dict(
        model=model,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=bool(_bool(body, "ignore_eos", False)),
        seed=seed,
        stop=_stop(body),
        include_stop_str_in_output=bool(_bool(body, "include_stop_str_in_output", False)),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        return_token_ids=bool(_bool(body, "return_token_ids", False)),
        cache_salt=_str(body, "cache_salt", None),
        output_token_ids=scripted,
        skip_special_tokens=bool(_bool(body, "skip_special_tokens", True)),
    )


def parse_completion(body: Mapping[str, Any], max_logprobs: int = 20) -> CompletionParams:
    """A ``/v1/completions`` body (one prompt: a string, token ids, or a one-element list of either)."""
    common = _common(body, 16, max_logprobs)
    logprobs = _int(body, "logprobs", None)
    if logprobs is not None:
        if logprobs == -1:
            logprobs = max_logprobs
        if logprobs < 0:
            raise bad_request(f"logprobs must be a non-negative integer or -1, got {logprobs}.", "logprobs", logprobs)
        if logprobs > max_logprobs:
            raise bad_request(
                f"Requested sample logprobs of {logprobs}, which is greater than max allowed: {max_logprobs}",
                "logprobs",
                logprobs,
            )
    echo = bool(_bool(body, "echo", False))
    if echo:
        raise bad_request("echo is not supported by the prefixlb emulator.", "echo", suffix=False)
    if body.get("suffix") is not None:
        raise bad_request("suffix is not currently supported", "suffix", suffix=False)
    p = CompletionParams(**common, logprobs=logprobs, add_special_tokens=bool(_bool(body, "add_special_tokens", True)))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if prompt is None or prompt == "":
        raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    if isinstance(prompt, str):
        p.prompt_text = prompt
    elif isinstance(prompt, list):
        if not prompt:
            raise bad_request("You must pass at least one prompt", suffix=False)
        if _token_list(prompt):
            p.prompt_token_ids = list(prompt)
        elif all(isinstance(x, str) for x in prompt) or all(_token_list(x) for x in prompt):
            raise bad_request(
                f"The prefixlb emulator serves one prompt per request; got a batch of {len(prompt)}.",
                "prompt",
                suffix=False,
            )
        else:
            raise _schema_error(
                "string_type", "body.prompt", "Input should be a valid string or a list of token ids", prompt
            )
    else:
        raise _schema_error(
            "string_type", "body.prompt", "Input should be a valid string or a list of token ids", prompt
        )
    return p


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise _schema_error("list_type", "body.messages", "Input should be a valid list", messages)
    for i, m in enumerate(messages):
        loc = f"body.messages.{i}"
        if not isinstance(m, dict):
            raise _schema_error("dict_type", loc, "Input should be a valid dictionary", m)
        if "role" not in m:
            raise _schema_error("missing", f"{loc}.role", "Field required", m)
        if not isinstance(m["role"], str):
            raise _schema_error("string_type", f"{loc}.role", "Input should be a valid string", m["role"])
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _schema_error("string_type", f"{loc}.content", "Input should be a valid string", content)
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise _schema_error("dict_type", f"{loc}.content.{j}", "Input should be a valid dictionary", part)
            if part.get("type", "text") == "text" and not isinstance(part.get("text"), str):
                raise _schema_error(
                    "string_type", f"{loc}.content.{j}.text", "Input should be a valid string", part.get("text")
                )
    return messages


def parse_chat(body: Mapping[str, Any], max_logprobs: int = 20) -> ChatParams:
    """A ``/v1/chat/completions`` body."""
    if "messages" not in body:
        raise _schema_error("missing", "body.messages", "Field required", dict(body))
    messages = _check_messages(body["messages"])
    common = _common(body, None, max_logprobs)
    mct = _int(body, "max_completion_tokens", None)
    if mct is not None:
        common["max_tokens"] = mct
    logprobs = bool(_bool(body, "logprobs", False))
    top = _int(body, "top_logprobs", 0)
    top = 0 if top is None else top
    if top and not logprobs:
        raise bad_request("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    if top == -1:
        top = max_logprobs
    if top < 0:
        raise bad_request(f"top_logprobs must be a non-negative integer or -1, got {top}.", "top_logprobs", top)
    if top > max_logprobs:
        raise bad_request(
            f"Requested sample logprobs of {top}, which is greater than max allowed: {max_logprobs}",
            "top_logprobs",
            top,
        )
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _schema_error("list_type", "body.tools", "Input should be a valid list", tools)
    if not messages:
        raise bad_request(
            "Cannot apply chat template to an empty conversation. Provide at least one message.", suffix=False
        )
    return ChatParams(
        **common,
        messages=messages,
        logprobs=logprobs,
        top_logprobs=top,
        add_generation_prompt=bool(_bool(body, "add_generation_prompt", True)),
        add_special_tokens=bool(_bool(body, "add_special_tokens", False)),
        tools=tools,
    )
