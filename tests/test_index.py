"""PrefixIndex behaviour, on both implementations, and native == reference under random use."""

from __future__ import annotations

import array

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from prefixlb import index

HAVE_C = hasattr(index, "PrefixIndexC")
B = 4  # block size used to build chains in these tests


def chain_of(*blocks: int) -> list[int]:
    """A chain whose block i has content ``blocks[i]``; equal leading contents share hashes."""
    return index.block_hashes(b"".join(bytes([b]) * B for b in blocks), B)


def holds(ix, replica: int) -> set[int]:
    return set(ix.blocks(replica))


# -- unit behaviour -----------------------------------------------------------------------


def test_empty_index_matches_nothing(Index):
    ix = Index(8)
    assert ix.match(chain_of(1, 2, 3)) == {}
    assert ix.match([]) == {}
    assert len(ix) == 0 and ix.replicas() == []


def test_inserted_chain_matches_fully_and_prefixes_partially(Index):
    ix = Index(100)
    c = chain_of(1, 2, 3, 4, 5)
    ix.insert(7, c)
    assert ix.match(c) == {7: 5}
    assert ix.match(chain_of(1, 2, 3, 9, 9)) == {7: 3}
    assert ix.match(chain_of(2, 2)) == {}  # not a prefix: a match is only from the start


def test_match_reports_every_replica_holding_block_zero(Index):
    ix = Index(100)
    ix.insert(1, chain_of(1, 2))
    ix.insert(2, chain_of(1, 2, 3, 4))
    ix.insert(3, chain_of(1, 5, 6))
    assert ix.match(chain_of(1, 2, 3, 4, 7)) == {1: 2, 2: 4, 3: 1}


def test_capacity_is_never_exceeded_and_evictions_counted(Index):
    ix = Index(5)
    for i in range(20):
        ix.insert(0, chain_of(i, i, i))
        assert ix.stats()["per_replica"][0]["blocks"] <= 5
    st_ = ix.stats()
    assert st_["entries"] == 5 and st_["evictions"] == 60 - 5
    assert st_["per_replica"][0]["evictions"] == 55


def test_lru_order_and_match_refresh(Index):
    ix = Index(3)
    a, b, c, d = (chain_of(x) for x in (1, 2, 3, 4))
    for ch in (a, b, c):
        ix.insert(0, ch)
    assert ix.blocks(0) == [a[0], b[0], c[0]]
    assert ix.match(a) == {0: 1}  # refresh a: now b is the least recently used
    assert ix.blocks(0) == [b[0], c[0], a[0]]
    ix.insert(0, d)
    assert ix.blocks(0) == [c[0], a[0], d[0]]
    assert ix.match(b) == {}


def test_insert_touches_tail_first_so_eviction_takes_tails(Index):
    ix = Index(4)
    c = chain_of(1, 2, 3, 4)
    ix.insert(0, c)
    assert ix.blocks(0) == [c[3], c[2], c[1], c[0]]  # head most recently used
    ix.insert(0, chain_of(9))  # evicts the tail, not the head
    assert ix.match(c) == {0: 3}


def test_chain_longer_than_capacity_keeps_its_head(Index):
    ix = Index(3)
    c = chain_of(1, 2, 3, 4, 5, 6)
    ix.insert(0, c)
    assert ix.match(c) == {0: 3}
    assert holds(ix, 0) == set(c[:3])


def test_match_stops_at_a_gap(Index):
    ix = Index(100)
    c = chain_of(1, 2, 3, 4, 5)
    ix.insert(0, c)
    assert ix.remove_blocks(0, [c[2]]) == 1
    assert ix.match(c) == {0: 2}  # blocks 3 and 4 are still held but never claimed past the gap
    assert c[3] in holds(ix, 0)
    assert ix.remove_blocks(0, [c[0]]) == 1
    assert ix.match(c) == {}


def test_replicas_are_independent_lru_domains(Index):
    ix = Index(2)
    shared = chain_of(1, 2)
    ix.insert(0, shared)
    ix.insert(1, shared)
    ix.insert(1, chain_of(3, 4))  # pushes replica 1 out of `shared`, not replica 0
    assert ix.match(shared) == {0: 2}


def test_remove_replica_and_clear_replica(Index):
    ix = Index(10)
    c = chain_of(1, 2, 3)
    ix.insert(0, c)
    ix.insert(1, c)
    ix.set_capacity(1, 7)
    assert ix.clear_replica(1) == 3
    assert 1 in ix and ix.capacity(1) == 7 and ix.match(c) == {0: 3}
    assert ix.remove_replica(0) == 3
    assert 0 not in ix and ix.match(c) == {}
    assert ix.remove_replica(0) == 0 and ix.remove_replica(12345) == 0
    assert len(ix) == 0 and ix.stats()["unique_blocks"] == 0


