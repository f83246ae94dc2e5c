"""ByteTokenizer: exact, prefix-stable, ~4 bytes a token; HFTokenizer loads a local directory."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefixlb.engine import ByteTokenizer, HFTokenizer, Tokenizer

tok = ByteTokenizer()


@given(st.text(max_size=200))
def test_roundtrip_is_exact(text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size < 2**32 for i in ids)


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=100), st.text(max_size=50))
def test_ascii_prefix_is_stable_except_the_last_token(a, b):
    x, y = tok.encode(a), tok.encode(a + b)
    assert y[: len(x) - 1] == x[:-1]


@given(st.text(max_size=100), st.text(max_size=50))
def test_any_prefix_is_stable_except_the_last_three_tokens(a, b):
    x, y = tok.encode(a), tok.encode(a + b)
    keep = max(1, len(x) - 3)
    assert y[:keep] == x[:keep]


def test_about_four_bytes_per_token_and_bos_optional():
    text = "The quick brown fox jumps over the lazy dog. " * 50
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == -(-len(text) // 4)
    assert tok.encode("abcd") == [tok.bos_token_id, int.from_bytes(b"abcd", "little")]


def test_decode_skips_special_tokens_unless_asked():
    ids = tok.encode("hi") + [tok.eos_token_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi</s>"
    assert tok.token_str(tok.eos_token_id) == "</s>"


def test_sample_pool_decodes_to_words_and_excludes_specials():
    pool = tok.sample_pool
    assert len(pool) >= 32 and tok.eos_token_id not in pool and tok.bos_token_id not in pool
    text = tok.decode(list(pool[:5]))
    assert len(text) == 20 and text.startswith(" ")


def test_default_chat_template_renders_roles_and_generation_prompt():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]
    assert tok.apply_chat_template(msgs) == "<|system|>\nBe brief.\n<|user|>\nHi\nthere\n<|assistant|>\n"
    first = tok.apply_chat_template(msgs[:1], add_generation_prompt=False)
    assert tok.apply_chat_template(msgs).startswith(first)  # multi-turn prefix reuse


def test_byte_tokenizer_satisfies_the_protocol():
    assert isinstance(tok, Tokenizer)


def _write_hf_dir(path, template_in_config: bool) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(["hello world the quick brown fox"] * 50, trainer=trainer)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    t.save(str(path / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if tools %}TOOLS {{ tools | tojson }}{% endif %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    if template_in_config:
        cfg["chat_template"] = template
    else:
        (path / "chat_template.jinja").write_text(template)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("template_in_config", [False, True], ids=["jinja-file", "config"])
def test_hf_tokenizer_from_dir(tmp_path, template_in_config):
    pytest.importorskip("jinja2")
    _write_hf_dir(tmp_path, template_in_config)
    hf = HFTokenizer.from_dir(tmp_path)
    ids = hf.encode("hello world")
    assert ids[0] == hf.bos_token_id == 0 and hf.eos_token_id == 1
    assert hf.decode(ids) == "hello world"
    assert hf.eos_token_id not in hf.sample_pool and len(hf.sample_pool) == hf.vocab_size - 3
    out = hf.apply_chat_template([{"role": "user", "content": "hi"}], tools=[{"name": "f"}])
    assert out == '<s>[user] hi</s>TOOLS [{"name": "f"}][assistant] '
    assert isinstance(hf, Tokenizer)


def test_hf_tokenizer_missing_dir_names_the_file(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)
