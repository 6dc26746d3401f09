"""Host-side request handling with the real tokenizer: streamed text equals the full decode, stop
strings end the output without ever being streamed, and each stop condition reports itself."""

from __future__ import annotations

import pytest

from xlaserve.runtime.request import FinishReason, Request
from xlaserve.runtime.sampling_params import SamplingParams

EOS = 2


@pytest.fixture(scope="module")
def tok(llm):
    return llm.tokenizer


def feed(tok, text: str, params: SamplingParams, extra=(), max_len=10_000):
    req = Request("r", [1], params, seed=0, eos_ids=frozenset({EOS}))
    streamed = []
    for t in [*tok.encode(text), *extra]:
        _, delta = req.append(t, None, tok, max_len)
        streamed.append(delta)
    return req, "".join(streamed)


@pytest.mark.parametrize(
    "text",
    [
        "Hello there, general Kenobi.",
        "emoji 🤖🎉 split across byte tokens",
        "日本語のテキスト",
        "  spaces\n\tand tabs",
    ],
)
def test_streamed_text_equals_full_decode(tok, text):
    req, streamed = feed(tok, text, SamplingParams(max_tokens=1000))
    assert streamed == req.text == tok.decode(req.output_ids) == text
    assert req.finish_reason is None


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("The answer is 42. Next question", ("42",), "The answer is "),
        ("alpha beta gamma delta", ("gamma del",), "alpha beta "),  # spans tokens
        ("alpha beta gamma", ("beta", "alph"), ""),  # the earliest match wins
        ("x = 1; y = 2;", (";",), "x = 1"),
    ],
)
def test_stop_strings_end_output_and_are_never_streamed(tok, text, stop, expected):
    req, streamed = feed(tok, text, SamplingParams(stop=stop, max_tokens=1000))
    assert req.finish_reason is FinishReason.STOP
    assert req.stop_reason in stop
    assert streamed == req.text == expected


def test_partial_stop_is_held_back_then_released(tok):
    params = SamplingParams(stop=("Hello world",), max_tokens=1000)
    req = Request("r", [1], params, seed=0, eos_ids=frozenset({EOS}))
    out = ""
    for t in tok.encode("Say Hello wonderful"):
        out += req.append(t, None, tok, 10_000)[1]
        assert "Hello w" not in out or out.endswith("wonderful")
    req.append(EOS, None, tok, 10_000)
    out += req.text[len(out) :]
    assert req.text == "Say Hello wonderful" and req.finish_reason is FinishReason.EOS


def test_eos_stop_ids_and_lengths(tok):
    req, text = feed(tok, "one two", SamplingParams(max_tokens=1000), extra=(EOS,))
    assert req.finish_reason is FinishReason.EOS and req.stop_reason == EOS and text == "one two"
    assert req.output_ids[-1] == EOS

    ignore, _ = feed(tok, "one two", SamplingParams(max_tokens=1000, ignore_eos=True), extra=(EOS, 198))
    assert ignore.finish_reason is None and ignore.output_ids[-2:] == [EOS, 198]

    stop_id = tok.encode(" two")[0]
    req, text = feed(tok, "one two three", SamplingParams(max_tokens=1000, stop_token_ids=(stop_id,)))
    assert req.finish_reason is FinishReason.STOP and req.stop_reason == stop_id and text == "one"

    n = len(tok.encode("one two three four"))
    req, text = feed(tok, "one two three four", SamplingParams(max_tokens=n - 1))
    assert req.finish_reason is FinishReason.LENGTH and len(req.output_ids) == n - 1

    req, _ = feed(tok, "one two three four", SamplingParams(max_tokens=1000), max_len=3)
    assert req.finish_reason is FinishReason.LENGTH and len(req.output_ids) == 2  # 1 prompt + 2 = max_len


def test_nothing_after_finish(tok):
    req, _ = feed(tok, "a b", SamplingParams(max_tokens=1))
    assert req.append(5, None, tok, 100) == ([], "")
    assert len(req.output_ids) == 1
