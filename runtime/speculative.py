"""Speculative decoding's two halves that need no model: proposing guesses and accepting them.

A proposer guesses up to K next tokens for a slot; the target model scores the slot's last token
and the K guesses in one pass (K + 1 positions); `accept` keeps the longest prefix of guesses the
target agrees with and adds one token of the target's own, so one verify step emits 1..K+1 tokens
for one read of the weights.

- Greedy rows (temperature 0): guess j is kept while it equals the target's argmax at its position
  (after the repetition penalty, which counts the guesses before it as output). The tokens emitted
  are exactly the ones plain greedy decoding emits from the same logits.
- Sampled rows: rejection sampling (Leviathan et al. 2023; Chen et al. 2023). p is the target's
  distribution after penalty, temperature and top-k / top-p / min-p (`sampling.warp`). With a
  draft model's probabilities q, guess d is kept with probability min(1, p(d) / q(d)) and on the
  first rejection a token is drawn from norm(max(p - q, 0)); a deterministic proposer (n-gram
  lookup: q is one-hot on d) keeps d with probability p(d) and redraws from p without d. Each
  emitted token is then distributed exactly as plain sampling's (tests/test_speculative.py checks
  it statistically). Draws for the token at absolute position t use keys derived from
  fold_in(seed, t) as `sampling.sample` does, so a seed reproduces the output; the token after all
  K guesses were kept (or with no guesses) is drawn with exactly `sample`'s key, so a row that
  proposes nothing samples as it would without speculation.

Log-probs of emitted tokens are the model's raw ones (log_softmax of the logits), as `sample`
reports them. Structured-output rows do not speculate (their masks depend on each accepted token).

`ngram_propose` is the prompt-lookup proposer (no model): the most recent earlier occurrence of
the sequence's last n tokens (n from `max_n` down to `min_n`) and the tokens that followed it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from xlaserve.runtime.sampling import SamplingState, argmax, draw_keys, log_probs_of, penalize, warp

ACCEPT, RESIDUAL = 1, 2  # sub-keys of a position's key: the accept test, the draw after a rejection


def ngram_propose(tokens, k: int, max_n: int = 4, min_n: int = 1) -> np.ndarray:
    """Up to k guesses (int32 [<= k]) for what follows `tokens` (prompt + output so far): the
    tokens after the latest earlier occurrence of its last n tokens, for the largest n in
    [min_n, max_n] that occurs; empty when none does."""
    seq = np.asarray(tokens, np.int32)
    for n in range(min(max_n, len(seq) - 1), min_n - 1, -1):
        # windows starting at 0 .. len - n - 1: every occurrence that ends before the last token
        windows = sliding_window_view(seq[:-1], n)
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            start = hits[-1] + n
            return seq[start : start + k].copy()
    return np.zeros((0,), np.int32)


def _seen_before(seen, proposed, n_proposed):
    """[S, K+1, V]: the tokens the penalty counts at each position: `seen`, plus the guesses
    before that position (only guesses j < n_proposed exist)."""
    s, k = proposed.shape
    v = seen.shape[-1]
    valid = jnp.arange(k)[None, :] < n_proposed[:, None]
    hot = jax.nn.one_hot(proposed, v, dtype=jnp.int32) * valid[..., None]  # [S, K, V]
    before = jnp.cumsum(jnp.concatenate([jnp.zeros((s, 1, v), jnp.int32), hot], axis=1), axis=1)
    return seen[:, None, :] | (before > 0)


def _per_position(state: SamplingState, k1: int) -> SamplingState:
    return jax.tree.map(lambda a: jnp.repeat(a, k1, axis=0), state)


def accept(logits, proposed, n_proposed, state: SamplingState, seen, positions, draft_probs=None):
    """Verify each row's guesses against the target's logits.

    logits [S, K+1, V] float32: the target's logits at the row's last token (position j = 0) and
    after each guess; proposed [S, K] int32; n_proposed [S] int32 in [0, K] (guesses past it are
    ignored); seen [S, V] bool (the penalty's tokens before the first new position); positions [S]
    int32: the absolute position of the first token to choose; draft_probs: None (deterministic
    guesses) or [S, K, V] the draft's probabilities each guess was drawn from.

    Returns (n_emitted [S] int32 in [1, n_proposed + 1], tokens [S, K+1] int32 (the first
    n_emitted are the output: kept guesses, then the target's token; 0 after), logprobs [S, K+1]).
    """
    s, k1, v = logits.shape
    flat = lambda a: a.reshape(s * k1, *a.shape[2:])
    rows = _per_position(state, k1)
    pos = (positions[:, None] + jnp.arange(k1)[None, :]).reshape(-1)
    # Building the penalty's seen sets [S, K+1, V] costs more than the rest of a greedy step, and
    # the draws below more again: each is skipped (lax.cond) when no row needs it, as in `sample`.
    penalized = jax.lax.cond(
        jnp.any(state.repetition_penalty != 1.0),
        lambda lg: penalize(lg, flat(_seen_before(seen, proposed, n_proposed)), rows.repetition_penalty),
        lambda lg: lg,
        flat(logits),
    )
    greedy = argmax(penalized).reshape(s, k1)
    guess = jnp.concatenate([proposed, jnp.zeros((s, 1), jnp.int32)], axis=1)  # [S, K+1]
    proposed_at = jnp.arange(k1)[None, :] < n_proposed[:, None]
    leading = lambda agree: jnp.sum(jnp.cumprod((agree & proposed_at).astype(jnp.int32), axis=1), axis=1)
    at = lambda a, kept: jnp.take_along_axis(a, kept.reshape(s, *(1,) * (a.ndim - 1)), axis=1)[:, 0]

    def all_greedy(_):
        kept = leading(greedy == guess)
        return kept, at(greedy, kept)

    def with_draws(_):
        warped = warp(penalized, rows).reshape(s, k1, v)
        probs = jax.nn.softmax(warped, axis=-1)
        is_greedy = state.temperature == 0.0
        p_guess = jnp.take_along_axis(probs, guess[..., None], axis=-1)[..., 0]
        if draft_probs is None:
            keep_prob = p_guess
        else:
            q = jnp.concatenate([draft_probs, jnp.ones((s, 1, v), draft_probs.dtype)], axis=1)
            q_guess = jnp.take_along_axis(q, guess[..., None], axis=-1)[..., 0]
            keep_prob = jnp.minimum(1.0, p_guess / jnp.maximum(q_guess, 1e-30))
        keys = draw_keys(rows, pos)  # [S*(K+1)]: `sample`'s key at each position
        u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, ACCEPT)))(keys).reshape(s, k1)
        kept = leading(jnp.where(is_greedy[:, None], greedy == guess, u < keep_prob))

        # The target's own token at position `kept`: after a rejection, from the residual; after
        # all guesses (kept == n_proposed), a plain draw with `sample`'s key.
        p_at = at(probs, kept)
        rejected = kept < n_proposed
        q_at = jax.nn.one_hot(at(guess, kept), v, dtype=p_at.dtype) if draft_probs is None else at(q, kept)
        residual = jnp.maximum(p_at - q_at, 0.0)
        residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_at)
        key_at = at(keys.reshape(s, k1, *keys.shape[1:]), kept)
        plain = jax.vmap(jax.random.categorical)(key_at, at(warped, kept))
        redrawn = jax.vmap(
            lambda key, r: jax.random.categorical(jax.random.fold_in(key, RESIDUAL), jnp.log(r))
        )(key_at, residual)
        own = jnp.where(is_greedy, at(greedy, kept), jnp.where(rejected, redrawn, plain))
        return kept, own.astype(jnp.int32)

    kept, own = jax.lax.cond(jnp.all(state.temperature == 0.0), all_greedy, with_draws, None)

    j = jnp.arange(k1)[None, :]
    tokens = jnp.where(j < kept[:, None], guess, jnp.where(j == kept[:, None], own[:, None], 0))
    logprobs = log_probs_of(logits, tokens[..., None])[..., 0]
    return kept + 1, tokens, jnp.where(j <= kept[:, None], logprobs, 0.0)
