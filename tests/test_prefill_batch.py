"""Batched prefill on the real model (on CPU packed: prefill_calls.Packed). One call over several
sequences' chunks gives each row what the single-row prefill gives it: the same K/V (bit for bit),
the same sampled token, log-probs equal to float32 summation order (the head's product runs over
[rows, D] instead of [1, D]). Generation with batched prefill equals each prompt run alone and HF's
greedy tokens: prompts of different lengths, chunked prompts, prefix-cache hits, chunks that start
and end mid-page, sampled rows."""

from __future__ import annotations

import contextlib

import numpy as np
from helpers import assert_same_kv, held_pages, hf_greedy

from xlaserve import SamplingParams
from xlaserve.runtime.engine import to_host
from xlaserve.runtime.prefill_calls import Packed
from xlaserve.runtime.results import Sampled
from xlaserve.runtime.sampling import SamplingState

WORDS = "river stone lantern orchard copper violet meadow harbor quiet silver thunder maple".split()
# |log-prob difference| allowed between a batched row and the single-row prefill (measured: ~2e-5)
LOGPROB_ATOL = 1e-4


def words(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n))


def test_rows_equal_the_single_row_prefill(llm):
    engine, pages = llm.engine, llm.runner.scheduler.pages
    vocab, width, page = engine.cfg.vocab_size, engine.ecfg.pages_per_seq, engine.ecfg.page_size
    rng = np.random.default_rng(1)
    # two rounds of chunks per prompt: starts and ends off page boundaries, the second round 3 rows
    # (padded to 4), one prompt done after the first
    rounds = [[5, 16, 17, 31], [12, 3, 20, 0]]
    prompts = [rng.integers(1, vocab, a + b).tolist() for a, b in zip(*rounds, strict=True)]
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.8, seed=5, logprobs=2),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=1.0, top_k=20, seed=3, logprobs=1),
    ]
    held = []

    def table() -> list[np.ndarray]:
        rows = []
        for p in prompts:
            got = pages.alloc(-(-len(p) // page))
            held.append(got)
            rows.append(np.zeros((width,), np.int32))
            rows[-1][: len(got)] = got
        return rows

    def chunk(i: int, start: int, n: int, row: np.ndarray):
        presence = np.zeros((vocab,), bool)
        presence[prompts[i][: start + n]] = True
        return prompts[i][start : start + n], start, row, SamplingState.of(params[i], 7), presence

    alone, together = table(), table()
    try:
        start = [0] * len(prompts)
        for sizes in rounds:
            live = [i for i, n in enumerate(sizes) if n]
            single = [
                Sampled.unpack(to_host(engine.prefill(*chunk(i, start[i], sizes[i], alone[i])))) for i in live
            ]
            batched = Sampled.unpack(
                to_host(engine.prefill_batch([chunk(i, start[i], sizes[i], together[i]) for i in live]))
            )
            for row, (i, one) in enumerate(zip(live, single, strict=True)):
                n_top = params[i].logprobs or 0
                assert batched.tokens[row] == one.tokens[0], (i, sizes)
                assert abs(batched.logprobs[row] - one.logprobs[0]) < LOGPROB_ATOL
                assert (batched.top_ids[row, :n_top] == one.top_ids[0, :n_top]).all()
                np.testing.assert_allclose(
                    batched.top_logprobs[row, :n_top], one.top_logprobs[0, :n_top], atol=LOGPROB_ATOL
                )
                start[i] += sizes[i]
        cache = engine.cache
        for i in range(len(prompts)):
            used = -(-len(prompts[i]) // page)
            a, b = alone[i][:used], together[i][:used]
            for kv in (cache.k, cache.v):
                # [L, used, page, ...] -> [L, positions, ...]; a page's tail past the prompt holds
                # whatever an earlier owner left there (never read: attention masks it)
                x, y = (np.asarray(kv[:, p]) for p in (a, b))
                x, y = (z.reshape(z.shape[0], -1, *z.shape[3:])[:, : len(prompts[i])] for z in (x, y))
                assert np.array_equal(x, y), i
    finally:
        for got in held:
            pages.release(got)


def test_a_packed_call_holds_two_chunks_of_one_sequence(llm):
    """On CPU the engine packs its calls (prefill_calls.Packed: each token a row). A step that fills
    its bucket with more of a prompt puts two chunks of one sequence in one call, another
    sequence's between them: the second sees the first's K/V, written in the same layer before any
    token attends. Same K/V, token and log-probs as the prompt in one chunk."""
    engine, pages = llm.engine, llm.runner.scheduler.pages
    assert engine.layout.packed and isinstance(engine.prefill_calls, Packed)
    vocab = engine.cfg.vocab_size
    rng = np.random.default_rng(4)
    prompt, other = rng.integers(1, vocab, 40).tolist(), rng.integers(1, vocab, 7).tolist()
    sampling = SamplingState.of(SamplingParams(temperature=0.0, logprobs=2), 0)
    presence = np.zeros((vocab,), bool)
    with held_pages(engine, pages, (40, 40, 7)) as (held, rows):
        one = Sampled.unpack(to_host(engine.prefill(prompt, 0, rows[0], sampling, presence)))
        chunks = [(prompt[:25], 0, rows[1]), (other, 0, rows[2]), (prompt[25:], 25, rows[1])]
        two = Sampled.unpack(to_host(engine.prefill_batch([(*c, sampling, presence) for c in chunks])))
        assert two.tokens[2] == one.tokens[0] and abs(two.logprobs[2] - one.logprobs[0]) < LOGPROB_ATOL
        assert (two.top_ids[2] == one.top_ids[0]).all()
        assert_same_kv(engine, held[0], held[1], 40)


@contextlib.contextmanager
def batching(llm, budget: int, prefix_cache: bool):
    """The runner with a prefill budget that batches (the measured one may fit one chunk a step) and
    the prefix cache on or off; records the rows of each prefill call."""
    runner, engine = llm.runner, llm.engine
    s = runner.scheduler
    saved = s.token_budget, s.prefix_cache
    calls: list[int] = []
    batch = engine.prefill_batch

    def spy(chunks):
        calls.append(len(chunks))
        return batch(chunks)

    s.token_budget, s.prefix_cache = budget, prefix_cache
    engine.prefill_batch = spy
    try:
        yield calls
    finally:
        s.token_budget, s.prefix_cache = saved
        del engine.prefill_batch


def test_generation_equals_each_prompt_alone_and_hf(llm, hf_model):
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=8, ignore_eos=True)
    penalized = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, repetition_penalty=1.3)
    # 3 to ~200 tokens: one prompt spans two chunks of the largest bucket (128)
    cases = [
        (words(101, 3), greedy),
        (words(102, 21), sampled),
        (words(103, 9), greedy),
        (words(104, 40), penalized),
        (words(105, 170), greedy),
        (words(106, 14), greedy),
    ]
    prompts, params = [p for p, _ in cases], [sp for _, sp in cases]
    with batching(llm, 128, prefix_cache=False) as calls:
        alone = [llm.generate(p, sp)[0] for p, sp in cases]
        assert set(calls) == {1}
        cold = llm.generate(prompts, params)
        assert max(calls) > 1, calls
    with batching(llm, 128, prefix_cache=True) as calls:
        llm.generate(prompts, params)  # publishes the prompts' pages
        hits = llm.generate(prompts, params)  # their last partial pages, batched
        assert max(calls) > 1 and all(o.cached_tokens > 0 for o in hits if len(o.prompt_token_ids) > 16)
    for out in (cold, hits):
        for one, many in zip(alone, out, strict=True):
            assert many.token_ids == one.token_ids
            if one.logprobs:
                lp = [x.logprob for x in one.logprobs]
                np.testing.assert_allclose([x.logprob for x in many.logprobs], lp, atol=LOGPROB_ATOL)
    for one, (_, sp) in zip(alone, cases, strict=True):
        if sp is greedy:
            assert one.token_ids == hf_greedy(hf_model, one.prompt_token_ids, len(one.token_ids))
