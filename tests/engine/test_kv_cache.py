"""KVCacheManager: vLLM's hit cap, LRU order (tail first, lazy), pinning, events, accounting."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from prefixlb.engine import AllBlocksCleared, BlockHasher, BlockRemoved, BlockStored, KVCacheManager, external_hash

B = 4


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    block_hashes: list = field(default_factory=list)
    lora_name: str | None = None
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        self.block_hashes = BlockHasher("fast", B).chain(self.all_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def toks(seed: int, n: int) -> list[int]:
    return [seed * 1000 + i for i in range(n)]


def admit(kv: KVCacheManager, r: Req, n: int | None = None):
    """Schedule a new request like the engine: lookup, allocate, mark computed."""
    prefix = kv.get_computed_blocks(r.block_hashes, r.num_tokens)
    n = r.num_tokens - prefix.num_tokens if n is None else n
    got = kv.allocate_slots(r, n, prefix)
    if got is not None:
        r.num_computed_tokens = prefix.num_tokens + n
    return prefix, got


def stored(events):
    return [e for e in events if isinstance(e, BlockStored)]


def removed(events):
    return [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]


def test_hit_is_capped_at_l_minus_1_whole_blocks():
    kv = KVCacheManager(64, B)
    a = Req("a", toks(1, 12))  # exactly 3 blocks
    admit(kv, a)
    kv.free("a")
    assert kv.get_computed_blocks(a.block_hashes, 12).num_tokens == 8  # (12-1)//4 = 2 blocks
    longer = Req("b", toks(1, 14))
    assert kv.get_computed_blocks(longer.block_hashes, 14).num_tokens == 12  # all 3 cached blocks


def test_freed_blocks_are_evicted_tail_first_and_lazily():
    kv = KVCacheManager(9, B)  # 8 usable blocks
    a = Req("a", toks(1, 16))
    admit(kv, a)
    (ev,) = stored(kv.take_events())
    assert ev.parent_block_hash is None and len(ev.block_hashes) == 4 and len(ev.token_ids) == 16
    kv.free("a")
    assert kv.num_free_blocks == 8 and kv.usage == 0.0  # cached but unreferenced counts as free
    # 5 blocks: the 4 never-used ones first, then a's tail block is reallocated
    admit(kv, Req("b", toks(2, 20)))
    assert removed(kv.take_events()) == [external_hash(a.block_hashes[3])]
    # a's head is still hittable: eviction happens only on reallocation
    assert kv.get_computed_blocks(a.block_hashes, 17).num_tokens == 12
    kv.free("b")
    admit(kv, Req("c", toks(3, 8)))  # b's blocks went behind a's 3 survivors in the queue
    assert removed(kv.take_events()) == [external_hash(a.block_hashes[2]), external_hash(a.block_hashes[1])]


def test_blocks_without_hash_are_reused_first():
    kv = KVCacheManager(9, B)
    admit(kv, Req("a", toks(1, 10)))  # 2 full blocks + 1 partial
    kv.free("a")
    kv.take_events()
    got = admit(kv, Req("b", toks(2, 4)))[1]
    assert got is not None and got.block_ids == (3,)  # the partial block, not a cached one
    assert removed(kv.take_events()) == []


def test_prefix_hit_pins_blocks_against_eviction():
    kv = KVCacheManager(9, B)
    a = Req("a", toks(1, 16))
    admit(kv, a)
    kv.free("a")
    b = Req("b", toks(1, 16) + [7])
    prefix, got = admit(kv, b)
    assert prefix.num_tokens == 16 and got is not None
    kv.take_events()
    # everything else can be taken, b's four blocks cannot
    assert admit(kv, Req("c", toks(3, 12)))[1] is not None
    assert kv.num_free_blocks == 0
    assert kv.allocate_slots(Req("d", toks(4, 4)), 4) is None
    assert removed(kv.take_events()) == []
    assert all(kv.is_cached(h) for h in a.block_hashes)


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(5, B)
    admit(kv, Req("a", toks(1, 12)))
    before = (kv.num_free_blocks, kv.num_request_blocks("a"), kv.take_events())
    big = Req("b", toks(2, 8))
    assert kv.allocate_slots(big, 8) is None
    assert (kv.num_free_blocks, kv.num_request_blocks("b")) == (before[0], 0)
    assert kv.take_events() == []
    kv.check_invariants()


def test_decode_filled_block_is_cached_when_its_last_token_is_fed_back():
    kv = KVCacheManager(16, B)
    r = Req("r", toks(1, 6))
    admit(kv, r)
    assert [len(e.block_hashes) for e in stored(kv.take_events())] == [1]
    r.all_token_ids += [901, 902]  # two sampled tokens: block 1 is now full (8 tokens)
    r.block_hashes = BlockHasher("fast", B).chain(r.all_token_ids)
    r.num_computed_tokens = 7  # token 902 was sampled but not yet fed back
    assert stored(kv.take_events()) == []
    kv.allocate_slots(r, 1)  # the step that feeds 902 back caches block 1
    (ev,) = stored(kv.take_events())
    assert ev.parent_block_hash == external_hash(r.block_hashes[0])
    assert ev.token_ids == r.all_token_ids[4:8] and ev.block_size == B


def test_identical_blocks_are_not_deduplicated():
    kv = KVCacheManager(16, B)
    admit(kv, Req("a", toks(1, 8)), n=8)
    admit(kv, Req("b", toks(1, 8)), n=4)  # b hit 1 block, computes and caches block 1 again
    evs = stored(kv.take_events())
    assert evs[1].block_hashes == evs[0].block_hashes[1:] and evs[1].parent_block_hash == evs[0].block_hashes[0]
    kv.check_invariants()


def test_reset_prefix_cache_refused_while_in_use_then_clears():
    kv = KVCacheManager(16, B)
    a = Req("a", toks(1, 8))
    admit(kv, a)
    assert not kv.reset_prefix_cache()
    kv.free("a")
    kv.take_events()
    assert kv.reset_prefix_cache()
    assert kv.take_events() == [AllBlocksCleared()]
    assert kv.get_computed_blocks(a.block_hashes, 9).num_tokens == 0 and kv.num_cached_hashes == 0
    kv.check_invariants()


def test_usage_counts_referenced_blocks_only():
    kv = KVCacheManager(11, B)
    admit(kv, Req("a", toks(1, 10)))
    assert kv.usage == pytest.approx(0.3)
    kv.free("a")
    assert kv.usage == 0.0


class CacheMachine(RuleBasedStateMachine):
    """Random admits, chunked growth and frees never break the block accounting."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(13, B)
        self.reqs: dict[str, Req] = {}
        self.n = 0

    @rule(prefix=st.integers(0, 2), length=st.integers(1, 30), chunk=st.integers(1, 30))
    def admit_request(self, prefix, length, chunk):
        self.n += 1
        r = Req(f"r{self.n}", toks(prefix, 8) + toks(100 + self.n, length))
        pfx = self.kv.get_computed_blocks(r.block_hashes, r.num_tokens)
        n = min(chunk, r.num_tokens - pfx.num_tokens)
        if self.kv.allocate_slots(r, n, pfx) is not None:
            r.num_computed_tokens = pfx.num_tokens + n
            self.reqs[r.request_id] = r

    @rule(data=st.data(), chunk=st.integers(1, 12))
    def grow(self, data, chunk):
        if not self.reqs:
            return
        r = self.reqs[data.draw(st.sampled_from(sorted(self.reqs)))]
        if r.num_computed_tokens == r.num_tokens:
            r.all_token_ids.append(7)
            r.block_hashes = BlockHasher("fast", B).chain(r.all_token_ids)
        n = min(chunk, r.num_tokens - r.num_computed_tokens)
        if self.kv.allocate_slots(r, n) is not None:
            r.num_computed_tokens += n

    @rule(data=st.data())
    def free(self, data):
        if self.reqs:
            rid = data.draw(st.sampled_from(sorted(self.reqs)))
            del self.reqs[rid]
            self.kv.free(rid)

    @invariant()
    def accounting_holds(self):
        self.kv.check_invariants()
        assert 0.0 <= self.kv.usage <= 1.0
        held = sum(-(-r.num_computed_tokens // B) for r in self.reqs.values())
        assert sum(self.kv.num_request_blocks(r) for r in self.reqs) == held


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
