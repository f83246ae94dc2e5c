"""EventIndex: the prefix index driven by vLLM's KV events (precise mode)."""

from __future__ import annotations

from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from prefixlb.index import PrefixIndex, block_hashes
from prefixlb.routing import TierRouter, token_key
from prefixlb.routing.precise import EventIndex, lora_seed

B = 4  # tokens per block


def chain(tokens: list[int], seed: int = 0) -> list[int]:
    return list(block_hashes(array("I", tokens).tobytes(), 4 * B, seed))


def idx() -> tuple[PrefixIndex, EventIndex]:
    index = PrefixIndex(1000)
    return index, EventIndex(index, B)


def test_stored_blocks_match_the_prompt_chain_and_removed_ones_do_not() -> None:
    index, ev = idx()
    toks = list(range(100, 112))  # 3 blocks
    assert ev.stored(7, [11, 12, 13], None, toks, B) == 3
    ours = chain(toks)
    assert index.match(ours) == {7: 3}
    assert index.match(chain(toks + [1, 2, 3, 4])) == {7: 3}  # a longer prompt: the cached prefix
    ev.removed(7, [13])  # vLLM evicts a chain's tail first
    assert index.match(ours) == {7: 2}
    ev.removed(7, [11])  # a gap at block 0: match stops there
    assert index.match(ours) == {}


def test_a_child_event_continues_the_parents_chain() -> None:
    index, ev = idx()
    toks = list(range(1, 17))
    ev.stored(1, [100, 101], None, toks[:8], B)
    ev.stored(1, [102, 103], 101, toks[8:], B)  # decode-filled blocks, parent = block 1
    assert index.match(chain(toks)) == {1: 4}


def test_unknown_parent_is_not_placed_on_a_chain() -> None:
    index, ev = idx()
    assert ev.stored(1, [102], 999, [1, 2, 3, 4], B) == 0
    assert ev.stats()[1]["unknown_parent"] == 1
    assert index.blocks(1) == []


def test_two_copies_of_a_block_leave_with_the_last() -> None:
    index, ev = idx()
    toks = [5, 6, 7, 8]
    ev.stored(2, [50], None, toks, B)
    ev.stored(2, [50], None, toks, B)  # two requests cached the same block
    ev.removed(2, [50])
    assert index.match(chain(toks)) == {2: 1}
    ev.removed(2, [50])
    assert index.match(chain(toks)) == {}


def test_replicas_are_independent_and_cleared_forgets_one() -> None:
    index, ev = idx()
    toks = list(range(8))
    ev.stored(1, [1, 2], None, toks, B)
    ev.stored(2, [1, 2], None, toks, B)
    ev.cleared(1)
    assert index.match(chain(toks)) == {2: 2}
    ev.removed(1, [1])  # after a clear, old hashes are unknown: no effect on replica 2
    assert index.match(chain(toks)) == {2: 2}


def test_block_size_mismatch_and_lora_seed() -> None:
    index, ev = idx()
    assert ev.stored(1, [1], None, list(range(8)), 8) == 0
    assert ev.ignored_block_size == 1
    toks = list(range(4))
    ev.stored(1, [9], None, toks, B, lora_name="sql-adapter")
    assert index.match(chain(toks)) == {}
    assert index.match(chain(toks, lora_seed("sql-adapter"))) == {1: 1}


def test_speculative_blocks_live_until_first_token_plus_grace_confirmed_ones_stay() -> None:
    index = PrefixIndex(1000)
    ev = EventIndex(index, B, grace=1.0)
    toks = list(range(12))
    c = chain(toks)
    ev.stored(3, [1], None, toks[:4], B)  # block 0 confirmed
    index.insert(3, c)  # the router's dispatch insert
    ev.speculate(3, c)
    assert ev.expire(100.0) == 0  # in flight: pinned however long it queues
    ev.settle(3, c, now=10.0)
    assert ev.expire(10.5) == 0
    assert ev.expire(11.0) == 2  # blocks 1, 2 never confirmed
    assert index.match(c) == {3: 1}


def test_events_confirming_a_speculative_block_keep_it() -> None:
    index = PrefixIndex(1000)
    ev = EventIndex(index, B, grace=0.5)
    toks = list(range(8))
    c = chain(toks)
    index.insert(1, c)
    ev.speculate(1, c)
    ev.settle(1, c, now=0.0)
    ev.stored(1, [7, 8], None, toks, B)
    assert ev.expire(5.0) == 0
    assert index.match(c) == {1: 2}


def test_router_in_precise_mode_routes_on_event_state() -> None:
    now = [0.0]
    r = TierRouter("t", clock=lambda: now[0], seed=1)
    for i in range(4):
        r.add_replica(i, f"http://r{i}", capacity_tokens=10_000)
    ev = r.enable_precise(B, grace=0.5)
    prompt = list(range(1000, 1400))  # 100 blocks
    ev.stored(2, list(range(100)), None, prompt, B)
    body = {"messages": []}
    d = r.decide(token_key(prompt + [1, 2, 3], body), now[0])
    assert d.replica.id == 2
    assert d.cached_tokens == 400
    assert d.prompt_tokens == 403
    # the replica evicts it: the next request goes by load alone, and nothing is predicted cached
    ev.removed(2, list(range(100)))
    d2 = r.decide(token_key(prompt, body), now[0])
    assert d2.cached_tokens == 0


ops = st.lists(st.tuples(st.sampled_from(["store", "remove", "clear"]), st.integers(0, 2), st.integers(0, 5)),
               max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_index_holds_exactly_what_the_events_say(seq) -> None:
    """Against a model: per replica, the multiset of stored vLLM hashes; the index holds a block
    for replica r exactly when some stored copy of it is still there."""
    index, ev = idx()
    model: dict[int, dict[int, int]] = {0: {}, 1: {}, 2: {}}
    docs = {d: [d * 1000 + t for t in range(4 * (d % 3 + 1))] for d in range(6)}  # 1..3 blocks each
    vh = {d: [d * 10 + k for k in range(len(docs[d]) // B)] for d in docs}
    for op, rep, d in seq:
        if op == "store":
            ev.stored(rep, vh[d], None, docs[d], B)
            for h in vh[d]:
                model[rep][h] = model[rep].get(h, 0) + 1
        elif op == "remove":
            h = vh[d][-1]
            ev.removed(rep, [h])
            if model[rep].get(h):
                model[rep][h] -= 1
                if not model[rep][h]:
                    del model[rep][h]
        else:
            ev.cleared(rep)
            model[rep] = {}
    for rep in model:
        want = {chain(docs[h // 10])[h % 10] for h in model[rep]}
        assert set(index.blocks(rep)) == want
        assert ev.held_hashes(rep) == want
