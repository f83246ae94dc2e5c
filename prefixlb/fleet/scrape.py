"""Read the load signals a balancer needs from a vLLM ``/metrics`` page.

A targeted line scan, not a full Prometheus parser: a vLLM page is hundreds of lines (mostly
histogram buckets) and is scraped every second from every replica, while the balancer needs
a handful of series. Only the exposition format's invariants are relied on: one sample per
line, ``name{labels} value``, comments starting with ``#``. Values are summed over the
``engine`` label (data-parallel ranks behind one server). The test suite checks the result
against prometheus-client's own parser on the emulator's and real vLLM's pages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["ScrapedLoad", "parse_vllm_metrics"]

_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",  # vLLM <= 0.11
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:prompt_tokens_total": "prompt_tokens",
}
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_MODEL = re.compile(r'model_name="((?:[^"\\]|\\.)*)"')


@dataclass(slots=True)
class ScrapedLoad:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    prompt_tokens: float = 0.0
    engines: int = 0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    models: set[str] = field(default_factory=set)

    @property
    def kv_capacity_tokens(self) -> int | None:
        if self.block_size and self.num_gpu_blocks:
            return self.block_size * self.num_gpu_blocks
        return None


def parse_vllm_metrics(text: str) -> ScrapedLoad:
    """The load signals in a vLLM ``/metrics`` page (missing series read as 0 / None)."""
    out = ScrapedLoad()
    kv_samples = 0
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            close = line.rfind("}")
            if close < brace:
                continue
            name, labels_text, rest = line[:brace], line[brace:close + 1], line[close + 1 :]
        elif space > 0:
            name, labels_text, rest = line[:space], "", line[space:]
        else:
            continue
        if name == "vllm:cache_config_info":
            labels = dict(_LABEL.findall(labels_text))
            try:
                out.block_size = int(labels["block_size"])
                out.num_gpu_blocks = int(labels["num_gpu_blocks"])
            except (KeyError, ValueError):
                pass
            continue
        attr = _GAUGES.get(name)
        if attr is None:
            continue
        try:
            value = float(rest.split()[0])  # an optional timestamp may follow the value
        except (ValueError, IndexError):
            continue
        if labels_text:
            m = _MODEL.search(labels_text)
            if m:
                out.models.add(m.group(1))
        if attr == "kv_usage":
            kv_samples += 1
            out.kv_usage += value
        else:
            setattr(out, attr, getattr(out, attr) + value)
        if name == "vllm:num_requests_running":
            out.engines += 1
    if kv_samples > 1:
        out.kv_usage /= kv_samples  # a fraction: average over data-parallel engines
    return out
