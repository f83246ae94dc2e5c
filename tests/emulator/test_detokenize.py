"""Incremental detokenization: split characters held back, stop strings cut the text."""

from __future__ import annotations

import pytest

from prefixlb.emulator.detokenize import IncrementalText
from prefixlb.engine import HFTokenizer, default_tokenizer

from .helpers import TINY_TOKENIZER


@pytest.mark.parametrize("tok", [default_tokenizer(), HFTokenizer.from_dir(TINY_TOKENIZER)], ids=["byte", "hf"])
def test_deltas_concatenate_to_the_full_decode(tok) -> None:  # type: ignore[no-untyped-def]
    text = "héllo wörld — naïve café ünïcode 東京 alpha beta"
    ids = tok.encode(text, add_special_tokens=False)
    inc = IncrementalText(tok)
    deltas = [inc.add([t], final=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)  # a split character is held back, never emitted broken


def test_stop_string_cuts_before_the_match_and_holds_back_a_possible_start() -> None:
    tok = default_tokenizer()
    ids = tok.encode("one two three four five", add_special_tokens=False)
    inc = IncrementalText(tok, stop=["four"])
    out = ""
    for t in ids:
        out += inc.add([t])
        if inc.stop_reason:
            break
    assert inc.stop_reason == "four" and out == "one two three " and inc.text == out


def test_include_stop_str_in_output_and_first_match_wins() -> None:
    tok = default_tokenizer()
    ids = tok.encode("abc STOP def END", add_special_tokens=False)
    inc = IncrementalText(tok, stop=["END", "STOP"], include_stop_str_in_output=True)
    out = "".join(inc.add([t]) for t in ids)
    assert inc.stop_reason == "STOP" and out == "abc STOP"
