"""The real draft/target pair: Qwen2.5-Coder-0.5B-Instruct drafting for Qwen2.5-Coder-1.5B-Instruct
(both Q4_K_M, one tokenizer). Greedy output with the draft is the target's plain decoding, token for
token and log-prob for log-prob, and the draft's guesses are mostly kept on a code-editing prompt.
Kept short: the 1.5B decodes at a few tokens a second on a 2-core CPU."""

from __future__ import annotations

import numpy as np

from xlaserve import LLM, SamplingParams
from xlaserve.checkpoints.gguf import open_reader, read_metadata
from xlaserve.checkpoints.tokenizer import tokenizer_from_gguf

EDIT = (
    "Here is a function. Rename the variable x to y and output the whole function.\n\n"
    "def mean(x):\n    total = 0\n    for v in x:\n        total += v\n    return total / len(x)\n"
)
CHAT = "What is the difference between a list and a tuple in Python?"


def test_the_pairs_tokenizers_are_one(qwen15_path, qwen_path):
    a, b = (tokenizer_from_gguf(read_metadata(open_reader(p)), p) for p in (qwen_path, qwen15_path))
    assert a.backend.to_str() == b.backend.to_str() and a.special_ids == b.special_ids


def test_qwen_05b_drafts_for_15b_without_changing_a_token(qwen15_path, qwen_path):
    spec = {"method": "draft", "model": str(qwen_path), "num_speculative_tokens": 4}
    engine = dict(max_slots=2, max_model_len=256, prefill_buckets=(128,), kv_buckets=(256,), scoring=False)
    engine["compile_at"] = "use"  # the 1.5B's programs compile slowly: only those the test runs
    llm = LLM(str(qwen15_path), speculative=spec, max_logprobs=2, **engine)
    assert (llm.config.num_layers, llm.draft.cfg.num_layers) == (28, 24)
    prompts = [[{"role": "user", "content": EDIT}], [{"role": "user", "content": CHAT}]]
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=2)
    llm.runner.spec.on = False
    plain = llm.generate(prompts, params, chat=True)
    llm.runner.spec.on = True
    fast = llm.generate(prompts, params, chat=True)
    for a, b in zip(plain, fast, strict=True):
        assert b.token_ids == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            np.testing.assert_allclose(
                [x.logprob, *[lp for _, lp in x.top]], [y.logprob, *[lp for _, lp in y.top]], atol=2e-3
            )
    assert "def mean(y)" in fast[0].text
    edit = fast[0].speculative
    assert edit["accepted"] > 0.6 * edit["proposed"] > 0
