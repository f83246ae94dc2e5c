"""Paged KV cache with prefix caching, mirroring vLLM v1's ``KVCacheManager`` + ``BlockPool``.

Semantics (read from ``vllm/v1/core/{kv_cache_manager,block_pool,kv_cache_utils,
single_type_kv_cache_manager}.py``; our own code):

* ``num_gpu_blocks`` includes block 0, the reserved null block: ``num_gpu_blocks - 1`` usable.
* Free blocks sit in one queue; allocation takes from the front. Initially the queue holds
  blocks ``1 .. num_gpu_blocks-1`` in order.
* A request's blocks are freed tail first. Freed blocks that carry a hash (cached) go to the
  back of the queue, so the least recently freed cached block is reused first and a request's
  tail is evicted before its head. Freed blocks without a hash (a partial last block) go to the
  front: they have no reuse value (vLLM PR #42656, "Apply LRU policy only to proper cache
  entries", merged 2026-05; earlier releases appended every freed block to the back).
* Eviction is lazy: a freed cached block stays hittable until it is reallocated; reallocating
  it drops its hash and emits one ``BlockRemoved``.
* A prefix hit on a free cached block takes it out of the queue and raises its ref count:
  blocks referenced by a running request are pinned.
* A lookup covers at most ``(L-1)//B`` blocks (the last prompt token is always recomputed).
* Full blocks are cached when the tokens that fill them are scheduled, counting only tokens the
  request already has (``min(computed + new, num_tokens)``): a token sampled in this step is
  cached in the step that feeds it back. Each call caches all newly full blocks of one request
  and emits one ``BlockStored``.
* Identical blocks are not de-duplicated (block tables are append-only): two requests that
  compute the same block both cache it, and both ``BlockStored`` events are sent.

The cache never touches all its blocks: blocks are materialised the first time they are
allocated, so building one costs microseconds and each call costs O(blocks it touches).
Only :meth:`KVCacheManager.reset_prefix_cache` and :meth:`KVCacheManager.check_invariants`
walk every materialised block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Protocol

from .events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from .hashing import BlockHash, external_hash

__all__ = ["EMPTY_PREFIX", "CacheRequest", "CachedPrefix", "KVBlocks", "KVCacheManager"]

# Key of the free queue's placeholder for never-used blocks (block ids are >= 1).
_VIRGIN = -1
# What a lookup of an uncached hash returns (block ids are >= 1).
_MISS = -1


class CacheRequest(Protocol):
    """What the cache reads from a request."""

    @property
    def request_id(self) -> str: ...
    @property
    def num_computed_tokens(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def all_token_ids(self) -> Sequence[int]: ...
    @property
    def block_hashes(self) -> Sequence[BlockHash]: ...
    @property
    def lora_name(self) -> str | None: ...
    @property
    def cache_salt(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """Result of a prefix lookup: ``num_tokens`` cached tokens (whole blocks), opaque otherwise."""

    num_tokens: int
    _blocks: tuple[int, ...] = field(default=(), repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)


EMPTY_PREFIX = CachedPrefix(0, ())


@dataclass(frozen=True, slots=True)
class KVBlocks:
    """Blocks newly allocated by one :meth:`KVCacheManager.allocate_slots` call."""

    block_ids: tuple[int, ...]


_NO_NEW_BLOCKS = KVBlocks(())


class KVCacheManager:
    """One replica's paged KV cache and prefix cache (single KV-cache group, full attention)."""

    def __init__(
        self,
        num_gpu_blocks: int,
        block_size: int,
        *,
        max_model_len: int | None = None,
        enable_caching: bool = True,
        enable_events: bool = True,
    ) -> None:
        if num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks must be >= 2 (one is the null block), got {num_gpu_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.enable_caching = enable_caching
        self.enable_events = enable_events
        # Per block id (index): ref count and cache key. Block 0 is the null block.
        self._ref: list[int] = [0]
        self._hash: list[BlockHash | None] = [None]
        # Free queue, front = next to allocate. OrderedDict is a C doubly linked list with a
        # hash index: O(1) pop-front, append, prepend (move_to_end) and removal from the middle.
        # _VIRGIN stands for the never-used blocks _next_virgin..num_gpu_blocks-1, in order.
        self._free: OrderedDict[int, None] = OrderedDict({_VIRGIN: None})
        self._next_virgin = 1
        self._num_free = num_gpu_blocks - 1
        # cache key -> block id, or list of block ids when identical blocks were cached twice
        self._cached: dict[BlockHash, int | list[int]] = {}
        self._num_dup_keys = 0  # keys of _cached whose value is a list
        self._req_blocks: dict[str, list[int]] = {}
        self._req_num_cached: dict[str, int] = {}
        self._events: list[KVEvent] = []

    # -- state -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any request (cached-but-unreferenced blocks count as free)."""
        return self._num_free

    @property
    def usage(self) -> float:
        """vLLM's ``kv_cache_usage_perc``: ``1 - free / (num_gpu_blocks - 1)``."""
        return 1.0 - self._num_free / (self.num_gpu_blocks - 1)

    @property
    def num_cached_hashes(self) -> int:
        """Distinct block hashes currently hittable."""
        return len(self._cached)

    def num_request_blocks(self, request_id: str) -> int:
        """Blocks held by a request (0 when it holds none)."""
        return len(self._req_blocks.get(request_id, ()))

    def is_cached(self, h: BlockHash) -> bool:
        """Whether a block with this chain hash would be a hit."""
        return h in self._cached

    def take_events(self) -> list[KVEvent]:
        """Return and clear the events produced since the last call."""
        events, self._events = self._events, []
        return events

    # -- lookup and allocation ---------------------------------------------------------------

    def get_computed_blocks(self, block_hashes: Sequence[BlockHash], num_tokens: int) -> CachedPrefix:
        """Longest cached prefix of a request with ``num_tokens`` tokens, capped at (L-1)//B blocks.

        Pure lookup: nothing is pinned until :meth:`allocate_slots` receives the result.
        """
        if not self.enable_caching or num_tokens <= 1:
            return EMPTY_PREFIX
        limit = min((num_tokens - 1) // self.block_size, len(block_hashes))
        if limit <= 0:
            return EMPTY_PREFIX
        # look every block up at C speed, then keep those before the first miss (a chain: once
        # a block misses, every later block misses too)
        found = list(map(self._cached.get, block_hashes[:limit], repeat(_MISS, limit)))
        try:
            del found[found.index(_MISS):]
        except ValueError:
            pass  # every block hit
        if not found:
            return EMPTY_PREFIX
        if self._num_dup_keys:  # identical blocks cached twice: the first one serves
            found = [v if isinstance(v, int) else v[0] for v in found]
        return CachedPrefix(len(found) * self.block_size, tuple(found))

    def allocate_slots(
        self, request: CacheRequest, num_new_tokens: int, prefix: CachedPrefix = EMPTY_PREFIX
    ) -> KVBlocks | None:
        """Give ``request`` slots for ``num_new_tokens`` more tokens after its computed ones.

        ``prefix`` (a fresh lookup, only for a request that holds no blocks) is taken over:
        its blocks are pinned and its tokens count as computed. Returns None, changing
        nothing, when the free blocks don't suffice; otherwise allocates from the front of the
        free queue (evicting cached blocks lazily) and caches the blocks that became full.
        """
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be > 0, got {num_new_tokens}")
        bs = self.block_size
        rid = request.request_id
        computed = request.num_computed_tokens + prefix.num_tokens
        need_tokens = computed + num_new_tokens
        if self.max_model_len is not None and need_tokens > self.max_model_len:
            need_tokens = self.max_model_len
        blocks = self._req_blocks.get(rid)
        if blocks is not None and need_tokens <= len(blocks) * bs and not prefix._blocks:
            # the common decode step: the request's blocks already have room for its new tokens
            # (min(.., num_tokens) // bs can only be smaller: skip reading num_tokens when this is cached)
            if self.enable_caching and (computed + num_new_tokens) // bs > self._req_num_cached[rid]:
                num_full = min(computed + num_new_tokens, request.num_tokens) // bs
                if num_full > self._req_num_cached[rid]:
                    self._cache_full_blocks(request, blocks, num_full)
            return _NO_NEW_BLOCKS
        held = len(blocks) if blocks is not None else 0
        if prefix._blocks and held:
            raise ValueError(f"request {rid!r} already holds blocks; a prefix applies only to a new one")
        num_new_blocks = max(0, -(-need_tokens // bs) - held - len(prefix._blocks))
        ref = self._ref
        hit = prefix._blocks
        # Hit blocks that sit in the free queue stop being free when pinned.
        if hit:
            refs = list(map(ref.__getitem__, hit))
            num_evictable = refs.count(0)
        else:
            num_evictable = 0
        if num_new_blocks + num_evictable > self._num_free:
            return None

        if blocks is None:
            blocks = self._req_blocks[rid] = []
            self._req_num_cached[rid] = 0
        if hit:
            if num_evictable:
                free = self._free
                for b, k in zip(hit, refs):
                    if k == 0:
                        del free[b]
                self._num_free -= num_evictable
            for b, k in zip(hit, refs):  # the blocks of a chain are distinct
                ref[b] = k + 1
            blocks.extend(hit)
            self._req_num_cached[rid] = len(hit)
        new = self._pop_free(num_new_blocks) if num_new_blocks else []
        blocks.extend(new)
        if self.enable_caching:
            self._cache_full_blocks(request, blocks, min(computed + num_new_tokens, request.num_tokens) // bs)
        return KVBlocks(tuple(new))

    def free(self, request_id: str) -> int:
        """Release a request's blocks (tail first); returns how many it held. Unknown ids: 0."""
        blocks = self._req_blocks.pop(request_id, None)
        self._req_num_cached.pop(request_id, None)
        if not blocks:
            return 0
        ref, hashes, free = self._ref, self._hash, self._free
        tail_first = blocks[::-1]
        refs = list(map(ref.__getitem__, tail_first))
        for b, k in zip(tail_first, refs):  # a request's blocks are distinct
            ref[b] = k - 1
        if 1 not in refs:
            return len(blocks)  # every block is still held by another request
        released = [b for b, k in zip(tail_first, refs) if k == 1]
        keys = list(map(hashes.__getitem__, released))
        if None in keys:
            fresh = [b for b, h in zip(released, keys) if h is None]
            free.update(dict.fromkeys(b for b, h in zip(released, keys) if h is not None))
        else:
            fresh = ()
            free.update(dict.fromkeys(released))  # to the back of the queue, tail block first
        # Unhashed blocks to the front, keeping their order (fresh[0] ends up first).
        for b in reversed(fresh):
            free[b] = None
            free.move_to_end(b, last=False)
        self._num_free += len(released)
        return len(blocks)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (emits ``AllBlocksCleared``); refused while blocks are in use."""
        if self._num_free != self.num_gpu_blocks - 1:
            return False
        self._cached = {}
        self._num_dup_keys = 0
        hashes = self._hash
        for i in range(len(hashes)):
            hashes[i] = None
        if self.enable_events:
            self._events.append(AllBlocksCleared())
        return True

    # -- internals ---------------------------------------------------------------------------

    def _pop_free(self, n: int) -> list[int]:
        free, ref, hashes = self._free, self._ref, self._hash
        out: list[int] = []
        while len(out) < n:
            b = free.popitem(last=False)[0]
            if b == _VIRGIN:
                # never-used blocks, in order, as many as needed; the placeholder stays in front
                # while any are left
                first = self._next_virgin
                take = min(n - len(out), self.num_gpu_blocks - first)
                out.extend(range(first, first + take))
                ref.extend(repeat(1, take))
                hashes.extend(repeat(None, take))
                self._next_virgin = first + take
                if self._next_virgin < self.num_gpu_blocks:
                    free[_VIRGIN] = None
                    free.move_to_end(_VIRGIN, last=False)
            else:
                if hashes[b] is not None:
                    self._evict(b)
                ref[b] = 1
                out.append(b)
        self._num_free -= n
        return out

    def _evict(self, b: int) -> None:
        key = self._hash[b]
        self._hash[b] = None
        assert key is not None
        v = self._cached.get(key)
        if v is None:
            return
        if isinstance(v, int):
            if v != b:
                return
            del self._cached[key]
        else:
            if b not in v:
                return
            v.remove(b)
            if len(v) == 1:
                self._cached[key] = v[0]
                self._num_dup_keys -= 1
        if self.enable_events:
            self._events.append(BlockRemoved([external_hash(key)]))

    def _cache_full_blocks(self, request: CacheRequest, blocks: list[int], num_full: int) -> None:
        rid = request.request_id
        start = self._req_num_cached[rid]
        if num_full <= start:
            return
        hashes = request.block_hashes
        if len(hashes) < num_full:
            raise AssertionError(f"request {rid!r} has {len(hashes)} block hashes, needs {num_full}")
        cached, block_hash = self._cached, self._hash
        for i in range(start, num_full):
            b = blocks[i]
            key = hashes[i]
            block_hash[b] = key
            v = cached.get(key)
            if v is None:
                cached[key] = b
            elif isinstance(v, int):
                cached[key] = [v, b]
                self._num_dup_keys += 1
            else:
                v.append(b)
        self._req_num_cached[rid] = num_full
        if self.enable_events:
            bs = self.block_size
            self._events.append(
                BlockStored(
                    block_hashes=[external_hash(hashes[i]) for i in range(start, num_full)],
                    parent_block_hash=external_hash(hashes[start - 1]) if start else None,
                    token_ids=list(request.all_token_ids[start * bs : num_full * bs]),
                    block_size=bs,
                    lora_name=request.lora_name,
                    extra_keys=_event_extra_keys(request, start, num_full),
                )
            )

    # -- test support --------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the block accounting is consistent. O(all materialised blocks): tests only."""
        usable = self.num_gpu_blocks - 1
        materialised = len(self._ref) - 1
        assert materialised <= usable, "more blocks than capacity"
        virgin_left = self.num_gpu_blocks - self._next_virgin
        assert (_VIRGIN in self._free) == (virgin_left > 0)
        queued = [b for b in self._free if b != _VIRGIN]
        assert len(set(queued)) == len(queued)
        assert self._num_free == len(queued) + virgin_left, "free count drifted"
        in_use = sum(1 for b in range(1, len(self._ref)) if self._ref[b] > 0)
        assert in_use + self._num_free == usable, "free + used != usable"
        assert all(r >= 0 for r in self._ref), "negative ref count"
        for b in queued:
            assert self._ref[b] == 0, f"block {b} is queued but referenced"
        held: dict[int, int] = {}
        for blocks in self._req_blocks.values():
            for b in blocks:
                held[b] = held.get(b, 0) + 1
        for b in range(1, len(self._ref)):
            assert self._ref[b] == held.get(b, 0), f"block {b}: ref {self._ref[b]} != holders {held.get(b, 0)}"
        assert self._num_dup_keys == sum(1 for v in self._cached.values() if isinstance(v, list)), "dup count drifted"
        for key, v in self._cached.items():
            for b in [v] if isinstance(v, int) else v:
                assert self._hash[b] == key, f"block {b} indexed under a hash it does not carry"


def _event_extra_keys(request: CacheRequest, start: int, end: int) -> list[tuple[Any, ...] | None] | None:
    lora, salt = request.lora_name, request.cache_salt
    if lora is None and salt is None:
        return None
    out: list[tuple[Any, ...] | None] = []
    for i in range(start, end):
        keys: list[Any] = []
        if lora is not None:
            keys.append(lora)
        if salt is not None and i == 0:
            keys.append(salt)
        out.append(tuple(keys) if keys else None)
    return out
