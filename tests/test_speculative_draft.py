"""Speculative decoding with a draft model, on a tiny random Llama target: greedy output with a draft
is token for token (and log-prob for log-prob) what plain decoding of the target emits, with 4-token
pages (every verify step crosses one), more requests than slots, penalized requests and a sampled
one whose law is one token (top_k=1: rejection sampling must then keep exactly greedy's tokens),
prompts longer than a prefill chunk (the draft catches up in chunks), prefix-cache hits (a new
sequence's draft starts at 0) and preemption; drafts of the target's shape (a noisy copy: each
verify step keeps anything from none to all of its guesses) and of another shape (its own cache).
The memory plan counts the draft's weights and pages; a draft whose tokenizer differs from the
target's is refused at start-up, naming both; the propose program lowers for GPU and TPU with their
decode-attention kernels."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from serving import mock_tokenizer
from tiny_gguf import tokenizer_meta, write_tiny_gguf

from xlaserve import LLM
from xlaserve.runtime import lower, models
from xlaserve.runtime.config import EngineConfig
from xlaserve.runtime.draft import DraftEngine, check_pair, propose_program
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.layout import Layout
from xlaserve.runtime.models import params
from xlaserve.runtime.models.presets import PRESETS
from xlaserve.runtime.sampling_params import SamplingParams

CFG = PRESETS["tiny"]
ENGINE = EngineConfig(
    max_slots=3,
    page_size=4,
    max_model_len=64,
    attn_block=64,
    prefill_buckets=(16,),
    kv_buckets=(64,),
    slot_buckets=(1,),
    scoring=False,
    max_logprobs=3,
    speculative_k=(4,),
    speculative_schedule=((3, 4, 1.0),),  # every greedy sequence guesses every step
    compile_at="use",
)
PROMPTS = [
    [5, 6, 7, 8] * 3,
    [42, 17, 17, 400, 3, 250, 88, 12, 5, 61],
    [5, 9, 100, 7, 300, 21, 9],
    [9, 9, 9, 9, 9],
    [(31 * i) % 500 + 1 for i in range(37)],  # over two prefill chunks of 16
]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, repetition_penalty=1.3),
    # sampled, through rejection sampling; top_k=1 makes its law one token, the greedy one
    SamplingParams(temperature=0.9, top_k=1, max_tokens=20, ignore_eos=True, seed=3, logprobs=0),
    SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1),
]


def weights(cfg, seed: int):
    return jax.tree.map(np.asarray, params.random_weights(models.declare(cfg), seed=seed, dtype=np.float32))


def noisy(w, scale: float, seed: int = 5):
    """The target's weights with Gaussian noise on every matrix (scale x its spread)."""
    rng = np.random.default_rng(seed)
    noise = lambda a: a + scale * a.std() * rng.standard_normal(a.shape).astype(a.dtype) if a.ndim > 1 else a
    return jax.tree.map(noise, w)


@pytest.fixture(scope="module")
def target():
    return Engine(CFG, weights(CFG, 1), ENGINE)


# (not named `llm`: conftest marks tests using a fixture of that name slow)
@pytest.fixture(scope="module", params=["noisy copy", "one layer"])
def pair_llm(request, target):
    w = weights(CFG, 1)
    if request.param == "noisy copy":
        draft = DraftEngine(target, CFG, noisy(w, 0.1))
    else:  # another shape: one layer of 2 kv heads of 8 dims, its own weights
        cfg = dataclasses.replace(CFG, num_layers=1, head_dim=8, num_heads=2, name="tiny-draft")
        draft = DraftEngine(target, cfg, weights(cfg, 2))
    for slot in range(ENGINE.max_slots):
        target.free(slot)
    return LLM.from_engine(target, mock_tokenizer(CFG.vocab_size), draft=draft)


def generate(llm, speculate: bool):
    llm.runner.spec.on = speculate
    before = list(llm.runner.spec.guesses)
    outs = llm.generate(PROMPTS, PARAMS)
    llm.runner.spec.on = True
    return outs, [a - b for a, b in zip(llm.runner.spec.guesses, before, strict=True)]


def assert_same(plain, fast):
    for a, b in zip(plain, fast, strict=True):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            np.testing.assert_allclose(
                [x.logprob, *[lp for _, lp in x.top]],
                [y.logprob, *[lp for _, lp in y.top]],
                rtol=1e-4,
                atol=1e-4,
            )


def test_greedy_output_with_a_draft_is_plain_decodings(pair_llm):
    llm = pair_llm
    plain, none = generate(llm, speculate=False)
    assert none == [0, 0]
    emitted_before = list(llm.runner.spec.emitted)
    fast, (made, kept) = generate(llm, speculate=True)
    assert_same(plain, fast)
    assert llm.stats().pages_used == 0
    assert [len(o.token_ids) for o in fast] == [30, 25, 20, 3, 20]
    assert made > kept  # guesses were rejected
    assert fast[2].speculative["proposed"] > 0  # sampled rows guess too
    if llm.draft.cfg == CFG:  # the noisy copy keeps some guesses, and sometimes all four
        emitted = np.subtract(llm.runner.spec.emitted, emitted_before)
        assert kept > 0 and emitted[1] > 0 and emitted[5] > 0
    # again: every prompt's pages but its last now come from the prefix cache, without draft K/V
    cached = llm.stats().prefill_tokens_saved
    again, _ = generate(llm, speculate=True)
    assert llm.stats().prefill_tokens_saved > cached
    assert_same(plain, again)


