"""Profiles: the required ones exist, numbers follow their derivations, CPU ones match real vLLM."""

from __future__ import annotations

import pytest

from prefixlb.engine import PROFILES, Engine, EngineRequest, get_profile
from prefixlb.engine.profiles import GiB, LLAMA3_8B

from .helpers import run_one

REQUIRED = ["h100-llama3-8b", "h100-llama3-70b-tp4", "a10g-llama3-8b", "cpu-tiny-llama", "cpu-small-llama-88m"]


def test_required_profiles_exist_and_unknown_names_list_them():
    assert set(REQUIRED) <= set(PROFILES)
    with pytest.raises(KeyError, match="known profiles: .*h100-llama3-8b"):
        get_profile("h200-nope")


@pytest.mark.parametrize("name", REQUIRED)
def test_profile_is_servable(name):
    p = get_profile(name)
    assert p.max_model_len <= (p.num_gpu_blocks - 1) * p.block_size
    assert p.max_num_batched_tokens >= 1 and p.max_num_seqs >= 1 and 0.0 <= p.skill <= 1.0
    Engine(p)  # refuses to build when one max-length request cannot fit


def test_llama3_8b_kv_bytes_and_h100_capacity():
    assert LLAMA3_8B.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    p = get_profile("h100-llama3-8b")
    assert 400_000 < p.kv_capacity_tokens < 500_000  # ~54 GiB of KV at 128 KiB/token
    assert 0.005 < p.step_base_s < 0.01  # 16 GB of weights at ~2.3 TB/s


def test_bigger_model_is_slower_and_more_skilled():
    small, big = get_profile("h100-llama3-8b"), get_profile("h100-llama3-70b-tp4")
    assert big.step_base_s > small.step_base_s and big.prefill_tokens_per_s < small.prefill_tokens_per_s
    assert big.skill > small.skill


def test_cpu_tiny_kv_capacity_is_the_measured_524288_tokens():
    p = get_profile("cpu-tiny-llama")
    assert p.kv_capacity_tokens == 524_288 == GiB // 2048 and p.block_size == 32


@pytest.mark.parametrize(
    ("length", "cold_ms", "warm_ms"),
    [(1508, (570, 650), (30, 50)), (3508, (1550, 1680), (50, 75))],
    ids=["1508tok", "3508tok"],
)
def test_cpu_small_llama_reproduces_measured_cold_and_warm_latency(length, cold_ms, warm_ms):
    # real-vllm.md, hitlat.py: a long prompt, then the same prefix with another tail; max_tokens 1.
    # The engine does not model ~4 ms of HTTP and tokenization, so add it back.
    eng = Engine("cpu-small-llama-88m")
    http = 0.004
    shared = list(range(1, length - 1))
    cold = run_one(eng, EngineRequest("cold", shared + [7, 8], max_tokens=1))
    warm = run_one(eng, EngineRequest("warm", shared + [9, 10], max_tokens=1), t=10.0)
    cold_s = cold[-1].end - cold[0].start + http
    warm_s = warm[-1].end - warm[0].start + http
    assert cold_ms[0] / 1e3 <= cold_s <= cold_ms[1] / 1e3
    assert warm_ms[0] / 1e3 <= warm_s <= warm_ms[1] / 1e3


def test_overrides_keep_token_capacity_when_block_size_changes():
    eng = Engine("cpu-tiny-llama", block_size=128)
    assert eng.num_gpu_blocks * 128 == get_profile("cpu-tiny-llama").kv_capacity_tokens
    assert Engine("cpu-tiny-llama", kv_capacity_tokens=4096, block_size=16).num_gpu_blocks == 256
    with pytest.raises(ValueError, match="max_model_len 2048 needs 64 KV blocks"):
        Engine("cpu-tiny-llama", num_gpu_blocks=10)
