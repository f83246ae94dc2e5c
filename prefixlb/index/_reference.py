"""Pure-Python reference of the prefix index: the readable specification of ``_native``.

Every behaviour of the C implementation is defined here first; the property tests run both
side by side and require identical results (matches, evictions, LRU order, counters).

Model
-----
A *block hash* names a whole prefix: ``h[i] = XXH64(block_i, seed=h[i-1])``. The index keeps,
for each replica (a non-negative integer id), the set of block hashes that replica is believed
to hold, as an LRU list bounded by that replica's capacity (in blocks).

Touch order is what keeps chains whole. ``insert`` and the refresh done by ``match`` touch a
chain's blocks from the tail to the head, so for one replica every block is at least as recently
used as each of its descendants, and LRU eviction takes tails before heads. ``match`` stops a
replica at its first missing block, so even a gap made by ``remove_blocks`` (a vLLM
``BlockRemoved`` for a middle block) never lets the index claim a block past the gap.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import xxhash

__all__ = ["PrefixIndexPy", "block_hashes_py", "chain_py"]

_MASK64 = (1 << 64) - 1
_MAX_REPLICA = (1 << 32) - 1


def block_hashes_py(data: bytes, block_size: int = 64, seed: int = 0) -> list[int]:
    """Chained XXH64 of each full ``block_size`` block of ``data``; the contract of DESIGN.md."""
    _check_hash_args(block_size, seed)
    mv = memoryview(data).cast("B")
    out: list[int] = []
    h = seed
    xxh = xxhash.xxh64_intdigest
    for start in range(0, len(mv) - block_size + 1, block_size):
        h = xxh(mv[start : start + block_size], seed=h)
        out.append(h)
    return out


def chain_py(data: bytes, block_size: int = 64, seed: int = 0) -> array:
    """The same chain as a compact ``array('Q')`` (what ``lookup`` hands to ``insert``)."""
    return array("Q", block_hashes_py(data, block_size, seed))


def _check_hash_args(block_size: int, seed: int) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not isinstance(seed, int) or not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be an unsigned 64-bit integer, got {seed!r}")


def _check_replica(replica: int) -> int:
    if isinstance(replica, bool) or not isinstance(replica, int):
        raise TypeError(f"replica id must be an int, got {type(replica).__name__}")
    if not 0 <= replica <= _MAX_REPLICA:
        raise ValueError(f"replica id must be in [0, 2**32), got {replica}")
    return replica


def _check_capacity(capacity_blocks: int) -> int:
    if isinstance(capacity_blocks, bool) or not isinstance(capacity_blocks, int):
        raise TypeError("capacity_blocks must be an int")
    if not 1 <= capacity_blocks <= _MAX_REPLICA:
        raise ValueError(f"capacity_blocks must be in [1, 2**32), got {capacity_blocks}")
    return capacity_blocks


def _hash_list(hashes: Iterable[int]) -> list[int]:
    out = list(hashes)
    for h in out:
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h <= _MASK64:
            raise ValueError(f"block hashes must be unsigned 64-bit integers, got {h!r}")
    return out


class _Replica:
    __slots__ = ("lru", "capacity", "evictions")

    def __init__(self, capacity: int) -> None:
        self.lru: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.capacity = capacity
        self.evictions = 0


class PrefixIndexPy:
    """Per-replica LRU sets of block hashes, matched by leading blocks (reference implementation)."""

    native = False

    def __init__(self, capacity_blocks: int) -> None:
        self._default_capacity = _check_capacity(capacity_blocks)
        self._replicas: dict[int, _Replica] = {}
        # hash -> replicas holding it, in the order they acquired it (an ordered set)
        self._holders: dict[int, dict[int, None]] = {}
        self._evictions = 0
        self._entries = 0

    # -- queries ---------------------------------------------------------------------------

    @property
    def capacity_blocks(self) -> int:
        return self._default_capacity

    def match(self, hashes: Sequence[int]) -> dict[int, int]:
        """``{replica: number of leading blocks it holds}`` for replicas holding block 0.

        Refreshes (moves to most recently used) every block it reports, tail first.
        """
        hashes = _hash_list(hashes)
        if not hashes:
            return {}
        first = self._holders.get(hashes[0])
        if not first:
            return {}
        depth = dict.fromkeys(first, 1)
        alive = set(first)
        for k in range(1, len(hashes)):
            holders = self._holders.get(hashes[k])
            if not holders:
                break
            alive = {r for r in alive if r in holders}
            if not alive:
                break
            for r in alive:
                depth[r] = k + 1
        for r, d in depth.items():
            lru = self._replicas[r].lru
            for k in range(d - 1, -1, -1):
                lru.move_to_end(hashes[k])
        return depth

    def lookup(self, data: bytes, block_size: int = 64, seed: int = 0) -> tuple[array, dict[int, int]]:
        """Hash ``data`` into its block chain and match it: the request path's one call."""
        chain = chain_py(data, block_size, seed)
        return chain, self.match(chain)

    def blocks(self, replica: int) -> list[int]:
        """The hashes ``replica`` holds, least recently used first."""
        rep = self._replicas.get(_check_replica(replica))
        return list(rep.lru) if rep else []

    def replicas(self) -> list[int]:
        """Known replica ids, in the order they were first seen."""
        return list(self._replicas)

    def capacity(self, replica: int) -> int:
        rep = self._replicas.get(_check_replica(replica))
        return rep.capacity if rep else self._default_capacity

    def __len__(self) -> int:
        return self._entries

    def __contains__(self, replica: object) -> bool:
        return replica in self._replicas

    def stats(self) -> dict[str, Any]:
        """Blocks per replica, evictions and memory in use."""
        per = {
            r: {"blocks": len(rep.lru), "capacity": rep.capacity, "evictions": rep.evictions}
            for r, rep in self._replicas.items()
        }
        return {
            "implementation": "python",
            "replicas": len(self._replicas),
            "entries": self._entries,
            "unique_blocks": len(self._holders),
            "evictions": self._evictions,
            "bytes": self._approx_bytes(),
            "capacity_blocks": self._default_capacity,
            "per_replica": per,
        }

    # -- updates ---------------------------------------------------------------------------

    def insert(self, replica: int, hashes: Sequence[int]) -> None:
        """Record that ``replica`` now holds the whole chain ``hashes`` (touched tail first)."""
        hashes = _hash_list(hashes)
        rep = self._replica(replica)
        lru = rep.lru
        for k in range(len(hashes) - 1, -1, -1):
            h = hashes[k]
            if h in lru:
                lru.move_to_end(h)
                continue
            if len(lru) >= rep.capacity:
                self._evict_one(replica, rep)
            lru[h] = None
            self._holders.setdefault(h, {})[replica] = None
            self._entries += 1

    def remove_blocks(self, replica: int, hashes: Iterable[int]) -> int:
        """Forget the given blocks for ``replica`` (not counted as evictions); returns how many."""
        rep = self._replicas.get(_check_replica(replica))
        if rep is None:
            return 0
        removed = 0
        for h in _hash_list(hashes):
            if h in rep.lru:
                del rep.lru[h]
                self._unhold(h, replica)
                removed += 1
        return removed

    def clear_replica(self, replica: int) -> int:
        """Forget every block of ``replica`` but keep it (and its capacity); returns how many."""
        rep = self._replicas.get(_check_replica(replica))
        if rep is None:
            return 0
        return self.remove_blocks(replica, list(rep.lru))

    def remove_replica(self, replica: int) -> int:
        """Forget ``replica`` entirely; returns how many blocks it held (0 if unknown)."""
        n = self.clear_replica(replica)
        self._replicas.pop(replica, None)
        return n

    def set_capacity(self, replica: int, capacity_blocks: int) -> None:
        """Bound ``replica`` to ``capacity_blocks``, evicting its LRU blocks if it holds more."""
        cap = _check_capacity(capacity_blocks)
        rep = self._replica(replica)
        rep.capacity = cap
        while len(rep.lru) > cap:
            self._evict_one(replica, rep)

    # -- internals -------------------------------------------------------------------------

    def _replica(self, replica: int) -> _Replica:
        rep = self._replicas.get(_check_replica(replica))
        if rep is None:
            rep = self._replicas[replica] = _Replica(self._default_capacity)
        return rep

    def _evict_one(self, replica: int, rep: _Replica) -> None:
        h, _ = rep.lru.popitem(last=False)
        self._unhold(h, replica)
        rep.evictions += 1
        self._evictions += 1

    def _unhold(self, h: int, replica: int) -> None:
        holders = self._holders[h]
        del holders[replica]
        if not holders:
            del self._holders[h]
        self._entries -= 1

    def _approx_bytes(self) -> int:
        size = sys.getsizeof(self._holders) + sys.getsizeof(self._replicas)
        size += sum(sys.getsizeof(h) for h in self._holders.values())
        size += sum(sys.getsizeof(rep.lru) for rep in self._replicas.values())
        return size