def test_preempted_sequences_start_their_draft_again(pair_llm):
    """A pool short of pages (most held elsewhere): sequences are preempted and recomputed, their
    draft K/V with them, and nothing changes."""
    llm = pair_llm
    pool = llm.runner.scheduler.pages
    plain, _ = generate(llm, speculate=False)
    held = pool.alloc(pool.free_count - 16)
    try:
        preempted = llm.stats().preemptions
        fast, _ = generate(llm, speculate=True)
        assert llm.stats().preemptions > preempted
        assert llm.stats().pages_used == len(held)
    finally:
        pool.release(held)
    assert_same(plain, fast)


def test_the_memory_plan_counts_the_drafts_weights_and_pages():
    ecfg = dataclasses.replace(ENGINE, max_slots=None)
    w = weights(CFG, 1)
    draft = Layout.build(CFG, w, ecfg, backend="cpu").footprint()
    page = 2 * CFG.num_layers * ENGINE.page_size * CFG.num_kv_heads * CFG.head_dim * 4  # K, V in float32
    assert draft == (sum(a.nbytes for a in jax.tree.leaves(w)), page)
    big = Layout.build(CFG, w, ecfg, backend="cpu", device=(2**40, "test"))
    seq = big.plan.page_bytes * big.ecfg.pages_per_seq  # one sequence's K/V, the target's alone
    # room for the target, its draft (the same size here) and 6 sequences of both
    device = (int((2 * draft[0] + big.plan.activations + 6 * 2 * seq) / 0.9) + 1, "test")
    alone = Layout.build(CFG, w, ecfg, backend="cpu", device=device)
    both = Layout.build(CFG, w, ecfg, backend="cpu", device=device, draft=draft)
    assert both.plan.weights == alone.plan.weights + draft[0]
    assert both.plan.page_bytes == alone.plan.page_bytes + draft[1]
    assert both.plan.weights + both.plan.kv + both.plan.activations + both.plan.headroom == both.plan.budget
    assert (alone.ecfg.max_slots, both.ecfg.max_slots) == (8, 6)
    assert "draft model" in both.plan.describe()


def test_a_draft_with_another_tokenizer_is_refused_at_start_up(model_path, tmp_path):
    meta = tokenizer_meta(model_path, vocab=512)
    write_tiny_gguf(tmp_path / "target.gguf", meta, "F32")
    write_tiny_gguf(tmp_path / "small.gguf", tokenizer_meta(model_path, vocab=256), "F32")
    swapped = dict(
        meta, tokens=[*meta["tokens"][:300], meta["tokens"][301], meta["tokens"][300], *meta["tokens"][302:]]
    )
    write_tiny_gguf(tmp_path / "swapped.gguf", swapped, "F32")
    target = str(tmp_path / "target.gguf")
    for draft, why in (("small", r"vocab_size 256 vs 512"), ("swapped", r"token id 300 is .* vs ")):
        path = str(tmp_path / f"{draft}.gguf")
        with pytest.raises(ValueError, match=f"draft model {path} and the target model {target}.*{why}"):
            LLM(target, speculative={"method": "draft", "model": path})


def test_check_pair_and_the_speculative_argument():
    tok, cfg = mock_tokenizer(CFG.vocab_size), CFG
    check_pair(("t", cfg, tok), ("d", dataclasses.replace(cfg, num_layers=1), tok))
    with pytest.raises(ValueError, match=r"different EOS tokens \(\[3\] vs \[\]\)"):
        check_pair(("t", cfg, tok), ("d", dataclasses.replace(cfg, eos_token_ids=(3,)), tok))
    windowed = dataclasses.replace(cfg, sliding_window=16)
    with pytest.raises(ValueError, match="every layer has a sliding window"):
        check_pair(("t", windowed, tok), ("d", cfg, tok))
    for bad, why in (
        ({"method": "eagle"}, "'head' .* goes with method 'eagle' only"),
        ({"method": "medusa"}, "method 'ngram', 'draft' or 'eagle'"),
        ({"method": "draft"}, "'model' .* goes with method 'draft' only"),
        ({"method": "ngram", "model": "m"}, "'model' .* goes with method 'draft' only"),
        ({"method": "ngram", "k": 3}, "optionally num_speculative_tokens"),
        (
            {"method": "ngram", "num_speculative_tokens": 17},
            r"num_speculative_tokens=17 must be an integer in \[1, 16\]",
        ),
        (
            {"method": "draft", "model": "m", "num_speculative_tokens": "4"},
            "num_speculative_tokens='4' must be",
        ),
    ):
        with pytest.raises(ValueError, match=why):
            LLM("/nonexistent", speculative=bad)
    with pytest.raises(ValueError, match="not both"):
        LLM("/nonexistent", speculative={"method": "ngram"}, speculative_k=(4,))


@pytest.mark.parametrize(
    "platform, backend, kernels",
    [
        ("cuda", "gpu", ("triton:_decode_kernel", "triton:_kernel")),
        ("tpu", "tpu", ("mosaic:xlaserve_decode_attention",)),
    ],
)
def test_propose_lowers_for_accelerators(platform, backend, kernels):
    """The draft's one-token steps run the Pallas decode-attention kernel (its window of several
    tokens a row attends on the XLA path, as verify does)."""
    ecfg = EngineConfig(
        max_model_len=256, prefill_buckets=(32,), kv_buckets=(256,), max_slots=2, speculative_k=(4,)
    )
    layout = Layout.build(CFG, lower.preset_weights(CFG, "q4_0", "bfloat16"), ecfg, backend=backend)
    program = propose_program(layout, 2, 256, 4)
    text = program.jit().trace(*program.args).lower(lowering_platforms=(platform,)).as_text()
    assert lower.kernel_calls(text) == kernels
