"""The confidence cascade's I/O: ask the cheapest tier first, hold its answer, escalate when
the check fails, and give the client exactly one answer.

For every tier but the last one allowed (``max_tiers``, counted from the tier the pipeline
chose), the request is sent without streaming, with logprobs asked for if the client did not
(they are removed again before the client sees the answer), through the balancer's own
``_forward`` (same replica choice, retries and accounting) into a :class:`BufferedRequest`. The
answer is checked (``prefixlb.routing.cascade``: JSON and tool-call parsing, token logprob
features) and then, if configured, by the verifier (an HTTP endpoint or a Python callable,
bounded by ``verifier_timeout_s``). Accepted: the held answer is sent - as JSON, or as an SSE
stream synthesised from it for a streaming client. Rejected: the escalation is counted and the
next tier is asked. The last tier allowed is forwarded as a plain request, so a streaming client
receives that tier's stream as it is produced.

``deadline_s`` (from the request's arrival) bounds escalation: once it has passed, the answer
in hand is returned even though it failed (outcome ``deadline``). A tier whose replicas fail
(no replica, 5xx after retries) counts as an escalation with reason ``upstream_error``; a 4xx
from a replica is the client's mistake and goes back to it as it is (``error_passed``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from prefixlb import errors
from prefixlb.routing import prompt_key, token_key
from prefixlb.routing.cascade import check_answer, parse_answer

if TYPE_CHECKING:
    from .balancer import Tier
    from .tiering import TierRouting, Trace

__all__ = ["BufferedRequest", "run_cascade", "synthesise_sse"]

log = logging.getLogger("prefixlb.cascade")

_SSE_HEADERS = ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"))
_DROP = frozenset({b"content-type", b"content-length", b"transfer-encoding"})


class BufferedRequest:
    """Stands in for the client's request while a cascade tier answers: the client's path and
    headers, this tier's body; the response is kept, not sent."""

    __slots__ = ("_req", "body", "resp_body", "resp_headers", "status")

    def __init__(self, req, body: bytes) -> None:
        self._req = req
        self.body = body
        self.status: int | None = None
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.resp_body = b""

    @property
    def path(self) -> str:
        return self._req.path

    @property
    def headers(self):
        return self._req.headers

    def header(self, name):
        return self._req.header(name)

    @property
    def prepared(self) -> bool:
        return self.status is not None

    @property
    def is_disconnected(self) -> bool:
        return self._req.is_disconnected

    def respond(self, status: int, headers=(), body: bytes = b"", lines: bytes = b"") -> None:
        self.status = status
        self.resp_headers = list(headers)
        for line in lines.split(b"\r\n")[:-1]:  # rendered header lines (Request.respond): back to pairs
            name, _, value = line.partition(b": ")
            self.resp_headers.append((name, value))
        self.resp_body = body

    def respond_json(self, status: int, body: bytes, headers=()) -> None:
        self.respond(status, ((b"content-type", b"application/json"), *headers), body)

    def start(self, *a, **kw):  # pragma: no cover - cascade tiers are always asked without streaming
        raise RuntimeError("a cascade tier is asked without streaming")

    def __getattr__(self, name: str):
        # anything else the proxy reads (method, client, received_at, ...) is the client request's
        return getattr(self._req, name)


def _tier_body(body: dict, chat: bool, top: int, need_logprobs: bool) -> tuple[dict, bool]:
    """The body a checked tier gets: no streaming, logprobs asked for; (body, logprobs added)."""
    b = dict(body)
    b["stream"] = False
    b.pop("stream_options", None)
    added = False
    if need_logprobs:
        if chat and not b.get("logprobs"):
            b["logprobs"] = True
            if top:
                b["top_logprobs"] = top
            added = True
        elif not chat and b.get("logprobs") is None:
            b["logprobs"] = top
            added = True
    return b, added


