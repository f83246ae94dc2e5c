"""The engine as the simulator drives it: ``advance`` is ``step`` without the per-token outputs,
array prompts are list prompts, and the native block-hash chain is the engine's ``fast`` chain.

Each test runs the same seeded scenario two ways and requires identical engine state, step end
times and (filtered) outputs, so the simulator's speed-ups cannot change what it models.
"""

from __future__ import annotations

import random
from array import array

import pytest

from prefixlb.engine import BlockHasher, Engine, EngineRequest, default_tokenizer
from prefixlb.sim.core import _ChainHasher


def _scenario(seed: int):
    """A small engine under memory pressure, chunked prefills, shared prefixes, EOS and limits."""
    rng = random.Random(seed)
    kw = dict(block_size=rng.choice([4, 16]), max_num_seqs=rng.choice([4, 64]),
              max_num_batched_tokens=rng.choice([64, 512]), max_model_len=512, hash_algo="fast",
              enable_kv_events=rng.random() < 0.5, grade_quality=False)
    kw["kv_capacity_tokens"] = rng.choice([700, 2000, 20000])
    tok = default_tokenizer()
    prefixes = [tok.encode(f"prefix {i} " * rng.randint(5, 40), add_special_tokens=False) for i in range(4)]
    reqs = []
    t = 0.0
    for k in range(40):
        t += rng.expovariate(40.0)
        ids = (prefixes[rng.randrange(4)] + tok.encode(f" q{k} " * rng.randint(0, 30), add_special_tokens=False))[:400]
        max_tokens = rng.choice([1, 7, 40, None])
        reqs.append((t, dict(request_id=f"r{k}", prompt_token_ids=ids, max_tokens=max_tokens,
                             ignore_eos=rng.random() < 0.5, min_tokens=0 if max_tokens == 1 else rng.choice([0, 3]),
                             logprobs=rng.choice([None, None, 2]))))
    return kw, reqs


def _run(kw, reqs, *, use_advance: bool, as_array: bool = False, hasher=None):
    e = Engine("h100-llama3-8b", **kw)
    if hasher is not None:
        e.hasher = hasher(e.hash_algo, e.block_size)
    t, k, log = 0.0, 0, []
    for _ in range(100_000):
        while k < len(reqs) and reqs[k][0] <= t:
            r = dict(reqs[k][1])
            if as_array:
                r["prompt_token_ids"] = array("I", r["prompt_token_ids"])
            e.add_request(EngineRequest(**r), reqs[k][0])
            k += 1
        if use_advance:
            res = e.advance(t)
            if res is None:
                if k == len(reqs):
                    break
                t = reqs[k][0]
                continue
            end, outs = res
        else:
            full = e.step(t)
            if full is None:
                if k == len(reqs):
                    break
                t = reqs[k][0]
                continue
            end, outs = full.end, [o for o in full.outputs if o.first_token or o.finished]
        e.kv.check_invariants()
        log.append((end, [(o.request_id, o.first_token, o.finished, o.finish_reason, o.num_cached_tokens,
                           o.num_output_tokens, o.new_token_ids, o.logprobs) for o in outs],
                    e.num_requests_running, e.num_requests_waiting, e.kv_cache_usage))
        t = end
    m = e.metrics()
    return log, m.counters, m.kv_cache_usage_perc


@pytest.mark.parametrize("seed", range(10))
def test_advance_is_step_without_the_tokens_in_between(seed):
    kw, reqs = _scenario(seed)
    assert _run(kw, reqs, use_advance=True) == _run(kw, reqs, use_advance=False)


@pytest.mark.parametrize("seed", range(4))
def test_an_array_prompt_is_the_same_request_as_a_list_prompt(seed):
    kw, reqs = _scenario(seed)
    assert _run(kw, reqs, use_advance=True, as_array=True) == _run(kw, reqs, use_advance=True)


@pytest.mark.parametrize("seed", range(4))
def test_the_native_chain_hasher_changes_nothing(seed):
    kw, reqs = _scenario(seed)
    assert _run(kw, reqs, use_advance=True, hasher=_ChainHasher) == _run(kw, reqs, use_advance=True)


def test_native_chain_equals_the_engine_fast_chain():
    rng = random.Random(7)
    for bs in (1, 4, 16):
        ids = [rng.randrange(1 << 32) for _ in range(300)]
        want = BlockHasher("fast", bs).chain(ids)
        assert _ChainHasher("fast", bs).chain(ids) == want
        assert _ChainHasher("fast", bs).chain(array("I", ids)) == want
        got: list[int] = []  # incremental, as output tokens fill blocks
        h = _ChainHasher("fast", bs)
        for n in range(0, 301, 37):
            h.extend(got, ids[:n])
        h.extend(got, ids)
        assert got == want


def test_inlined_token_draw_is_randrange():
    """engine._commit draws a pool index with getrandbits exactly as Random.randrange does."""
    for n in (1, 2, 3, 97, 100, 128, 129, 1000):
        for seed in range(20):
            a, b = random.Random(seed), random.Random(seed)
            bits = n.bit_length()
            for _ in range(50):
                x = b.getrandbits(bits)
                while x >= n:
                    x = b.getrandbits(bits)
                assert a.randrange(n) == x


def test_byte_tokenizer_array_encoding_is_list_encoding():
    tok = default_tokenizer()
    rng = random.Random(3)
    for _ in range(500):
        text = "".join(rng.choice("ab cd\n\té€😀") if rng.random() < 0.2 else rng.choice("abcdefgh ")
                       for _ in range(rng.randrange(0, 50)))
        for special in (True, False):
            assert tok.encode_array(text, special).tolist() == tok.encode(text, special)