def test_set_capacity_shrinks_by_evicting_lru(Index):
    ix = Index(10)
    ix.insert(0, chain_of(1, 2, 3, 4, 5, 6))
    ix.set_capacity(0, 2)
    assert ix.match(chain_of(1, 2, 3, 4, 5, 6)) == {0: 2}
    assert ix.stats()["per_replica"][0] == {"blocks": 2, "capacity": 2, "evictions": 4}
    assert ix.capacity(99) == 10  # unknown replicas get the default


def test_many_replicas_supported(Index):
    ix = Index(4)
    c = chain_of(1, 2, 3)
    for r in range(1500):
        ix.insert(r, c[: 1 + r % 3])
    m = ix.match(c)
    assert len(m) == 1500 and all(m[r] == 1 + r % 3 for r in range(1500))
    ix.insert(2**32 - 1, c)
    assert ix.match(c)[2**32 - 1] == 3


def test_lookup_hashes_and_matches_in_one_call(Index):
    ix = Index(100)
    data = b"shared system prompt! " * 20
    chain, m = ix.lookup(data, 16, 3)
    assert list(chain) == index.block_hashes(data, 16, 3) and m == {}
    ix.insert(4, chain)
    chain2, m2 = ix.lookup(data + b"more", 16, 3)
    assert m2 == {4: len(chain)}


def test_insert_accepts_chain_array_and_list(Index):
    ix = Index(100)
    data = b"abcdefgh" * 40
    c = index.chain(data, 16)
    ix.insert(0, c)
    ix.insert(1, array.array("Q", list(c)))
    ix.insert(2, list(c))
    ix.insert(3, tuple(c))
    assert ix.match(c) == {0: len(c), 1: len(c), 2: len(c), 3: len(c)}


@pytest.mark.parametrize(
    "call",
    [
        lambda ix: ix.insert(-1, [1]),
        lambda ix: ix.insert(2**32, [1]),
        lambda ix: ix.insert(0, [-1]),
        lambda ix: ix.insert(0, [2**64]),
        lambda ix: ix.insert(0, [1.0]),
        lambda ix: ix.insert(0, [True]),
        lambda ix: ix.match(["x"]),
        lambda ix: ix.set_capacity(0, 0),
    ],
)
def test_bad_arguments_raise_value_error(Index, call):
    with pytest.raises(ValueError):
        call(Index(4))


@pytest.mark.parametrize(
    "call",
    [lambda ix: ix.insert("a", [1]), lambda ix: ix.insert(True, [1]), lambda ix: ix.match(5), lambda ix: ix.blocks(1.5)],
)
def test_bad_argument_types_raise_type_error(Index, call):
    with pytest.raises(TypeError):
        call(Index(4))


def test_bad_capacity_is_refused(Index):
    with pytest.raises(ValueError):
        Index(0)
    with pytest.raises(TypeError):
        Index("10")


def test_stats_shape(Index):
    ix = Index(8)
    ix.insert(3, chain_of(1, 2))
    s = ix.stats()
    assert s["implementation"] in ("c", "python")
    assert s["replicas"] == 1 and s["entries"] == 2 and s["unique_blocks"] == 2
    assert s["capacity_blocks"] == 8 and s["bytes"] > 0
    assert s["per_replica"] == {3: {"blocks": 2, "capacity": 8, "evictions": 0}}


# -- properties ---------------------------------------------------------------------------

chains_st = st.lists(st.integers(0, 3), min_size=0, max_size=10).map(lambda bs: chain_of(*bs))


@given(capacity=st.integers(1, 12), ops=st.lists(st.tuples(st.booleans(), chains_st), max_size=60))
def test_held_blocks_stay_prefix_closed_without_removals(capacity, ops):
    """Tail-first touching + LRU: a replica never holds a block whose parent it lost."""
    for Index in _impls():
        ix = Index(capacity)
        parent: dict[int, int | None] = {}
        for is_insert, c in ops:
            for k, h in enumerate(c):
                parent[h] = c[k - 1] if k else None
            if is_insert:
                ix.insert(0, c)
                if c:
                    assert ix.match(c)[0] == min(len(c), capacity)
            else:
                ix.match(c)
            held = holds(ix, 0)
            assert len(held) <= capacity
            assert all(parent[h] is None or parent[h] in held for h in held)


def _impls():
    out = [index.PrefixIndexPy]
    if HAVE_C:
        out.append(index.PrefixIndexC)
    return out