def _strip_logprobs(resp: dict) -> dict:
    for ch in resp.get("choices") or ():
        if isinstance(ch, dict) and "logprobs" in ch:
            ch["logprobs"] = None
    return resp


def synthesise_sse(resp: dict, chat: bool, include_usage: bool) -> bytes:
    """An OpenAI SSE stream carrying a complete (non-streaming) response, ``[DONE]`` last."""
    base = {"id": resp.get("id"), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": resp.get("created"), "model": resp.get("model")}
    events: list[dict] = []
    for ch in resp.get("choices") or ():
        if not isinstance(ch, dict):
            continue
        i = ch.get("index", 0)
        if chat:
            msg = ch.get("message") or {}
            events.append(base | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})
            delta: dict[str, Any] = {}
            if msg.get("content"):
                delta["content"] = msg["content"]
            calls = msg.get("tool_calls")
            if calls:
                delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls) if isinstance(c, dict)]
            if delta or ch.get("logprobs"):
                events.append(base | {"choices": [{"index": i, "delta": delta, "logprobs": ch.get("logprobs"),
                                                   "finish_reason": None}]})
            events.append(base | {"choices": [{"index": i, "delta": {}, "logprobs": None,
                                               "finish_reason": ch.get("finish_reason")}]})
        else:
            events.append(base | {"choices": [{"index": i, "text": ch.get("text", ""), "logprobs": ch.get("logprobs"),
                                               "finish_reason": ch.get("finish_reason")}]})
    if include_usage and resp.get("usage") is not None:
        events.append(base | {"choices": [], "usage": resp["usage"]})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


