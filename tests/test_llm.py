"""The Python API on the real model: outputs, streaming, chat, seeds, log-probs, batching, both
weight modes, and a clear ValueError (with nothing lost) for every bad argument."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import LOGIT_ATOL, SMALL_ENGINE, hf_logits

from xlaserve import LLM, EngineConfig, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time, in a land far away,"]


def test_generate_outputs(llm):
    outs = llm.generate(PROMPTS, GREEDY)
    assert len(outs) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.prompt_token_ids == llm.tokenizer.encode(prompt)
        assert out.finish_reason in ("eos", "length")
        assert 0 < len(out.token_ids) <= 24
        body = out.token_ids[:-1] if out.finish_reason == "eos" else out.token_ids
        assert out.text == llm.tokenizer.decode(body)
        assert out.timings["ttft_s"] > 0 and out.timings["total_s"] >= out.timings["ttft_s"]
        assert out.logprobs is None
    assert outs[0].text.startswith(" Paris")


def test_batched_equals_alone(llm):
    together = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, together, strict=True):
        assert llm.generate(prompt, GREEDY)[0].token_ids == out.token_ids


def test_stream_equals_generate(llm):
    params = SamplingParams(temperature=0.0, max_tokens=20)
    deltas = list(llm.stream("Write one sentence about the sea.", params, chat=False))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    out = llm.generate("Write one sentence about the sea.", params)[0]
    assert "".join(d.text for d in deltas) == out.text
    assert [t for d in deltas for t in d.token_ids] == out.token_ids


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, GREEDY)
    assert out.prompt_token_ids == llm.tokenizer.encode_chat(messages)
    assert "Paris" in out.text


def test_seed_reproduces_and_ignores_batch_company(llm):
    sampled = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate(PROMPTS[2], sampled)[0].token_ids
    with_company = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [GREEDY, sampled, GREEDY])[1].token_ids
    assert alone == with_company
    other = llm.generate(PROMPTS[2], SamplingParams(**{**sampled.__dict__, "seed": 99}))[0].token_ids
    assert other != alone


def test_top_k_1_is_greedy(llm):
    params = SamplingParams(temperature=1.0, top_k=1, max_tokens=16, seed=5)
    assert llm.generate(PROMPTS[1], params)[0].token_ids == llm.generate(PROMPTS[1], GREEDY)[0].token_ids[:16]


def test_logprobs_match_hf(llm, hf_model):
    out = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, ignore_eos=True)
    )[0]
    ref = hf_logits(hf_model, out.prompt_token_ids + out.token_ids)
    ref = (
        ref
        - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - ref.max(-1, keepdims=True)
    )
    n = len(out.prompt_token_ids)
    for i, lp in enumerate(out.logprobs):
        row = ref[n - 1 + i]
        assert lp.token_id == out.token_ids[i] == int(np.argmax(row))
        assert abs(lp.logprob - row[lp.token_id]) < LOGIT_ATOL
        assert [t for t, _ in lp.top] == list(np.argsort(-row)[:3])
        np.testing.assert_allclose([v for _, v in lp.top], row[[t for t, _ in lp.top]], atol=LOGIT_ATOL)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda llm: llm.generate([[5] * 5000], GREEDY), "prompt has 5000 tokens; the limit is 1023"),
        (lambda llm: llm.generate("", GREEDY), "prompt is empty"),
        (
            lambda llm: llm.generate([[1, 2, 10**6]], GREEDY),
            "prompt token id 1000000 is out of range [0, 49152)",
        ),
        (lambda llm: llm.generate("hi", SamplingParams(logprobs=50)), "logprobs=50 exceeds max_logprobs=20"),
        (
            lambda llm: llm.generate("hi", SamplingParams(stop_token_ids=(60000,))),
            "stop_token_ids contains 60000",
        ),
        (lambda llm: llm.generate("hi", {"temperature": 0}), "params must be SamplingParams"),
        (lambda llm: llm.generate(["a", "b"], [GREEDY]), "got 1 SamplingParams for 2 prompts"),
        (lambda llm: llm.generate([], GREEDY), "prompts must be"),
        (lambda llm: llm.chat([{"role": "user"}], GREEDY), "messages[0].content must be a string"),
    ],
)
def test_bad_arguments_raise_and_lose_nothing(llm, call, message):
    with pytest.raises(ValueError) as info:
        call(llm)
    assert message in str(info.value)
    assert not llm.runner.busy
    assert llm.generate(PROMPTS[0], GREEDY)[0].text.startswith(" Paris")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(max_slots=0), "max_slots=0 must be ≥ 1"),
        (dict(max_model_len=10**6), "max_model_len=1000000 must be in [1, 8192]"),
        (dict(attn_block=100), "attn_block=100 must be a positive multiple of page_size (16)"),
        (dict(dtype="int4"), "dtype='int4' must be float32, bfloat16 or float16"),
        (dict(compile_at="later"), "compile_at='later' must be start or use"),
        (dict(num_pages=3), "num_pages=3 must be ≥"),
        (dict(kv_buckets=(10**5,)), "kv_buckets=(100000,) must be lengths in [1,"),
    ],
)
def test_bad_engine_config(llm, fields, message):
    with pytest.raises(ValueError) as info:
        EngineConfig(**fields).resolve(llm.config, "cpu")
    assert message in str(info.value)


def test_unknown_engine_option():
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM("smollm2", max_slot=3)


def test_dequantized_weights_and_multistep_decode_give_the_same_text(llm, model_path):
    """Weights dequantized to fp32 at load with 3 decode steps per dispatch, against the default:
    Q4_1 kept quantized (dequantized inside the programs), one step per dispatch."""
    assert type(llm.engine.weights.layers.w_up).__name__ == "QuantArray"
    other = LLM(str(model_path), **SMALL_ENGINE, quantized=False, decode_steps=3)
    assert other.engine.weights.layers.w_up.dtype == np.float32
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    ours = [o.token_ids for o in other.generate(PROMPTS, params)]
    assert ours == [o.token_ids for o in llm.generate(PROMPTS, params)]


def test_programs_compiled_on_first_use_give_the_same_tokens(llm, model_path):
    """compile_at="use": start-up compiles only what the prefill budget's measurement runs, a run
    compiles the programs it runs (once each) and no other, and the tokens are the eager engine's."""
    lazy = LLM(str(model_path), max_slots=2, prefill_buckets=(32, 128), max_model_len=256, compile_at="use")
    every = {p.name for p in lazy.engine.layout.programs()}
    assert set(lazy.engine.compile_seconds) <= {"prefill[T=32]", "prefill[T=128]"}
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for _ in range(2):
        ours = [o.token_ids for o in lazy.generate(PROMPTS, params)]
        assert ours == [o.token_ids for o in llm.generate(PROMPTS, params)]
    ran = set(lazy.engine.compile_seconds)
    assert ran < every and {"insert", "free"} <= ran
    assert any(n.startswith("decode[") for n in ran) and not any(n.startswith("decode_masked") for n in ran)
    assert len(lazy.engine._decode.done) == sum(n.startswith("decode[") for n in ran)
