"""The prompt key: the canonical bytes a request's KV-cache reuse depends on, and a seed.

Contract (DESIGN.md "Prompt key"): chat messages are serialized so that a conversation's bytes
are a prefix of its continuation's bytes (each message is framed on its own and the frames are
concatenated), so turn N+1 of a chat matches turn N in the index. Completions use the prompt
string; a prompt given as token ids is hashed over the ids' bytes (little-endian uint32), so
two different token-id prompts never share a key merely because they have the same length.

What changes the cached prefix without changing the messages is folded into the seed of the
block chain: ``cache_salt`` (vLLM mixes it into the first block's hash, so two salts never
share cache) and the LoRA adapter. Tool definitions are rendered by chat templates ahead of the
messages, so they open the key.

Everything here is pure and allocation-light: the server calls it once per request on the
already-parsed body.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import xxhash

__all__ = ["PromptError", "PromptKey", "prompt_key", "token_key"]

# Frame markers: bytes that cannot appear in UTF-8 text (0xFE/0xFF never occur in UTF-8), so a
# message's content can never imitate a frame boundary.
_MSG = b"\xfe\xfe"
_SEP = b"\xff"
_MAX_INLINE_DATA = 256  # longer data: URLs (base64 images) are replaced by their 64-bit hash


class PromptError(ValueError):
    """The body has no usable prompt (the server answers 400 with this message)."""


@dataclass(frozen=True, slots=True)
class PromptKey:
    data: bytes  # canonical bytes to hash into blocks
    seed: int  # chain seed: cache_salt / adapter
    text_bytes: int  # bytes of text, for token estimates (token-id prompts: 4 per id)
    token_ids: int | None = None  # exact prompt length when the prompt was given as ids


def _seed(body: Mapping[str, Any]) -> int:
    salt = body.get("cache_salt")
    lora = body.get("lora_request") or body.get("lora_name")
    if not salt and not lora:
        return 0
    return xxhash.xxh64_intdigest(f"{salt or ''}\x00{lora or ''}".encode())


def _content_bytes(content: Any, where: str) -> bytes:
    if content is None:
        return b""
    if isinstance(content, str):
        return content.encode("utf-8", "surrogatepass")
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part.encode("utf-8", "surrogatepass"))
                continue
            if part.__class__ is not dict and not isinstance(part, Mapping):
                raise PromptError(f"{where}.content[{i}] must be an object or a string")
            kind = part.get("type")
            if kind == "text" or "text" in part:
                text = part.get("text")
                if not isinstance(text, str):
                    raise PromptError(f"{where}.content[{i}].text must be a string")
                parts.append(text.encode("utf-8", "surrogatepass"))
            else:
                # image_url / input_audio / file ...: the referenced data identifies the tokens
                blob = orjson.dumps(part, option=orjson.OPT_SORT_KEYS)
                if len(blob) > _MAX_INLINE_DATA:
                    blob = b"#" + xxhash.xxh64_digest(blob)
                parts.append(blob)
        return _SEP.join(parts)
    raise PromptError(f"{where}.content must be a string, a list of parts, or null")


def _chat_key(body: Mapping[str, Any]) -> tuple[bytes, int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise PromptError("'messages' must be a non-empty list")
    out: list[bytes] = []  # joined once at the end: one copy of the prompt, not one per message
    tools = body.get("tools")
    if tools:
        out += (b"tools", _SEP, orjson.dumps(tools, option=orjson.OPT_SORT_KEYS), _MSG)
    text = 0
    for i, m in enumerate(messages):
        if m.__class__ is not dict and not isinstance(m, Mapping):  # (dict first: an ABC check costs 4x)
            raise PromptError(f"messages[{i}] must be an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise PromptError(f"messages[{i}].role must be a string")
        content = _content_bytes(m.get("content"), f"messages[{i}]")
        text += len(content)
        out += (_MSG, role.encode(), _SEP, content)
        for extra in ("name", "tool_call_id"):
            v = m.get(extra)
            if isinstance(v, str):
                out += (_SEP, extra.encode(), b"=", v.encode())
        calls = m.get("tool_calls")
        if calls:
            out += (_SEP, orjson.dumps(calls, option=orjson.OPT_SORT_KEYS))
    return b"".join(out), text


def _ids_bytes(ids: Sequence[Any], where: str) -> bytes:
    try:
        return array("I", ids).tobytes()
    except (TypeError, OverflowError) as exc:
        raise PromptError(f"{where} must be a list of token ids (non-negative integers)") from exc


def token_key(ids: Sequence[int], body: Mapping[str, Any], total_tokens: int | None = None) -> PromptKey:
    """The prompt key of a prompt already turned into the replica's token ids (precise mode):
    4 bytes per token, so an index block of ``4 * block_size`` bytes is one vLLM block.
    ``ids`` may be the prompt's start only, with ``total_tokens`` its (estimated) length."""
    data = _ids_bytes(ids, "prompt token ids")
    return PromptKey(data, _seed(body), len(data), token_ids=max(len(ids), total_tokens or 0))


def prompt_key(body: Mapping[str, Any], chat: bool) -> PromptKey:
    """The prompt key of an OpenAI-style request body (chat or completions).

    Raises PromptError (a ValueError) when the body carries no usable prompt.
    """
    seed = _seed(body)
    if chat:
        data, text = _chat_key(body)
        return PromptKey(data, seed, text)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        data = prompt.encode("utf-8", "surrogatepass")
        return PromptKey(data, seed, len(data))
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            data = _ids_bytes(prompt, "'prompt'")
            return PromptKey(data, seed, len(data), token_ids=len(prompt))
        # a batch: vLLM serves each prompt as its own request; route by the first one
        if isinstance(first, str):
            data = first.encode("utf-8", "surrogatepass")
            return PromptKey(data, seed, len(data))
        if isinstance(first, list) and first:
            data = _ids_bytes(first, "'prompt[0]'")
            return PromptKey(data, seed, len(data), token_ids=len(first))
    raise PromptError("'prompt' must be a string, a list of strings, or a list of token ids")
