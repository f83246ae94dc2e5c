"""KV-cache events, as vLLM's ``vllm/distributed/kv_events.py`` defines them (field names kept).

The engine produces these; the emulator encodes them to vLLM's msgpack wire format. Hashes are
the 64-bit ints of :func:`prefixlb.engine.hashing.external_hash`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

__all__ = ["MEDIUM_GPU", "AllBlocksCleared", "BlockRemoved", "BlockStored", "KVEvent"]

#: vLLM reports "GPU" even on its CPU build (checked in ../shared/real-vllm.md).
MEDIUM_GPU = "GPU"


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Newly full blocks of one request in one step, in chain order.

    ``parent_block_hash`` is the hash of the block before the first new one (None at the
    start of the sequence); ``token_ids`` are the new blocks' tokens (``len == n * block_size``).
    ``extra_keys`` is one entry per block (vLLM 0.33's untagged form), or None when no block
    has extra keys.
    """

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None
    extra_keys: list[tuple[Any, ...] | None] | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """A cached block was evicted (reallocated); vLLM sends one hash per event."""

    block_hashes: list[int]
    medium: str | None = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The prefix cache was reset (``/reset_prefix_cache``)."""


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]
