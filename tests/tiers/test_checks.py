"""The cascade's confidence checks as pure functions: logprob features beyond the mean, JSON and
tool-call parsing, in vLLM's chat and completion shapes."""

from __future__ import annotations

import math

import pytest

from prefixlb.routing.cascade import (
    Checks,
    check_answer,
    logprob_features,
    parse_answer,
)


def chat_resp(content="hi", lps=(), tops=None, tool_calls=None):
    lp = None
    if lps:
        lp = {"content": [{"token": "t", "logprob": x,
                           "top_logprobs": [{"token": "t", "logprob": x}, {"token": "u", "logprob": y}]
                           if tops else []} for x, y in zip(lps, tops or [0] * len(lps))]}
    msg = {"role": "assistant", "content": content}
    if tool_calls is not None:
        msg["tool_calls"] = tool_calls
    return {"choices": [{"index": 0, "message": msg, "logprobs": lp, "finish_reason": "stop"}]}


def test_features_are_mean_min_low_fraction_and_margin():
    f = logprob_features([-0.1, -0.2, -3.0, -0.1], margins=[2.0, 1.0], low=-2.3)
    assert f.tokens == 4 and math.isclose(f.mean, -0.85) and f.min == -3.0
    assert f.low_fraction == 0.25 and f.margin == 1.5
    assert logprob_features([]) is None


def test_chat_and_completion_shapes_give_the_same_features():
    c = parse_answer(chat_resp(lps=[-0.5, -1.5], tops=[-2.0, -1.6]), chat=True)
    comp = parse_answer({"choices": [{"text": "x", "logprobs": {"token_logprobs": [-0.5, -1.5],
                                                                 "top_logprobs": [{"a": -0.5, "b": -2.0},
                                                                                  {"a": -1.5, "b": -1.6}]}}]},
                        chat=False)
    for a in (c, comp):
        f = logprob_features(a.logprobs, a.margins)
        assert f.mean == -1.0 and math.isclose(f.margin, (1.5 + 0.1) / 2)


@pytest.mark.parametrize("checks, lps, reason", [
    (Checks(min_mean_logprob=-0.5), [-0.1, -0.2, -0.3], None),
    (Checks(min_mean_logprob=-0.5), [-0.9, -0.8, -0.7], "low_mean_logprob"),
    # a good mean can hide one token the model was unsure of: the min and the low-token share see it
    (Checks(min_mean_logprob=-1.0, min_token_logprob=-3.0), [-0.05] * 19 + [-6.0], "low_min_logprob"),
    (Checks(max_low_token_fraction=0.1), [-0.05] * 8 + [-4.0, -4.0], "low_token_fraction"),
    (Checks(max_low_token_fraction=0.3), [-0.05] * 8 + [-4.0, -4.0], None),
])
def test_logprob_checks_each_name_their_reason(checks, lps, reason):
    got, feats = check_answer(parse_answer(chat_resp(lps=lps), True), {}, checks)
    assert got == reason and feats.tokens == len(lps)


def test_low_margin_escalates_when_the_top_two_tokens_were_close():
    ans = parse_answer(chat_resp(lps=[-0.6, -0.6], tops=[-0.7, -0.8]), True)
    assert check_answer(ans, {}, Checks(min_margin=0.5))[0] == "low_margin"
    assert check_answer(ans, {}, Checks(min_margin=0.05))[0] is None


def test_an_answer_without_logprobs_passes_the_logprob_checks():
    assert check_answer(parse_answer(chat_resp(), True), {}, Checks(min_mean_logprob=-0.1)) == (None, None)


def test_json_is_required_by_config_or_by_response_format():
    bad, good = parse_answer(chat_resp("not json {"), True), parse_answer(chat_resp('{"a": 1}'), True)
    assert check_answer(bad, {}, Checks())[0] is None
    assert check_answer(bad, {}, Checks(json=True))[0] == "json"
    assert check_answer(bad, {"response_format": {"type": "json_object"}}, Checks())[0] == "json"
    assert check_answer(good, {"response_format": {"type": "json_schema"}}, Checks())[0] is None


TOOLS = {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}


def call(name="get_weather", args='{"city": "Paris"}'):
    return [{"id": "c1", "type": "function", "function": {"name": name, "arguments": args}}]


@pytest.mark.parametrize("calls, body, reason", [
    (call(), TOOLS, None),
    (call(args='{"city": "Par'), TOOLS, "tool_call"),  # truncated arguments
    (call(args='["Paris"]'), TOOLS, "tool_call"),  # not an object
    (call(name="get_wether"), TOOLS, "tool_call"),  # a tool that was not offered
    ([], {**TOOLS, "tool_choice": "required"}, "tool_call"),  # a call was required
    ([], TOOLS, None),  # answering in text is allowed when no call is required
])
def test_tool_calls_must_name_a_given_tool_with_json_object_arguments(calls, body, reason):
    ans = parse_answer(chat_resp(content=None, tool_calls=calls), True)
    assert check_answer(ans, body, Checks())[0] == reason
    assert check_answer(ans, body, Checks(tool_calls=False))[0] is None
