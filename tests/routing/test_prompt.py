"""The prompt key: canonical bytes with the multi-turn prefix property, and clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefixlb.index import block_hashes
from prefixlb.routing import PromptError, prompt_key

text = st.text(max_size=80)
part = st.one_of(text, st.builds(lambda t: {"type": "text", "text": t}, text))
content = st.one_of(text, st.lists(part, max_size=3), st.none())
message = st.builds(lambda role, c: {"role": role, "content": c}, st.sampled_from(["system", "user", "assistant", "tool"]), content)


@given(messages=st.lists(message, min_size=1, max_size=6), k=st.integers(1, 6))
def test_a_conversation_key_is_a_prefix_of_its_continuation(messages, k):
    k = min(k, len(messages))
    short = prompt_key({"messages": messages[:k]}, chat=True).data
    full = prompt_key({"messages": messages}, chat=True).data
    assert full.startswith(short)


def test_continuations_share_leading_blocks():
    history = [{"role": "system", "content": "You are helpful. " * 50}, {"role": "user", "content": "hi"}]
    a = prompt_key({"messages": history}, chat=True)
    b = prompt_key({"messages": history + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]}, chat=True)
    ha, hb = block_hashes(a.data), block_hashes(b.data)
    assert len(ha) > 10 and hb[: len(ha)] == ha


def test_message_framing_cannot_be_forged_by_content():
    one = prompt_key({"messages": [{"role": "user", "content": "ab"}]}, chat=True).data
    two = prompt_key({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, chat=True).data
    assert one != two


def test_text_parts_and_strings_agree():
    a = prompt_key({"messages": [{"role": "user", "content": "hello"}]}, chat=True)
    b = prompt_key({"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}, chat=True)
    assert a.data == b.data


def test_tools_open_the_key_and_images_are_bounded():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    big = "data:image/png;base64," + "A" * 100_000
    k = prompt_key({"tools": tools, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]}, chat=True)
    assert k.data.startswith(b"tools") and len(k.data) < 1000


def test_completion_prompts():
    assert prompt_key({"prompt": "abc"}, chat=False).data == b"abc"
    ids = prompt_key({"prompt": [1, 2, 3]}, chat=False)
    assert ids.token_ids == 3 and ids.data == (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + (3).to_bytes(4, "little")
    assert prompt_key({"prompt": ["first", "second"]}, chat=False).data == b"first"
    assert prompt_key({"prompt": [[5, 6]]}, chat=False).token_ids == 2


def test_token_id_prompts_of_equal_length_do_not_collide():
    """vllm-project/router#237: token-id prompts were keyed by their length."""
    a = prompt_key({"prompt": list(range(100))}, chat=False)
    b = prompt_key({"prompt": list(range(1, 101))}, chat=False)
    assert block_hashes(a.data) != block_hashes(b.data)


def test_cache_salt_changes_the_seed():
    a = prompt_key({"prompt": "x", "cache_salt": "tenant-a"}, chat=False)
    b = prompt_key({"prompt": "x", "cache_salt": "tenant-b"}, chat=False)
    c = prompt_key({"prompt": "x"}, chat=False)
    assert len({a.seed, b.seed, c.seed}) == 3 and c.seed == 0


@pytest.mark.parametrize(
    "body, chat",
    [
        ({}, True),
        ({"messages": []}, True),
        ({"messages": "hi"}, True),
        ({"messages": [5]}, True),
        ({"messages": [{"content": "x"}]}, True),
        ({"messages": [{"role": "user", "content": 5}]}, True),
        ({"messages": [{"role": "user", "content": [5]}]}, True),
        ({}, False),
        ({"prompt": 5}, False),
        ({"prompt": []}, False),
        ({"prompt": [-1, 2]}, False),
        ({"prompt": [1.5]}, False),
    ],
)
def test_bad_prompts_raise_prompt_error(body, chat):
    with pytest.raises(PromptError):
        prompt_key(body, chat=chat)
