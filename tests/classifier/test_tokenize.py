"""WordPiece tokenization (pure Python) on a toy vocabulary."""

from __future__ import annotations

from prefixlb.routing.classifier.tokenize import WordPiece

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "the", "cafe", "?", ".", "12", "##3", "a"]


def test_words_lowercase_strip_accents_and_split_symbols():
    assert WordPiece.words("The Café? 12.5") == ["the", "cafe", "?", "12", ".", "5"]


def test_greedy_longest_match_first():
    wp = WordPiece(VOCAB)
    assert wp.encode("unaffable") == [VOCAB.index("un"), VOCAB.index("##aff"), VOCAB.index("##able")]
    assert wp.encode("123") == [VOCAB.index("12"), VOCAB.index("##3")]


def test_a_word_without_pieces_is_unknown_and_the_result_is_cached():
    wp = WordPiece(VOCAB)
    assert wp.encode("the zzz cafe") == [VOCAB.index("the"), 1, VOCAB.index("cafe")]
    assert wp.encode("zzz") == [1]
