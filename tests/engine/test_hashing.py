"""Block hashes equal vLLM's (constants from vllm-interfaces.md) and chain incrementally."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from prefixlb.engine import BlockHasher, external_hash, none_hash
from prefixlb.engine.hashing import sha256_pickle

TOKENS_1_16 = list(range(1, 17))


def test_sha256_block0_matches_vllm_event_int():
    h = BlockHasher("sha256", 16)
    assert external_hash(h.chain(TOKENS_1_16)[0]) == 0x137BB037547F4CAF


def test_sha256_cbor_block0_matches_vllm_event_int():
    pytest.importorskip("cbor2")
    h = BlockHasher("sha256_cbor", 16)
    assert h.none_hash.hex().startswith("9bd96a48") and h.none_hash.hex().endswith("eef0")
    block0 = h.chain(TOKENS_1_16)[0]
    assert block0.hex().startswith("cd7c51bc") and block0.hex().endswith("1682")
    assert external_hash(block0) == 8866452693264111234


def test_none_hash_follows_pythonhashseed_when_given():
    assert none_hash("sha256") == sha256_pickle("vllm-none-hash")
    assert none_hash("sha256", "0") == sha256_pickle("0")
    seeded = BlockHasher("sha256", 16, seed="0").chain(TOKENS_1_16)
    assert seeded != BlockHasher("sha256", 16).chain(TOKENS_1_16)


def test_external_hash_is_low_64_bits_of_digest():
    d = bytes(range(32))
    assert external_hash(d) == int.from_bytes(d[-8:], "big")


def test_only_full_blocks_are_hashed():
    h = BlockHasher("sha256", 16)
    assert h.chain(list(range(15))) == []
    assert len(h.chain(list(range(47)))) == 2


def test_fast_hash_is_xxh64_chain_over_uint32_le_ids():
    ids = [5, 70000, 2**32 - 1, 0] * 8  # 32 tokens, 2 blocks of 16
    chain = BlockHasher("fast", 16).chain(ids)
    data = struct.pack("<32I", *ids)
    h0 = xxhash.xxh64_intdigest(data[:64], seed=0)
    h1 = xxhash.xxh64_intdigest(data[64:], seed=h0)
    assert chain == [h0, h1]
    assert [external_hash(x) for x in chain] == chain


@pytest.mark.parametrize("algo", ["sha256", "fast"])
@given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=80), cut=st.integers(0, 80))
def test_incremental_extend_equals_full_chain(algo, tokens, cut):
    h = BlockHasher(algo, 8)
    part: list = []
    h.extend(part, tokens[:cut])
    added = h.extend(part, tokens)
    assert part == h.chain(tokens)
    assert added == len(tokens) // 8 - min(cut, len(tokens)) // 8


@pytest.mark.parametrize("algo", ["sha256", "fast"])
def test_chain_is_prefix_stable_and_diverges_after_a_change(algo):
    h = BlockHasher(algo, 4)
    a = h.chain(list(range(40)))
    b = h.chain(list(range(20)) + [999] + list(range(21, 40)))
    assert a[:5] == b[:5] and all(x != y for x, y in zip(a[5:], b[5:]))


@pytest.mark.parametrize("algo", ["sha256", "fast"])
def test_cache_salt_changes_first_block_and_thus_the_whole_chain(algo):
    h = BlockHasher(algo, 4)
    salt = lambda i: (("cache_salt", "s1"),) if i == 0 else None  # noqa: E731
    plain, salted = h.chain(list(range(12))), h.chain(list(range(12)), salt)
    assert all(x != y for x, y in zip(plain, salted))
    # block 1's own extra keys are None: it differs only through its parent
    assert salted[1] == h.hash_block(salted[0], list(range(4, 8)))
