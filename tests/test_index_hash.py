"""The block-hash chain: native == reference == python-xxhash, per the DESIGN contract."""

from __future__ import annotations

import array
import pickle

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from prefixlb import index
from prefixlb.index import _reference

native = pytest.importorskip("prefixlb.index._native", reason="C extension not built")

U64 = st.integers(min_value=0, max_value=2**64 - 1)


def chain_by_definition(data: bytes, block_size: int, seed: int) -> list[int]:
    """h[i] = XXH64(block_i, seed=h[i-1]), h[-1] = seed, full blocks only (DESIGN.md)."""
    out, h = [], seed
    for i in range(len(data) // block_size):
        h = xxhash.xxh64_intdigest(data[i * block_size : (i + 1) * block_size], seed=h)
        out.append(h)
    return out


@given(data=st.binary(min_size=0, max_size=200), seed=U64)
def test_native_xxh64_is_bit_identical_to_python_xxhash(data, seed):
    assert native.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed=seed)


@given(
    data=st.binary(min_size=0, max_size=1500),
    block_size=st.integers(min_value=1, max_value=130),
    seed=U64,
)
def test_block_hashes_native_reference_and_definition_agree(data, block_size, seed):
    expected = chain_by_definition(data, block_size, seed)
    assert _reference.block_hashes_py(data, block_size, seed) == expected
    assert native.block_hashes(data, block_size, seed) == expected
    assert native.chain(data, block_size, seed).tolist() == expected


@pytest.mark.parametrize("length", [0, 1, 63, 64, 65, 127, 128, 4096, 4097, 131072 + 5])
def test_block_hashes_count_only_full_blocks(length):
    data = bytes(range(256)) * (length // 256 + 1)
    data = data[:length]
    got = index.block_hashes(data)
    assert len(got) == length // 64
    assert got == chain_by_definition(data, 64, 0)


def test_defaults_are_block_64_seed_0():
    data = b"x" * 200
    assert index.block_hashes(data) == chain_by_definition(data, 64, 0)


def test_a_prompt_and_its_continuation_share_leading_hashes():
    base = b"system prompt " * 40
    a = index.block_hashes(base + b"question one")
    b = index.block_hashes(base + b"a different question entirely")
    shared = len(base) // 64
    assert a[:shared] == b[:shared]


def test_seed_changes_every_hash():
    data = b"y" * 256
    assert all(x != y for x, y in zip(index.block_hashes(data, 64, 0), index.block_hashes(data, 64, 1)))


@pytest.mark.parametrize("fn", [_reference.block_hashes_py, native.block_hashes], ids=["py", "c"])
@pytest.mark.parametrize(
    "kwargs",
    [{"block_size": 0}, {"block_size": -3}, {"block_size": "64"}, {"seed": -1}, {"seed": 2**64}, {"seed": 1.5}],
)
def test_bad_hash_arguments_raise_value_error(fn, kwargs):
    with pytest.raises(ValueError):
        fn(b"abc" * 100, **kwargs)


@pytest.mark.parametrize("fn", [_reference.block_hashes_py, native.block_hashes], ids=["py", "c"])
def test_text_is_refused_bytes_like_accepted(fn):
    with pytest.raises(TypeError):
        fn("a str is not bytes")
    data = b"z" * 130
    assert fn(bytearray(data)) == fn(memoryview(data)) == fn(data)


def test_chain_is_a_compact_sequence_with_buffer_protocol():
    data = bytes(range(256)) * 4
    c = native.chain(data, 64, 7)
    expected = chain_by_definition(data, 64, 7)
    assert len(c) == len(expected) == 16
    assert list(c) == expected and c == expected and c != expected[:-1]
    assert c[0] == expected[0] and c[-1] == expected[-1]
    assert c[2:5].tolist() == expected[2:5] and c[::-3].tolist() == expected[::-3]
    mv = memoryview(c)
    assert mv.format == "Q" and mv.itemsize == 8 and mv.readonly and mv.tolist() == expected
    assert array.array("Q", bytes(mv)).tolist() == expected
    assert pickle.loads(pickle.dumps(c)) == c
    assert native.Chain(expected) == c
    with pytest.raises(IndexError):
        c[16]
    with pytest.raises(TypeError):
        hash(c)