# -- native == reference, driven by a state machine ----------------------------------------

REPLICAS = st.integers(0, 5)
RAW_HASHES = st.lists(st.sampled_from([0, 1, 2, 3, 2**63, 2**64 - 1]), max_size=6)
ANY_CHAIN = st.one_of(chains_st, RAW_HASHES)  # raw lists may repeat values: semantics must still agree


@pytest.mark.skipif(not HAVE_C, reason="C extension not built")
class NativeEqualsReference(RuleBasedStateMachine):
    @initialize(capacity=st.integers(1, 8))
    def start(self, capacity):
        self.py = index.PrefixIndexPy(capacity)
        self.c = index.PrefixIndexC(capacity)
        note(f"capacity={capacity}")

    @rule(r=REPLICAS, c=ANY_CHAIN)
    def insert(self, r, c):
        self.py.insert(r, c)
        self.c.insert(r, c)

    @rule(c=ANY_CHAIN)
    def match(self, c):
        before = {r: holds(self.py, r) for r in self.py.replicas()}
        got_py, got_c = self.py.match(c), self.c.match(c)
        assert got_py == got_c
        # oracle independent of both implementations: depth = leading blocks held
        for r, held in before.items():
            d = 0
            while d < len(c) and c[d] in held:
                d += 1
            assert got_py.get(r, 0) == d

    @rule(r=REPLICAS, c=ANY_CHAIN, between=st.sampled_from(["nothing", "insert", "remove_blocks", "set_capacity", "remove_replica", "match"]), r2=REPLICAS, c2=ANY_CHAIN, cap=st.integers(1, 8))
    def match_then_insert_the_same_chain(self, r, c, between, r2, c2, cap):
        """The request path: match a Chain, then insert that very object (the native index
        reuses the match's entries for it); something else may happen in between."""
        ch = index.Chain(c)
        assert self.py.match(c) == self.c.match(ch)
        if between == "insert":
            self.insert(r2, c2)
        elif between == "remove_blocks":
            self.remove_blocks(r2, c2)
        elif between == "set_capacity":
            self.set_capacity(r2, cap)
        elif between == "remove_replica":
            self.remove_replica(r2)
        elif between == "match":
            assert self.py.match(c2) == self.c.match(index.Chain(c2))
        self.py.insert(r, c)
        self.c.insert(r, ch)

    @rule(r=REPLICAS, c=ANY_CHAIN)
    def remove_blocks(self, r, c):
        assert self.py.remove_blocks(r, c) == self.c.remove_blocks(r, c)

    @rule(r=REPLICAS)
    def clear_replica(self, r):
        assert self.py.clear_replica(r) == self.c.clear_replica(r)

    @rule(r=REPLICAS)
    def remove_replica(self, r):
        assert self.py.remove_replica(r) == self.c.remove_replica(r)

    @rule(r=REPLICAS, cap=st.integers(1, 8))
    def set_capacity(self, r, cap):
        self.py.set_capacity(r, cap)
        self.c.set_capacity(r, cap)

    @invariant()
    def same_state(self):
        if not hasattr(self, "py"):
            return
        assert self.py.replicas() == self.c.replicas()
        for r in self.py.replicas():
            assert self.py.blocks(r) == self.c.blocks(r)  # identical LRU order
            assert len(self.py.blocks(r)) <= self.py.capacity(r)
            assert self.py.capacity(r) == self.c.capacity(r)
        sp, sc = self.py.stats(), self.c.stats()
        for key in ("replicas", "entries", "unique_blocks", "evictions", "per_replica"):
            assert sp[key] == sc[key], key
        assert len(self.py) == len(self.c)


NativeEqualsReference.TestCase.settings = settings(stateful_step_count=60)
TestNativeEqualsReference = NativeEqualsReference.TestCase


def _assert_same_state(py, c) -> None:
    """Same blocks in the same LRU order per replica, and the same counters."""
    for r in py.replicas():
        assert py.blocks(r) == c.blocks(r)
    assert {k: v for k, v in py.stats().items() if k not in ("bytes", "implementation")} == {
        k: v for k, v in c.stats().items() if k not in ("bytes", "implementation")
    }


