"""``/metrics``: vLLM's names and labels, counters that add up to the requests sent."""

from __future__ import annotations

import aiohttp

from prefixlb.emulator import EmulatedFleet

from .helpers import SMALL, TIMEOUT, metrics, one, post

PREFIX = " ".join(f"shared{i} prefix text" for i in range(30))

VLLM_SERIES = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:request_prefill_time_seconds_bucket",
    "vllm:cache_config_info",
}


async def test_counters_and_labels_match_the_requests_sent() -> None:
    async with EmulatedFleet(2, **SMALL) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        url = fleet.urls[0]
        usages = []
        for suffix in ("a", "b", "c"):
            status, body, _ = await post(
                s, url + "/v1/completions", {"prompt": PREFIX + " " + suffix, "max_tokens": 4, "ignore_eos": True}
            )
            assert status == 200
            usages.append(body["usage"])
        status, body, _ = await post(
            s,
            url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": PREFIX}], "max_tokens": 3, "ignore_eos": True},
        )
        usages.append(body["usage"])
        m = await metrics(s, url)
        other = await metrics(s, fleet.urls[1])
    assert set(m) >= VLLM_SERIES
    labels = {"model_name": "tiny-llama", "engine": "0"}
    for name in (
        "vllm:prefix_cache_queries_total",
        "vllm:num_requests_running",
        "vllm:time_to_first_token_seconds_count",
    ):
        assert list(m[name]) == [tuple(sorted(labels.items()))]
    prompt = sum(u["prompt_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert one(m["vllm:prefix_cache_queries_total"]) == prompt
    assert one(m["vllm:prefix_cache_hits_total"]) == cached > 0
    assert one(m["vllm:prompt_tokens_total"]) == prompt
    assert one(m["vllm:generation_tokens_total"]) == generated == 15
    success = m["vllm:request_success_total"]
    assert {dict(k)["finished_reason"] for k in success} == {"stop", "length", "abort", "error", "repetition"}
    assert one(success, finished_reason="length") == 4 and one(success, finished_reason="abort") == 0
    assert one(m["vllm:num_requests_running"]) == 0 and one(m["vllm:num_requests_waiting"]) == 0
    assert one(m["vllm:num_preemptions_total"]) == 0
    assert one(m["vllm:time_to_first_token_seconds_count"]) == 4
    assert one(m["vllm:e2e_request_latency_seconds_count"]) == 4
    assert one(m["vllm:inter_token_latency_seconds_count"]) == generated - 4
    assert one(m["vllm:request_prefill_time_seconds_count"]) == 4
    # vLLM's bucket boundaries
    ttft_le = sorted(float(dict(k)["le"]) for k in m["vllm:time_to_first_token_seconds_bucket"])
    assert ttft_le[:3] == [0.001, 0.005, 0.01] and ttft_le[-2] == 2560.0
    e2e_le = sorted(float(dict(k)["le"]) for k in m["vllm:e2e_request_latency_seconds_bucket"])
    assert e2e_le[0] == 0.3 and e2e_le[-2] == 7680.0
    info = dict(next(iter(m["vllm:cache_config_info"])))
    assert info["block_size"] == "16" and info["num_gpu_blocks"] == "40" and info["enable_prefix_caching"] == "True"
    assert info["prefix_caching_hash_algo"] == "sha256" and info["engine"] == "0"
    # each replica has its own registry: the other one saw nothing
    assert one(other["vllm:prefix_cache_queries_total"]) == 0


async def test_durations_are_emulated_seconds_whatever_the_time_scale() -> None:
    body = {"prompt": PREFIX, "max_tokens": 8, "ignore_eos": True}
    sums = []
    for scale in (5.0, 50.0):
        async with (
            EmulatedFleet(1, **{**SMALL, "time_scale": scale}) as fleet,
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
        ):
            status, _, _ = await post(s, fleet.urls[0] + "/v1/completions", body)
            assert status == 200
            m = await metrics(s, fleet.urls[0])
            sums.append(one(m["vllm:e2e_request_latency_seconds_sum"]))
            assert one(m["prefixlb_emulator_time_scale"]) == scale
    # the same request on the same modelled hardware: the same emulated latency
    assert abs(sums[0] - sums[1]) <= 0.05 * max(sums)
    assert sums[0] > 0


def test_fast_exposition_is_prometheus_clients_byte_for_byte() -> None:
    """The emulator renders /metrics with TextFormat (headers and label prefixes cached): the
    text must be generate_latest's exactly, through every kind of update."""
    import random

    from prometheus_client import generate_latest

    from prefixlb.emulator.metrics import ReplicaMetrics
    from prefixlb.engine import Engine

    m = ReplicaMetrics(Engine("h100-llama3-8b"), time_scale=1.0)
    rng = random.Random(7)
    hists = [h for h in vars(m).values() if type(h).__name__ == "Histogram"]
    assert len(hists) >= 5
    for round_ in range(20):
        assert m.exposition() == generate_latest(m.registry), f"round {round_}"
        for h in hists:
            for _ in range(rng.randrange(0, 30)):
                h.observe(rng.choice([0.0, 1e-4, rng.expovariate(2.0), 3e3, 1e7]))
        m.stop_string_finishes += rng.randrange(3)
