"""Precise mode: the prefix index kept by the replicas' own KV-cache events.

In approximate mode the index holds what the balancer *sent* each replica, forgotten LRU at the
replica's capacity: a guess that drifts when a replica evicts under memory pressure, restarts,
or serves traffic that did not come through this balancer. vLLM publishes exactly what it
stores and evicts; :class:`EventIndex` applies those events to the tier's
:class:`~prefixlb.index.PrefixIndex`, so ``match`` answers with what each replica holds.

**Hashes.** vLLM's block hashes (sha256 of a chain over token ids, extra keys and a seed that
depends on ``PYTHONHASHSEED``) cannot be recomputed from a prompt without replicating its hash
configuration exactly. Every ``BlockStored`` carries the blocks' token ids, so the index is
keyed by *our own* chain over those tokens instead: block ``k`` of a token sequence hashes to
``XXH64(uint32 LE bytes of tokens[kB:(k+1)B], seed = hash of block k-1)``, the same
:func:`prefixlb.index.block_hashes` the prompt goes through (with ``block_size = 4B`` bytes).
A replica's ``vLLM hash -> our hash`` map is kept to apply ``BlockRemoved`` and to continue a
chain from ``parent_block_hash``. The balancer therefore does not depend on vLLM's hash
algorithm, seed, or version; it depends on tokenizing prompts exactly as vLLM does (the
tier's tokenizer and chat template, :mod:`prefixlb.routing.tokens`).

**Hybrid.** Events arrive after the replica has run the step that filled the blocks. Between a
dispatch and those events, back-to-back requests with the same new prefix would not see it, so
``dispatched`` still inserts the prompt's blocks *speculatively*: pinned while the request is
in flight, then given ``grace`` seconds after its first token for the events to confirm them;
unconfirmed ones are removed by ``expire`` (the router's ``maintain`` tick). Blocks the events
confirmed are never touched by expiry.

**Refcounts.** vLLM can cache the same hash in two physical blocks (two requests computing the
same block concurrently); each is stored and removed separately, so a block leaves the index
only when its last copy is removed.

LoRA adapters seed the chain as the prompt key does (``lora_name``). Blocks with other extra
keys (multimodal hashes, ``cache_salt``) are keyed by them too and simply never match a text
prompt's chain: those requests are routed on the speculative entries, as in approximate mode.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

import xxhash

from prefixlb.index import PrefixIndex, block_hashes

__all__ = ["EventIndex", "lora_seed"]


def lora_seed(lora_name: str | None, cache_salt: str | None = None) -> int:
    """The chain seed of a prompt key with this adapter / salt (see ``prompt._seed``)."""
    if not cache_salt and not lora_name:
        return 0
    return xxhash.xxh64_intdigest(f"{cache_salt or ''}\x00{lora_name or ''}".encode())


class _Replica:
    __slots__ = ("held", "confirmed", "speculative", "stored", "removed", "unknown_parent", "unknown_removed")

    def __init__(self) -> None:
        self.held: dict[Any, list] = {}  # vLLM hash -> [our hash, copies]
        self.confirmed: dict[int, int] = {}  # our hash -> vLLM hashes (copies) mapping to it
        self.speculative: dict[int, float] = {}  # our hash -> expiry (inf while its request is in flight)
        self.stored = 0
        self.removed = 0
        self.unknown_parent = 0
        self.unknown_removed = 0


class EventIndex:
    """Applies each replica's KV events to ``index`` (see module doc). Pure: no I/O, no clock."""

    def __init__(self, index: PrefixIndex, block_tokens: int, *, grace: float = 1.0) -> None:
        self.index = index
        self.block_tokens = block_tokens
        self.block_bytes = 4 * block_tokens
        self.grace = grace
        self._reps: dict[int, _Replica] = {}
        self.ignored_block_size = 0

    def _rep(self, rid: int) -> _Replica:
        r = self._reps.get(rid)
        if r is None:
            r = self._reps[rid] = _Replica()
        return r

    # -- events ---------------------------------------------------------------------------------

    def stored(self, rid: int, hashes: Sequence[Any], parent: Any, token_ids: Sequence[int], block_size: int,
               lora_name: str | None = None, extra_keys: Sequence[Any] | None = None) -> int:
        """Apply one ``BlockStored``; returns how many blocks entered the index."""
        if block_size != self.block_tokens:
            self.ignored_block_size += 1
            return 0
        r = self._rep(rid)
        if parent is None:
            seed = lora_seed(lora_name)
            if extra_keys and extra_keys[0] is not None and not _only_lora(extra_keys[0], lora_name):
                seed = xxhash.xxh64_intdigest(repr(extra_keys[0]).encode(), seed)
        else:
            entry = r.held.get(parent)
            if entry is None:
                # we never saw the parent (joined mid-stream, or it was evicted and re-stored
                # out of order): these blocks cannot be placed on a chain a prompt would match
                r.unknown_parent += 1
                return 0
            seed = entry[0]
        ours = block_hashes(array("I", token_ids).tobytes(), self.block_bytes, seed)
        n = min(len(ours), len(hashes))
        held, confirmed, spec = r.held, r.confirmed, r.speculative
        for i in range(n):
            v = hashes[i]
            o = ours[i]
            e = held.get(v)
            if e is None:
                held[v] = [o, 1]
            else:
                e[1] += 1
            confirmed[o] = confirmed.get(o, 0) + 1
            spec.pop(o, None)
        self.index.insert(rid, ours[:n] if n < len(ours) else ours)
        r.stored += n
        return n

    def removed(self, rid: int, hashes: Sequence[Any]) -> int:
        """Apply one ``BlockRemoved``; returns how many blocks left the index."""
        r = self._rep(rid)
        gone = []
        for v in hashes:
            e = r.held.get(v)
            if e is None:
                r.unknown_removed += 1
                continue
            e[1] -= 1
            if e[1] <= 0:
                del r.held[v]
            o = e[0]
            c = r.confirmed.get(o, 0) - 1
            if c <= 0:
                r.confirmed.pop(o, None)
                gone.append(o)
            else:
                r.confirmed[o] = c
        if gone:
            self.index.remove_blocks(rid, gone)
        r.removed += len(gone)
        return len(gone)

    def cleared(self, rid: int) -> None:
        """``AllBlocksCleared``, a restart, or a gap that could not be repaired: forget the replica."""
        self._reps.pop(rid, None)
        self.index.clear_replica(rid)

    def forget(self, rid: int) -> None:
        """The replica left the tier."""
        self._reps.pop(rid, None)

    # -- speculation (the hybrid) ------------------------------------------------------------------

    def speculate(self, rid: int, chain: Sequence[int]) -> None:
        """A request with these blocks was dispatched to ``rid`` (the router inserted them):
        pin the ones the events have not confirmed until the request's first token."""
        r = self._rep(rid)
        conf, spec = r.confirmed, r.speculative
        inf = float("inf")
        for o in chain:
            if o not in conf:
                spec[o] = inf

    def settle(self, rid: int, chain: Sequence[int], now: float) -> None:
        """The request's prefill is over (first token, end, or failure): its unconfirmed blocks
        have ``grace`` seconds for their events to arrive."""
        r = self._reps.get(rid)
        if r is None:
            return
        spec = r.speculative
        until = now + self.grace
        for o in chain:
            if o in spec:
                spec[o] = until

    def expire(self, now: float) -> int:
        """Remove speculative blocks whose events never came; returns how many."""
        total = 0
        for rid, r in self._reps.items():
            if not r.speculative:
                continue
            dead = [o for o, t in r.speculative.items() if t <= now]
            if dead:
                for o in dead:
                    del r.speculative[o]
                self.index.remove_blocks(rid, dead)
                total += len(dead)
        return total

    # -- introspection ------------------------------------------------------------------------------

    def stats(self) -> dict[int, dict[str, int]]:
        return {rid: {"held": len(r.held), "speculative": len(r.speculative), "stored": r.stored,
                      "removed": r.removed, "unknown_parent": r.unknown_parent,
                      "unknown_removed": r.unknown_removed} for rid, r in self._reps.items()}

    def held_hashes(self, rid: int) -> set[int]:
        """Our hashes of the blocks the events say ``rid`` holds."""
        r = self._reps.get(rid)
        return set(r.confirmed) if r else set()


def _only_lora(key: Any, lora_name: str | None) -> bool:
    """True when a block's extra keys carry nothing but the LoRA name (already in the seed)."""
    if isinstance(key, (list, tuple)):
        return all(k == lora_name for k in key)
    return key == lora_name
