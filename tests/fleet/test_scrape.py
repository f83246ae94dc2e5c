"""The targeted /metrics scan agrees with prometheus-client's parser on vLLM pages."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from prefixlb.fleet.scrape import parse_vllm_metrics

PAGE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny-llama"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 7.0
vllm:num_requests_waiting{engine="1",model_name="tiny-llama"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="tiny-llama"} 0.7
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny-llama"} 4800.0
vllm:prefix_cache_queries_created{engine="0",model_name="tiny-llama"} 1.79e+09
vllm:prefix_cache_hits_total{engine="0",model_name="tiny-llama"} 2112.0
vllm:cache_config_info{block_size="32",enable_prefix_caching="True",engine="0",num_gpu_blocks="80",prefix_caching_hash_algo="sha256"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny-llama"} 0.0
"""


def test_scan_matches_the_reference_parser():
    got = parse_vllm_metrics(PAGE)
    ref = {}
    for fam in text_string_to_metric_families(PAGE):
        for s in fam.samples:
            ref.setdefault(s.name, []).append(s.value)
    assert got.running == sum(ref["vllm:num_requests_running"]) == 5
    assert got.waiting == sum(ref["vllm:num_requests_waiting"]) == 8
    assert abs(got.kv_usage - 0.6) < 1e-9
    assert got.prefix_queries == 4800 and got.prefix_hits == 2112
    assert got.block_size == 32 and got.num_gpu_blocks == 80 and got.kv_capacity_tokens == 2560
    assert got.models == {"tiny-llama"} and got.engines == 2


def test_old_vllm_gauge_name_and_timestamps_and_garbage():
    page = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.25 1700000000000\nvllm:num_requests_waiting 4\nvllm:broken{\ngarbage line\n'
    got = parse_vllm_metrics(page)
    assert got.kv_usage == 0.25 and got.waiting == 4 and got.block_size is None