@pytest.mark.skipif(not HAVE_C, reason="C extension not built")
@given(seed=st.integers(0, 2**32 - 1))
def test_native_equals_reference_on_a_long_random_workload(seed):
    """Thousands of operations on realistic chains with a table that grows and shrinks."""
    import random

    rng = random.Random(seed)
    note(f"seed={seed}")
    py, c = index.PrefixIndexPy(40), index.PrefixIndexC(40)
    prefixes = [bytes([rng.randrange(256)]) * 64 for _ in range(6)]
    for step in range(600):
        data = rng.choice(prefixes) + bytes(rng.randrange(4) for _ in range(rng.randrange(0, 600)))
        r = rng.randrange(12)
        op = rng.random()
        if op < 0.5:  # the request path: lookup, then insert the looked-up chain
            ch, m = c.lookup(data, 16)
            assert py.match(ch) == m
            r = max(m, key=m.__getitem__) if m and op < 0.4 else r
            py.insert(r, ch)
            c.insert(r, ch)
        elif op < 0.9:
            ch = index.block_hashes(data, 16)
            assert py.match(ch) == c.match(ch)
        elif op < 0.95:
            assert py.remove_replica(r) == c.remove_replica(r)
        else:
            cap = rng.randrange(1, 60)
            py.set_capacity(r, cap)
            c.set_capacity(r, cap)
    _assert_same_state(py, c)


@pytest.mark.skipif(not HAVE_C, reason="C extension not built")
@pytest.mark.parametrize("between", ["remove_blocks", "clear_replica", "remove_replica", "shrink", "evict_by_insert"])
def test_insert_after_match_is_exact_when_the_matched_entries_changed_in_between(between):
    """insert(r, chain) right after match(chain) reuses the match (native); anything that drops
    the matched entries in between must make it fall back, and the result equal the reference."""
    py, c = index.PrefixIndexPy(12), index.PrefixIndexC(12)
    chain = index.Chain(chain_of(1, 2, 3, 4, 5, 6))
    other = index.Chain(chain_of(9, 8, 7, 6, 5, 4, 3, 2))
    for ix in (py, c):
        ix.insert(0, chain)
        ix.insert(1, chain)
        ix.insert(0, chain_of(7, 7))
    for ix in (py, c):
        assert ix.match(chain) == {0: 6, 1: 6}
        if between == "remove_blocks":
            ix.remove_blocks(0, chain[2:4])
        elif between == "clear_replica":
            ix.clear_replica(0)
        elif between == "remove_replica":
            ix.remove_replica(0)
        elif between == "shrink":
            ix.set_capacity(0, 3)
        else:
            ix.insert(0, other)  # evicts most of the matched run
        ix.insert(0, chain)  # the matched Chain itself: the native index's memo applies
    for r in (0, 1):
        assert py.blocks(r) == c.blocks(r)
    sp, sc = py.stats(), c.stats()
    for key in ("entries", "unique_blocks", "evictions", "per_replica"):
        assert sp[key] == sc[key], key


_MIX64 = 0x9E3779B97F4A7C15  # the native table's hash mix (tag = high half of h * _MIX64)
_UNMIX64 = pow(_MIX64, -1, 2**64)


def _hash_with_tag(tag: int, low: int) -> int:
    """A block hash whose native table tag is `tag` (its home bucket follows from the tag)."""
    return (((tag << 32) | low) * _UNMIX64) % 2**64


@pytest.mark.skipif(not HAVE_C, reason="C extension not built")
@given(seed=st.integers(0, 2**32 - 1))
def test_native_equals_reference_when_blocks_crowd_one_bucket(seed):
    """Blocks whose tags all fall in the last (or first) bucket: long overflow runs that wrap
    around the table, tag 0, equal tags for different hashes, deletions inside a run, growth
    and shrinking; the index must still agree with the reference."""
    import random

    rng = random.Random(seed)
    note(f"seed={seed}")
    top = [_hash_with_tag(2**32 - 1 - rng.randrange(4), rng.randrange(2**32)) for _ in range(150)]
    bottom = [_hash_with_tag(rng.randrange(3), rng.randrange(2**32)) for _ in range(150)]  # tag 0 too
    pool = list(dict.fromkeys(top + bottom))
    py, c = index.PrefixIndexPy(60), index.PrefixIndexC(60)
    for _ in range(400):
        r = rng.randrange(6)
        ch = rng.sample(pool, rng.randrange(1, 12))
        op = rng.random()
        if op < 0.45:
            py.insert(r, ch)
            c.insert(r, ch)
        elif op < 0.8:
            assert py.match(ch) == c.match(ch)
        elif op < 0.9:
            assert py.remove_blocks(r, ch) == c.remove_blocks(r, ch)
        elif op < 0.95:
            assert py.clear_replica(r) == c.clear_replica(r)  # may shrink the table
        else:
            cap = rng.randrange(1, 80)
            py.set_capacity(r, cap)
            c.set_capacity(r, cap)
    _assert_same_state(py, c)
    for h in pool:  # every block the reference holds is found, and nothing else
        assert py.match([h]) == c.match([h])
