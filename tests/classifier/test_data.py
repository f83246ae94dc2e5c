"""Reading labelled routing data (both formats) and the recorded held-out split."""

from __future__ import annotations

import json

import pytest

from prefixlb.routing.classifier.data import (
    DataError,
    load_jsonl,
    needed_tier,
    prompt_hash,
    stratified_split,
)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_tier_format_reads_weak_then_strong(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"prompt": "a", "weak_correct": False, "strong_correct": True, "source": "x"}])
    ds = load_jsonl(p)
    assert ds.tiers == ["weak", "strong"]
    assert ds.examples[0].correct == (False, True) and ds.examples[0].source == "x"


def test_n_tier_format_orders_tiers_by_keys_or_by_the_given_order(tmp_path):
    rows = [{"prompt": "a", "correct": {"small": False, "medium": True, "large": True}}]
    p = _write(tmp_path / "d.jsonl", rows)
    assert load_jsonl(p).tiers == ["small", "medium", "large"]
    ds = load_jsonl(p, ["large", "small", "medium"])
    assert ds.tiers == ["large", "small", "medium"] and ds.examples[0].correct == (True, False, True)


def test_a_line_separator_inside_a_prompt_is_not_a_line_break(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"prompt": "a\u2028b", "weak_correct": 1, "strong_correct": 0}])
    assert load_jsonl(p).examples[0].prompt == "a\u2028b"


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a"}], "weak_correct"),
        ([{"prompt": "a", "weak_correct": True}], "strong_correct"),
        ([{"prompt": "a", "weak_correct": "yes", "strong_correct": True}], "true/false"),
        ([{"prompt": "a", "weak_correct": True, "strong_correct": True}, {"prompt": "b", "correct": {"s": True}}],
         "mixes"),
        ([{"prompt": "a", "correct": {"s": True, "l": True}}, {"prompt": "b", "correct": {"s": True}}], "expected"),
        ([], "no examples"),
    ],
)
def test_bad_files_name_the_line_and_the_problem(tmp_path, rows, message):
    p = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_jsonl(p)


def test_needed_tier_is_the_cheapest_correct_one():
    assert needed_tier((False, True, True)) == 1
    assert needed_tier((True, False)) == 0
    assert needed_tier((False, False)) == 0


def test_split_is_seeded_stratified_and_keeps_duplicates_together(tmp_path):
    rows = []
    for i in range(400):
        rows.append({"prompt": f"q{i % 350}", "weak_correct": i % 3 == 0, "strong_correct": i % 2 == 0,
                     "source": "a" if i % 5 else "b"})
    ds = load_jsonl(_write(tmp_path / "d.jsonl", rows))
    rest, held = stratified_split(ds, 0.2, seed=4)
    assert (rest, held) == stratified_split(ds, 0.2, seed=4)
    assert set(rest).isdisjoint(held) and len(rest) + len(held) == len(ds)
    hr = {prompt_hash(ds.examples[i].prompt) for i in rest}
    hh = {prompt_hash(ds.examples[i].prompt) for i in held}
    assert hr.isdisjoint(hh)
    assert 0.15 < len(hh) / 350 < 0.25
    # both sources are represented on the held-out side in about their share
    share_b = sum(1 for i in held if ds.examples[i].source == "b") / len(held)
    assert 0.1 < share_b < 0.3
    assert stratified_split(ds, 0.2, seed=5) != (rest, held)
