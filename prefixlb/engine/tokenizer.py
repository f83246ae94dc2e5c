"""Tokenizers: a deterministic byte rule by default, a real Hugging Face tokenizer on request.

:class:`ByteTokenizer` (the default) cuts the UTF-8 bytes into 4-byte chunks, about what BPE
gets on English text. Ids (all < 2**32, so the fast hash can pack them as uint32):

* a chunk of 4 ASCII bytes is its little-endian uint32 (every byte < 0x80, so < 0x80000000);
* a last chunk of k = 1..3 ASCII bytes is ``0x80000000 | k << 24 | value``;
* a chunk holding any non-ASCII byte becomes one byte token per byte: ``0x84000000 | byte``;
* specials: ``<pad>`` 0x85000000, ``<s>`` (BOS) 0x85000001, ``</s>`` (EOS) 0x85000002.

Encoding is exact (``decode(encode(t)) == t``), prefix-stable (a text that extends another
yields a token list that extends the other's, except the last token, or the last three when
the shorter text ends in non-ASCII bytes), and prepends BOS as Llama tokenizers do. ASCII text
is encoded and decoded with bulk ``array`` operations, never a per-character loop.

:class:`HFTokenizer` loads ``tokenizer.json`` with the ``tokenizers`` library and renders the
chat template with ``jinja2`` as transformers/vLLM do; both packages are imported lazily.
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ByteTokenizer",
    "CachedEncoder",
    "Prepared",
    "HFTokenizer",
    "Tokenizer",
    "default_tokenizer",
    "prompt_text",
    "render_default_chat",
    "request_prompt_ids",
]

_LITTLE = sys.byteorder == "little"


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine and emulator need from a tokenizer."""

    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def sample_pool(self) -> Sequence[int]:
        """Ids a synthetic model may emit: decodable, not special (the engine draws from these)."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...
    def token_str(self, token_id: int) -> str: ...
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str: ...


# -- default chat template ----------------------------------------------------------------------

#: The Jinja form of the default template (the one ../shared/real-vllm.md's tiny model uses).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _content_text(content: Any) -> str:
    # OpenAI content: a string, or a list of parts; text parts are joined with newlines (vLLM's
    # "string" content format). Non-text parts are ignored: the engine models text only.
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type", "text") == "text"
        )
    return str(content)


def render_default_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``; tools as a leading block.

    A conversation's rendering is a prefix of its continuation's (multi-turn prefix reuse).
    """
    parts: list[str] = []
    if tools:
        parts.append("<|tools|>\n" + json.dumps(list(tools), sort_keys=True, separators=(",", ":")) + "\n")
    for m in messages:
        parts.append(f"<|{m.get('role', 'user')}|>\n{_content_text(m.get('content'))}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


# -- ByteTokenizer --------------------------------------------------------------------------------

_PARTIAL = 0x80000000
_BYTE = 0x84000000
_PAD, _BOS, _EOS = 0x85000000, 0x85000001, 0x85000002
_SPECIAL_STR = {_PAD: "<pad>", _BOS: "<s>", _EOS: "</s>"}
_HIGH_BITS = 0x80808080

# 4-byte pieces of common English the synthetic model emits; decoded they read as words.
_WORDS = (
    " the and for you are not but can all one has its was use new how why way may now any get see two "
    "day out who did let set put end try ask own old big few low top run key map log row add sum max "
    "min fit hit say yes job sky sea red box cup dog cat fox sun war law art age air arm bed car cut "
    "eye far fun gas hot ice joy kid lot man mix oil pay pen pop raw sad ship"
).split()
_POOL_TEXT = tuple(" " + w[:3].ljust(3, "s") for w in _WORDS)


def _u32(data: bytes) -> list[int]:
    a = array("I")
    a.frombytes(data)
    if not _LITTLE:
        a.byteswap()
    return a.tolist()


def _u32_bytes(ids: Sequence[int]) -> bytes:
    a = array("I", ids)
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()


class ByteTokenizer:
    """Deterministic ~4-bytes-per-token tokenizer (see the module docstring for the id layout)."""

    bos_token_id: int = _BOS
    eos_token_id: int = _EOS
    pad_token_id: int = _PAD
    vocab_size: int = _EOS + 1
    bos_token: str = "<s>"
    eos_token: str = "</s>"

    def __init__(self) -> None:
        self._pool: tuple[int, ...] | None = None

    @property
    def sample_pool(self) -> Sequence[int]:
        if self._pool is None:
            self._pool = tuple(self.encode(t, add_special_tokens=False)[0] for t in _POOL_TEXT)
        return self._pool

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS first when ``add_special_tokens``."""
        data = text.encode("utf-8")
        if data.isascii():
            return self._encode_ascii(data, add_special_tokens).tolist()
        return self._encode_bytes(data, add_special_tokens)

    def encode_array(self, text: str, add_special_tokens: bool = True) -> array:
        """:meth:`encode` as ``array('I')``: ASCII text never becomes a list of Python ints
        (most of the cost of encoding a long prompt)."""
        data = text.encode("utf-8")
        if data.isascii():
            return self._encode_ascii(data, add_special_tokens)
        return array("I", self._encode_bytes(data, add_special_tokens))

    @staticmethod
    def _encode_ascii(data: bytes, add_special_tokens: bool) -> array:
        n = len(data) & ~3
        body = array("I")
        body.frombytes(data[:n])
        if not _LITTLE:
            body.byteswap()
        ids = array("I", [_BOS]) + body if add_special_tokens else body
        tail = data[n:]
        if tail:
            ids.append(_PARTIAL | len(tail) << 24 | int.from_bytes(tail, "little"))
        return ids

    @staticmethod
    def _encode_bytes(data: bytes, add_special_tokens: bool) -> list[int]:
        n = len(data) & ~3
        ids: list[int] = [_BOS] if add_special_tokens else []
        if data.isascii():
            ids += _u32(data[:n])
        else:
            for v in _u32(data[:n]):
                if v & _HIGH_BITS:
                    ids += (_BYTE | (v & 0xFF), _BYTE | (v >> 8 & 0xFF), _BYTE | (v >> 16 & 0xFF), _BYTE | (v >> 24))
                else:
                    ids.append(v)
        tail = data[n:]
        if tail:
            if tail.isascii():
                ids.append(_PARTIAL | len(tail) << 24 | int.from_bytes(tail, "little"))
            else:
                ids += [_BYTE | b for b in tail]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 (a cut multi-byte character) decodes as U+FFFD."""
        if not ids:
            return ""
        if max(ids) < _PARTIAL:
            return _u32_bytes(ids).decode("utf-8", "replace")
        out = bytearray()
        run: list[int] = []
        for t in ids:
            if t < _PARTIAL:
                run.append(t)
                continue
            if run:
                out += _u32_bytes(run)
                run = []
            out += self._piece(t, skip_special_tokens)
        if run:
            out += _u32_bytes(run)
        return out.decode("utf-8", "replace")

    def token_str(self, token_id: int) -> str:
        """Printable form of one token (specials by name, raw bytes as ``<0xNN>``)."""
        if _BYTE <= token_id < _PAD:
            return f"<0x{token_id & 0xFF:02X}>"
        if token_id in _SPECIAL_STR:
            return _SPECIAL_STR[token_id]
        return self._piece(token_id, False).decode("utf-8", "replace")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        return render_default_chat(messages, add_generation_prompt, tools)

    @staticmethod
    def _piece(t: int, skip_special: bool) -> bytes:
        if t < _PARTIAL:
            return t.to_bytes(4, "little")
        if t < _BYTE:
            k = (t >> 24) & 0x7F
            if not 1 <= k <= 3:
                raise ValueError(f"token id {t:#x} is not a ByteTokenizer id")
            return (t & 0xFFFFFF).to_bytes(3, "little")[:k]
        if t < _PAD:
            if t > _BYTE | 0xFF:
                raise ValueError(f"token id {t:#x} is not a ByteTokenizer id")
            return bytes((t & 0xFF,))
        if t in _SPECIAL_STR:
            return b"" if skip_special else _SPECIAL_STR[t].encode()
        raise ValueError(f"token id {t:#x} is not a ByteTokenizer id")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_DEFAULT: ByteTokenizer | None = None


def chat_prompt_ids(tok: Tokenizer, messages: list[dict[str, Any]], *, tools: list[Any] | None = None,
                    add_generation_prompt: bool = True, add_special_tokens: bool = False) -> list[int]:
    """A chat request's prompt tokens as vLLM builds them: the chat template rendered, then
    encoded without special tokens (the template carries its own, e.g. no extra BOS)."""
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    return tok.encode(text, add_special_tokens=add_special_tokens)


def prompt_text(tok: Tokenizer, body: dict[str, Any], chat: bool) -> tuple[str, bool] | list[int]:
    """What a vLLM replica tokenizes for a well-formed request body: ``(text, add_special_tokens)``,
    or the token ids themselves when the prompt was given as ids."""
    if chat:
        text = tok.apply_chat_template(body["messages"], add_generation_prompt=body.get("add_generation_prompt", True),
                                       tools=body.get("tools"))
        return text, bool(body.get("add_special_tokens", False))
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return list(prompt)
    return prompt, bool(body.get("add_special_tokens", True))


def request_prompt_ids(tok: Tokenizer, body: dict[str, Any], chat: bool) -> list[int]:
    """Prompt tokens of a well-formed OpenAI request body (chat or completions), as a vLLM
    replica computes them. No validation: the emulator's protocol layer validates client input;
    this serves callers that generated the body themselves (simulator, benchmark bounds)."""
    got = prompt_text(tok, body, chat)
    if isinstance(got, list):
        return got
    return tok.encode(got[0], add_special_tokens=got[1])


@dataclass(slots=True)
class Prepared:
    """A prompt as far as :meth:`CachedEncoder.prepare` could tokenize it without encoding."""

    ids: list[int]  # exact ids of the prompt's start (all of it when ``complete``)
    total: int  # the prompt's length in tokens (exact when ``complete``, else estimated)
    complete: bool
    text: str  # the rendered prompt, for ``finish``
    special: bool  # add_special_tokens


class CachedEncoder:
    """``request_prompt_ids`` for a balancer's hot path: shared prefixes are tokenized once.

    The rendered prompt is cut into chunks of about ``chunk_chars`` at the start of a word
    (a non-space character, then a space, then a word character): byte-level BPE pre-tokenizers
    (GPT-2, Llama 3, Qwen...) and Metaspace ones never merge across that point, so encoding the
    chunks separately and concatenating gives the same ids. Chunks are cut from the start of the
    text, so prompts sharing a prefix share its chunks, and each chunk's ids are cached (bounded
    by ``cache_tokens`` in total, oldest first out).

    That equivalence is a property of the tokenizer, so it is checked, not assumed: at start on
    a sample text, then on one request in ``verify_every`` (the whole text encoded too). If it
    ever fails, chunking is switched off for good (whole-text encoding, still exact) and
    ``mismatches`` says so.
    """

    _CUT = None

    def __init__(self, tok: Tokenizer, *, chunk_chars: int = 2048, cache_tokens: int = 4_000_000,
                 verify_every: int = 256) -> None:
        import re

        if CachedEncoder._CUT is None:
            CachedEncoder._CUT = re.compile(r"(?<=\S) (?=\w)")
        self.tok = tok
        self.chunk_chars = chunk_chars
        self.cache_tokens = cache_tokens
        self.verify_every = verify_every
        self._cache: dict[str, list[int]] = {}
        self._cached_tokens = 0
        self._calls = 0
        self.hits = 0
        self.misses = 0
        self.mismatches = 0
        specials = tok.encode("", add_special_tokens=True)
        self._specials = list(specials)  # what add_special_tokens puts in front (BOS), if anything
        self.chunking = self._self_test()
        self.tokens_per_char = 0.25  # learned from every full encoding (prepare's estimate of a tail)
        self._ratio_seen = 0

    def _self_test(self) -> bool:
        sample = ("The quick brown fox's 2,048 tokens: don't stop -- naïve café, \"quoted\" (x=42)!\n\n"
                  "  indented\tcode = [1, 2, 3]  # comment\nnext line ends. ") * 40
        try:
            chunked = self._chunked(sample, use_cache=False)
            whole = self.tok.encode(sample, add_special_tokens=False)
        except Exception:  # noqa: BLE001 - a tokenizer we cannot chunk: encode whole texts
            return False
        return chunked == whole

    def _chunked(self, text: str, use_cache: bool = True) -> list[int]:
        enc = self.tok.encode
        cut = self._CUT
        out: list[int] = []
        n = len(text)
        pos = 0
        cache = self._cache
        while pos < n:
            m = cut.search(text, pos + self.chunk_chars) if n - pos > 2 * self.chunk_chars else None
            end = m.start() if m else n
            piece = text[pos:end]
            ids = cache.get(piece) if use_cache else None
            if ids is None:
                ids = enc(piece, add_special_tokens=False)
                if use_cache:
                    self.misses += 1
                    if end < n:  # the last piece is usually the unique part: do not cache it
                        self._remember(piece, ids)
            else:
                self.hits += 1
            out += ids
            pos = end
        return out

    def _remember(self, piece: str, ids: list[int]) -> None:
        cache = self._cache
        cache[piece] = ids
        self._cached_tokens += len(ids)
        while self._cached_tokens > self.cache_tokens and cache:
            old = next(iter(cache))
            self._cached_tokens -= len(cache.pop(old))

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if not self.chunking or len(text) <= 2 * self.chunk_chars:
            return self.tok.encode(text, add_special_tokens=add_special_tokens)
        ids = self._chunked(text)
        self._calls += 1
        if self.verify_every and self._calls % self.verify_every == 0:
            whole = self.tok.encode(text, add_special_tokens=False)
            if whole != ids:
                self.mismatches += 1
                self.chunking = False
                self._cache.clear()
                ids = whole
        return (self._specials + ids) if add_special_tokens else ids

    def prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        got = prompt_text(self.tok, body, chat)
        if isinstance(got, list):
            return got
        return self.encode(got[0], got[1])

    def prepare(self, body: dict[str, Any], chat: bool) -> Prepared:
        """What routing needs *now*: the prompt's ids as far as its chunks are already cached (a
        shared prefix seen before), and an estimate of the total. Encoding the rest -- usually the
        request's unique tail, which no replica can hold -- is ``finish``'s job, after dispatch.

        A prefix this encoder has not seen yet (or whose chunks it has dropped) is matched only
        as far as it knows it; the full encoding that follows dispatch fills the cache."""
        got = prompt_text(self.tok, body, chat)
        if isinstance(got, list):
            return Prepared(got, len(got), True, "", False)
        text, special = got
        head = self._specials if special else []
        if not self.chunking or len(text) <= 2 * self.chunk_chars:
            ids = self.tok.encode(text, add_special_tokens=special)  # short: exact, and cheap
            return Prepared(ids, len(ids), True, text, special)
        ids = list(head)
        cut, cache, n, pos = self._CUT, self._cache, len(text), 0
        while n - pos > 2 * self.chunk_chars:
            m = cut.search(text, pos + self.chunk_chars)
            if m is None:
                break
            piece = cache.get(text[pos:m.start()])
            if piece is None:
                break
            ids += piece
            pos = m.start()
        est = len(ids) + round((n - pos) * self.tokens_per_char)
        return Prepared(ids, est, False, text, special)

    def finish(self, p: Prepared) -> list[int]:
        """The exact ids of a prepared prompt (run it off the event loop: ``tokenizers`` releases
        the GIL while it encodes); fills the chunk cache and the tokens-per-character estimate."""
        if p.complete:
            return p.ids
        ids = self.encode(p.text, p.special)
        if p.text:
            ratio = len(ids) / len(p.text)
            self._ratio_seen += 1
            self.tokens_per_char += (ratio - self.tokens_per_char) / min(self._ratio_seen, 20)
        return ids


def default_tokenizer() -> ByteTokenizer:
    """A shared :class:`ByteTokenizer` (stateless apart from a cached sample pool)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = ByteTokenizer()
    return _DEFAULT


# -- HFTokenizer ----------------------------------------------------------------------------------


def _need(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs the {module!r} package: pip install {module}") from exc


def _token_text(tok: Any) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, Mapping):  # tokenizer_config.json may store an AddedToken dict
        return tok.get("content")
    return str(tok)


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory, without transformers.

    Special-token handling follows the ``tokenizers`` post-processor in ``tokenizer.json`` (so BOS
    is added when the model's tokenizer adds it). The chat template comes from
    ``chat_template.jinja`` or ``tokenizer_config.json`` and is rendered in a sandboxed Jinja
    environment with ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and
    ``tools``, plus transformers' helpers ``raise_exception`` and ``tojson``.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        if eos_id is None:
            raise ValueError(f"EOS token {eos_token!r} is not in the vocabulary")
        self.eos_token_id: int = eos_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._compiled: Any = None
        self._pool: list[int] | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``) from ``path``."""
        tokenizers = _need("tokenizers", "HFTokenizer")
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in {path!r}")
        tok = tokenizers.Tokenizer.from_file(tok_file)
        config: dict[str, Any] = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                config = json.load(f)
        template = None
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        else:
            ct = config.get("chat_template")
            if isinstance(ct, list):  # named templates: transformers uses "default"
                named = {t.get("name"): t.get("template") for t in ct if isinstance(t, Mapping)}
                ct = named.get("default") or next(iter(named.values()), None)
            template = ct
        return cls(
            tok,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            chat_template=template,
        )

    @property
    def sample_pool(self) -> Sequence[int]:
        if self._pool is None:
            special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
            self._pool = [i for i in range(self.vocab_size) if i not in special]
        return self._pool

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_str(self, token_id: int) -> str:
        return str(self._tok.decode([token_id], skip_special_tokens=False))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        if self.chat_template is None:
            return render_default_chat(messages, add_generation_prompt, tools)
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        return str(
            self._compiled.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                tools=list(tools) if tools else None,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        )

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"


def _compile_template(source: str) -> Any:
    jinja2 = _need("jinja2", "chat templates")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        # transformers' tojson: no HTML escaping, unlike Jinja's built-in filter
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
