"""A model of one vLLM replica: paged KV cache with prefix caching, continuous batching,
step-time model, KV events, vLLM's counters, and a quality model for tiers.

Pure logic driven by a clock the caller passes in; imports nothing else from prefixlb. Used by
the emulator (real HTTP, scaled wall clock) and the simulator (virtual clock)::

    eng = Engine("h100-llama3-8b")
    eng.add_request(EngineRequest("r1", eng.tokenizer.encode("Hello"), max_tokens=8), now=0.0)
    t = 0.0
    while eng.has_unfinished():
        res = eng.step(t)      # outputs and events take effect at res.end
        t = res.end
"""

from .engine import Engine
from .events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from .hashing import HASH_ALGOS, BlockHasher, external_hash, none_hash
from .kv_cache import CachedPrefix, KVBlocks, KVCacheManager
from .outputs import FinishReason, RequestOutput, RequestTimes, StepResult, TokenLogprob
from .profiles import PROFILES, Profile, get_profile
from .quality import QualityOutcome, assess, prompt_difficulty, token_difficulty, token_logprob
from .request import EngineRequest
from .stats import EngineCounters, MetricsSnapshot
from .timing import StepComposition, chunk_pairs, step_duration
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, chat_prompt_ids, default_tokenizer, request_prompt_ids

__all__ = [
    "HASH_ALGOS",
    "PROFILES",
    "AllBlocksCleared",
    "BlockHasher",
    "BlockRemoved",
    "BlockStored",
    "ByteTokenizer",
    "CachedPrefix",
    "Engine",
    "EngineCounters",
    "EngineRequest",
    "FinishReason",
    "HFTokenizer",
    "KVBlocks",
    "KVCacheManager",
    "KVEvent",
    "MetricsSnapshot",
    "Profile",
    "QualityOutcome",
    "RequestOutput",
    "RequestTimes",
    "StepComposition",
    "StepResult",
    "TokenLogprob",
    "Tokenizer",
    "assess",
    "chunk_pairs",
    "chat_prompt_ids",
    "default_tokenizer",
    "request_prompt_ids",
    "external_hash",
    "get_profile",
    "none_hash",
    "prompt_difficulty",
    "step_duration",
    "token_difficulty",
    "token_logprob",
]
