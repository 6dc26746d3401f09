"""Speculative decoding's model-free halves (runtime/speculative.py): the n-gram proposer, and the
acceptance rule, checked against plain `sample` (greedy: the same tokens; sampled: the same
distribution, by a chi-square test on a small Markov model, for deterministic guesses and for a
draft's)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from xlaserve.runtime import speculative
from xlaserve.runtime.sampling import SamplingState, sample
from xlaserve.runtime.speculative import ngram_propose

accept = jax.jit(speculative.accept)  # as the verify program runs it (eager op by op is slow)


def test_ngram_proposes_what_followed_the_latest_longest_match():
    seq = [5, 6, 7, 8, 1, 5, 6, 7, 9, 2, 5, 6, 7]
    assert list(ngram_propose(seq, 3)) == [9, 2, 5]  # "5 6 7" last seen before "9 2 5"
    assert list(ngram_propose(seq, 1, max_n=1)) == [9]  # "7" alone: its latest earlier occurrence
    assert list(ngram_propose([1, 2, 3, 4], 3)) == []  # nothing repeats
    assert list(ngram_propose([4, 4], 5)) == [4]  # the match may run into the end
    assert list(ngram_propose([1, 2, 3, 1, 2], 2, min_n=2)) == [3, 1]
    assert list(ngram_propose([1, 2, 3, 9, 2], 2, min_n=2)) == []  # only 1-gram matches
    assert ngram_propose([7], 4).dtype == np.int32 and len(ngram_propose([], 4)) == 0


def state(rows: int, temperature=0.0, top_k=0, penalty=1.0, seeds=None) -> SamplingState:
    s = SamplingState.zeros(rows)
    seeds = np.arange(rows, dtype=np.uint64) if seeds is None else np.asarray(seeds, np.uint64)
    words = np.stack([seeds >> np.uint64(32), seeds & np.uint64(0xFFFFFFFF)], axis=1).astype(np.uint32)
    return SamplingState(
        temperature=np.full(rows, temperature, np.float32),
        top_k=np.full(rows, top_k, np.int32),
        top_p=s.top_p,
        min_p=s.min_p,
        repetition_penalty=np.full(rows, penalty, np.float32),
        seed_words=words,
        n_top=s.n_top,
    )


def test_greedy_keeps_the_agreeing_prefix_and_adds_the_targets_token():
    v = 10
    argmaxes = np.array([[4, 7, 2, 9], [4, 7, 2, 9], [4, 7, 2, 9], [1, 1, 1, 1]])
    logits = jax.nn.one_hot(argmaxes, v) * 5.0
    proposed = np.array([[4, 7, 2], [4, 8, 2], [3, 7, 2], [1, 1, 1]], np.int32)
    n = np.array([3, 3, 3, 2], np.int32)
    seen = np.zeros((4, v), bool)
    emitted, tokens, lps = accept(logits, proposed, n, state(4), seen, np.zeros(4, np.int32))
    assert list(emitted) == [4, 2, 1, 3]
    assert tokens.tolist() == [[4, 7, 2, 9], [4, 7, 0, 0], [4, 0, 0, 0], [1, 1, 1, 0]]
    lp = jax.nn.log_softmax(logits, axis=-1)
    assert float(lps[0, 3]) == pytest.approx(float(lp[0, 3, 9])) and float(lps[1, 2]) == 0.0


def test_guesses_count_as_output_for_the_repetition_penalty():
    # position 1 prefers token 3 only slightly over 5; guess 0 is 3, so the penalty flips it to 5,
    # as plain decoding would after emitting 3
    logits = np.full((1, 2, 8), -1.0, np.float32)
    logits[0, 0, 3] = 4.0
    logits[0, 1, 3], logits[0, 1, 5] = 2.0, 1.9
    emitted, tokens, _ = accept(
        logits,
        np.array([[3]], np.int32),
        np.array([1]),
        state(1, penalty=1.3),
        np.zeros((1, 8), bool),
        np.zeros(1, np.int32),
    )
    assert int(emitted[0]) == 2 and tokens.tolist() == [[3, 5]]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_with_nothing_proposed_it_samples_exactly_as_sample(temperature):
    rng = np.random.default_rng(0)
    s, v = 64, 50
    logits = rng.standard_normal((s, 1, v)).astype(np.float32) * 3
    seen = rng.random((s, v)) < 0.1
    positions = rng.integers(0, 1000, s).astype(np.int32)
    st = state(s, temperature=temperature, top_k=20, penalty=1.2)
    emitted, tokens, lps = accept(
        logits, np.zeros((s, 0), np.int32), np.zeros(s, np.int32), st, seen, positions
    )
    want, want_lp, _, _ = sample(jnp.asarray(logits[:, 0]), st, seen, positions, max_top=0)
    assert (np.asarray(emitted) == 1).all()
    assert np.array_equal(np.asarray(tokens[:, 0]), np.asarray(want))
    np.testing.assert_allclose(np.asarray(lps[:, 0]), np.asarray(want_lp), rtol=1e-6)


# -- the distribution: a Markov model over V tokens (next-token logits depend on the last token) --

V, T, TOP_K = 6, 0.7, 4


def exact_probs(table: np.ndarray) -> np.ndarray:
    """p(next | last) after temperature T and top-k TOP_K, as sampling.warp computes them."""
    x = table / T
    kth = np.sort(x, axis=-1)[:, -TOP_K][:, None]
    x = np.where(x >= kth, x, -np.inf)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def run_speculative(table, rows: int, k: int, draft: np.ndarray | None, steps: int = 3, seed: int = 0):
    """Emit `steps` tokens per row from last token 0 with speculation: each round proposes k guesses
    (drawn from `draft`'s Markov model, or the fixed guesses 1, 2, ...), verifies them against
    the target `table` and continues from what was emitted. Returns int [rows, steps]."""
    rng = np.random.default_rng(seed)
    out = [[] for _ in range(rows)]
    last = np.zeros(rows, np.int64)
    st = state(rows, temperature=T, top_k=TOP_K, seeds=np.arange(rows) + seed * rows)
    position = np.zeros(rows, np.int32)
    while min(len(o) for o in out) < steps:
        guesses = np.zeros((rows, k), np.int32)
        q = np.zeros((rows, k, V), np.float32)
        prev = last.copy()
        for j in range(k):
            if draft is None:
                guesses[:, j] = 1 + (j % (V - 1))
            else:
                q[:, j] = draft[prev]
                cdf = np.cumsum(q[:, j], axis=-1)
                guesses[:, j] = np.minimum((cdf < rng.random((rows, 1)) * cdf[:, -1:]).sum(-1), V - 1)
                prev = guesses[:, j]
        path = np.concatenate([last[:, None], guesses], axis=1)  # the token before each position
        logits = table[path].astype(np.float32)  # [rows, k+1, V]
        emitted, tokens, _ = accept(
            logits,
            guesses,
            np.full(rows, k, np.int32),
            st,
            np.zeros((rows, V), bool),
            position,
            draft_probs=None if draft is None else q,
        )
        emitted, tokens = np.asarray(emitted), np.asarray(tokens)
        for i in range(rows):
            out[i] += tokens[i, : emitted[i]].tolist()
            last[i] = tokens[i, emitted[i] - 1]
        position = position + emitted.astype(np.int32)
    return np.array([o[:steps] for o in out])


@pytest.mark.parametrize("proposer", ["fixed guesses", "draft model"])
def test_rejection_sampling_keeps_the_target_distribution(proposer):
    rng = np.random.default_rng(1)
    table = rng.standard_normal((V, V)) * 1.5
    table[:, 1] += 1.0  # make the fixed guesses right often enough to be kept
    draft = None if proposer == "fixed guesses" else exact_probs(table + rng.standard_normal((V, V)))
    rows = 6000
    seqs = run_speculative(table, rows, k=3, draft=draft)
    p = exact_probs(table)
    # the joint law of the first three tokens (216 cells) against the chain's exact one
    want = p[0][:, None, None] * p[:, :, None] * p[None, :, :]  # p(a|0) p(b|a) p(c|b)
    codes = seqs[:, 0] * V * V + seqs[:, 1] * V + seqs[:, 2]
    observed = np.bincount(codes, minlength=V**3)
    expected = want.reshape(-1) * rows
    keep = expected > 5  # chi-square needs expected counts of a few; lump the rest
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    assert observed[~(want.reshape(-1) > 0)].sum() == 0  # never a token top-k removed
    assert stats.chisquare(obs, exp).pvalue > 1e-3