async def _verify(tr: TierRouting, body: dict, resp: dict, tier: str) -> str | None:
    """The verifier's verdict: None (accept) or "verifier"; errors follow ``verifier_on_error``."""
    c = tr.cfg.cascade
    m = tr.metrics.verifier_calls
    try:
        if tr.verifier is not None:
            v = tr.verifier(body, resp, tier)
            if inspect.isawaitable(v):
                v = await asyncio.wait_for(v, c.verifier_timeout_s)
            ok = bool(v)
        else:
            import aiohttp

            if tr.http_session is None:
                tr.http_session = aiohttp.ClientSession()
            async with tr.http_session.post(
                c.verifier_url, data=orjson.dumps({"tier": tier, "request": body, "response": resp}),
                headers={"content-type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=c.verifier_timeout_s),
            ) as r:
                if r.status != 200:
                    raise RuntimeError(f"verifier answered HTTP {r.status}")
                verdict = orjson.loads(await r.read())
            if not isinstance(verdict, dict) or not isinstance(verdict.get("accept"), bool):
                raise RuntimeError('verifier must answer {"accept": true|false}')
            ok = verdict["accept"]
    except Exception as exc:  # noqa: BLE001 - timeouts, connection errors, a raising callable
        m.inc(("error",))
        log.warning("cascade verifier failed (%s); %s", exc or type(exc).__name__,
                    "accepting the answer" if c.verifier_on_error == "accept" else "escalating")
        return None if c.verifier_on_error == "accept" else "verifier_error"
    m.inc(("accept" if ok else "reject",))
    return None if ok else "verifier"


def _deliver(req, held: BufferedRequest, resp: dict | None, chat: bool, stream: bool, strip: bool,
             include_usage: bool) -> None:
    """Send a held answer to the client: as it is, without the logprobs we added, or as SSE."""
    if resp is None or held.status != 200:
        req.respond(held.status or 502, held.resp_headers, held.resp_body)
        return
    if strip:
        resp = _strip_logprobs(resp)
    if stream:
        headers = [(k, v) for k, v in held.resp_headers if k not in _DROP]
        headers.extend(_SSE_HEADERS)
        req.respond(200, headers, synthesise_sse(resp, chat, include_usage))
    elif strip:
        req.respond(200, held.resp_headers, orjson.dumps(resp))
    else:
        req.respond(200, held.resp_headers, held.resp_body)


async def _key_for(b, tier: Tier, body: dict, chat: bool):
    """The prompt key of an escalation tier, as ``Balancer._completion`` computes it for a first tier
    (precise mode: that tier's token ids; otherwise the text)."""
    key = prompt_key(body, chat)  # the balancer parsed this body already: it cannot fail here
    if tier.encoder is not None:
        try:
            return token_key(tier.encoder.prompt_ids(body, chat), body)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a template the request breaks: route on its text
            b.metrics.precise_fallbacks.inc((tier.name,))
    elif getattr(tier, "remote_tokenize", False):
        ids = await b._remote_ids(tier, body, chat)
        if ids is not None:
            return token_key(ids, body)
        b.metrics.precise_fallbacks.inc((tier.name,))
    return key


async def run_cascade(tr: TierRouting, req, trace: Trace, first: Tier, body: dict, chat: bool, model: str | None,
                      key, stream: bool, started: float, prepared) -> None:
    """Answer one request through the cascade starting at ``first`` (see the module docstring)."""
    b = tr.b
    c = tr.cfg.cascade
    tiers = list(b.tiers.values())
    i0 = tiers.index(first)
    chain = tiers[i0 : i0 + c.max_tiers]
    deadline = started + c.deadline_s
    info: dict[str, Any] = {"tiers": [], "reasons": [], "outcome": None, "features": []}
    trace.cascade = info
    m = tr.metrics
    held: tuple[BufferedRequest, dict | None, bool, str] | None = None  # the last rejected answer
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
    for n, tier in enumerate(chain):
        if n == 0:
            k, prep = key, prepared
        else:
            k, prep = await _key_for(b, tier, body, chat), None
        info["tiers"].append(tier.name)
        if n == len(chain) - 1:
            info["outcome"] = "top"
            m.cascade_outcomes.inc(("top", tier.name))
            await b._forward(req, tier, dict(body), model, k, stream, started, prep, trace)
            return
        checks = tr.tier_checks.get(tier.name, tr.checks)
        ub, added = _tier_body(body, chat, c.top_logprobs, checks.uses_logprobs)
        held_req = BufferedRequest(req, orjson.dumps(ub))
        reason = None
        resp = None
        try:
            await b._forward(held_req, tier, ub, model, k, False, started, prep, trace)
        except errors.PrefixlbError as exc:
            if exc.status < 500:
                raise
            reason = "upstream_error"
            log.info("cascade: tier %s failed for request %s (%s); escalating", tier.name, trace.request_id, exc)
        else:
            if held_req.status != 200:
                info["outcome"] = "error_passed"
                m.cascade_outcomes.inc(("error_passed", tier.name))
                _deliver(req, held_req, None, chat, stream, False, include_usage)
                return
            try:
                resp = orjson.loads(held_req.resp_body)
            except orjson.JSONDecodeError:
                resp = None
            if not isinstance(resp, dict):
                reason, resp = "unparsable", None
            else:
                reason, feats = check_answer(parse_answer(resp, chat), body, checks)
                info["features"].append(feats.as_dict() if feats is not None else None)
                if reason is None and (tr.verifier is not None or c.verifier_url):
                    reason = await _verify(tr, body, resp, tier.name)
            if reason is None:
                info["outcome"] = "accepted"
                m.cascade_outcomes.inc(("accepted", tier.name))
                _deliver(req, held_req, resp, chat, stream, added, include_usage)
                return
            held = (held_req, resp, added, tier.name)
        info["reasons"].append(reason)
        if time.perf_counter() >= deadline and held is not None:
            info["outcome"] = "deadline"
            m.cascade_outcomes.inc(("deadline", held[3]))
            _deliver(req, held[0], held[1], chat, stream, held[2], include_usage)
            return
        m.cascade_escalations.inc((tier.name, reason))
        log.debug("cascade: request %s escalates from %s (%s)", trace.request_id, tier.name, reason)
