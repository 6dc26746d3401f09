"""Token selection on device, per slot: `SamplingState` (each slot's settings as arrays) and
`sample`. The host-side parameters a request asks for, `SamplingParams`, live in the JAX-free
sampling_params.py (re-exported here for existing importers).

Order of operations follows HF transformers: repetition penalty, then temperature, then top-k,
top-p and min-p, then a draw. Temperature 0 is greedy (argmax of the penalized logits). Each filter
becomes a logit threshold; a token tied with the threshold is kept. The draw for the token at
absolute position p of a request uses the key fold_in(seed, p), so a seed reproduces its output
whatever else shares the batch. Log-probs are those of the model's own distribution
(log_softmax of the raw logits), which is what scoring and evals need.

Structured output: a row's allowed-token bitmask (`allowed`, int32 [B, ceil(V/32)], from
runtime/grammar.py) sets the logits of every other token to -inf before anything else, so the
penalty, filters, draw and log-probs all see the constrained distribution: a token's log-prob is
its probability among the tokens the grammar allows (renormalized), as vLLM reports it, and the
top alternatives are tokens that could have been chosen (fewer than asked when fewer are allowed:
the rest come back as -inf). A row without a grammar passes all ones and is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime.sampling_params import SamplingParams

__all__ = [
    "SamplingState",
    "allowed_tokens",
    "argmax",
    "draw_keys",
    "filter_logits",
    "log_probs_of",
    "penalize",
    "sample",
    "warp",
]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingState:
    """Per-slot sampler settings on device; every field is [S] (seed_words [S, 2])."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    seed_words: jax.Array  # uint32 [S, 2]: the 64-bit seed as a threefry key
    n_top: jax.Array  # int32: top alternatives wanted (0: none)

    @staticmethod
    def zeros(slots: int) -> SamplingState:
        f = lambda v: np.full((slots,), v, np.float32)
        return SamplingState(
            temperature=f(0.0),
            top_k=np.zeros((slots,), np.int32),
            top_p=f(1.0),
            min_p=f(0.0),
            repetition_penalty=f(1.0),
            seed_words=np.zeros((slots, 2), np.uint32),
            n_top=np.zeros((slots,), np.int32),
        )

    @staticmethod
    def of(params: SamplingParams, seed: int) -> SamplingState:
        """One row for `params`; `seed` replaces params.seed when that is None."""
        top_k = 0 if params.top_k < 0 else params.top_k
        return SamplingState(
            temperature=np.float32([params.temperature]),
            top_k=np.int32([min(top_k, 2**31 - 1)]),
            top_p=np.float32([params.top_p]),
            min_p=np.float32([params.min_p]),
            repetition_penalty=np.float32([params.repetition_penalty]),
            seed_words=np.array([[seed >> 32, seed & 0xFFFFFFFF]], np.uint32),
            n_top=np.int32([params.logprobs or 0]),
        )


def allowed_tokens(words, vocab: int):
    """Bitmask words [B, W] int32 -> bool [B, vocab]: bit t % 32 of word t // 32 (W * 32 ≥ vocab)."""
    bits = jnp.right_shift(words[:, :, None], jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab].astype(bool)


def sample(logits, state: SamplingState, seen, positions, *, max_top: int, allowed=None):
    """Choose one token per row.

    logits [B, V] float32; seen [B, V] bool (tokens the repetition penalty applies to); positions [B]
    (absolute position of the token being chosen); allowed: None, or int32 [B, ceil(V/32)] bitmasks
    of the tokens each row may choose (structured output). Returns tokens [B] int32, their log-probs
    [B], and the top `max_top` (ids [B, max_top], log-probs [B, max_top]) of the raw (or, with
    `allowed`, the constrained) distribution.
    """
    if allowed is not None:
        logits = jnp.where(allowed_tokens(allowed, logits.shape[-1]), logits, -jnp.inf)
    penalized = lambda: penalize(logits, seen, state.repetition_penalty)
    # the penalty writes a [B, V] copy of the logits: skipped when no row has one
    greedy_tokens = jax.lax.cond(
        jnp.any(state.repetition_penalty != 1.0), lambda: argmax(penalized()), lambda: argmax(logits)
    )
    is_greedy = state.temperature == 0.0

    def draw(_):
        drawn = jax.vmap(jax.random.categorical)(draw_keys(state, positions), warp(penalized(), state))
        return jnp.where(is_greedy, greedy_tokens, drawn.astype(jnp.int32))

    tokens = jax.lax.cond(jnp.all(is_greedy), lambda _: greedy_tokens, draw, None)
    chosen = log_probs_of(logits, tokens[:, None])[:, 0]
    if max_top == 0:
        b = logits.shape[0]
        return tokens, chosen, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.float32)

    def top(_):
        lp, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), max_top)
        return ids.astype(jnp.int32), lp

    def none(_):
        b = logits.shape[0]
        return jnp.zeros((b, max_top), jnp.int32), jnp.zeros((b, max_top), jnp.float32)

    top_ids, top_lps = jax.lax.cond(jnp.any(state.n_top > 0), top, none, None)
    return tokens, chosen, top_ids, top_lps


# argmax's first pass reduces blocks of this many logits (a vocabulary is padded up to a multiple).
_ARGMAX_BLOCK = 128


def argmax(x):
    """jnp.argmax(x, axis=-1) as int32, the same index in every case: the first maximum, or the
    first NaN where a row has one. x [..., V].

    XLA:CPU lowers argmax to a reduction over (value, index) pairs that does not vectorize: 9.7 ms
    of a 64-row decode step over a 49k vocabulary. Here each block of 128 is reduced plainly to its
    maximum; the answer is the argmax within the first block holding the row's maximum (~1 ms).
    That needs no NaN anywhere (XLA:CPU's vectorized max does not propagate NaN): a block's sum is
    NaN if the block holds one (or holds both infinities, or overflows both ways), and then the
    whole call takes jnp.argmax itself. Other backends take jnp.argmax always: it is fast there, and
    reduces a vocabulary split over devices without gathering it (the block read here would).
    """
    if jax.default_backend() != "cpu":
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    *lead, v = x.shape
    pad = -v % _ARGMAX_BLOCK
    if pad:  # -inf after the last token never comes first among equals
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)], constant_values=-jnp.inf)
    blocks = x.reshape(*lead, -1, _ARGMAX_BLOCK)

    def plain(blocks):
        return jnp.argmax(blocks.reshape(*lead, -1), axis=-1).astype(jnp.int32)

    odd = jnp.any(jnp.isnan(jnp.sum(blocks, axis=-1)))
    return jax.lax.cond(odd, plain, _argmax_by_blocks, blocks)


def _argmax_by_blocks(blocks):
    """argmax over the last two axes of blocks [..., N, block] of NaN-free values, flattened."""
    first = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    within = jnp.take_along_axis(blocks, first[..., None, None], axis=-2)[..., 0, :]
    return (first * blocks.shape[-1] + jnp.argmax(within, axis=-1)).astype(jnp.int32)


def log_probs_of(logits, tokens):
    """jax.nn.log_softmax(logits)[..., tokens] by the same arithmetic ((x - max) - log Σ exp(x - max)),
    without writing the [..., V] log-probs out: logits [..., V], tokens int [..., K] -> [..., K]."""
    m = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)
    lse = jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True))
    return (jnp.take_along_axis(logits, tokens, axis=-1) - m) - lse


def penalize(logits, seen, penalty):
    """HF's repetition penalty: logits [B, V] of the `seen` tokens divided (if > 0) or multiplied by
    the row's penalty [B]."""
    penalty = penalty[:, None]
    return jnp.where(
        seen & (penalty != 1.0), jnp.where(logits > 0, logits / penalty, logits * penalty), logits
    )


def warp(penalized, state: SamplingState):
    """The logits a sampled row draws from: temperature, then top-k / top-p / min-p (-inf outside).
    Greedy rows (temperature 0) pass through unscaled."""
    x = penalized / jnp.where(state.temperature == 0.0, 1.0, state.temperature)[:, None]
    return filter_logits(x, state.top_k, state.top_p, state.min_p)


def draw_keys(state: SamplingState, positions):
    """The key of each row's draw for the token at absolute position `positions` [B]."""
    return jax.vmap(lambda w, p: jax.random.fold_in(jax.random.wrap_key_data(w), p))(
        state.seed_words, positions
    )


def _order_key(x):
    """uint32 keys with the same order as the float32 values x (so thresholds can be bisected)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_threshold(key, enough):
    """Per row, the largest uint32 t with enough(key >= t) true; `enough` must be monotone (true for
    t = 0). 32 halvings of [0, 2^32 - 1] find it exactly. key [B, V] -> [B]."""
    b = key.shape[0]

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        ok = enough(key >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(
        0, 32, halve, (jnp.zeros((b,), jnp.uint32), jnp.full((b,), 2**32 - 1, jnp.uint32))
    )
    return lo


def filter_logits(x, top_k, top_p, min_p):
    """Set to -inf every logit below the row's top-k / top-p / min-p threshold. x [B, V].

    Thresholds are found by bisection over the values' order keys rather than by sorting the
    vocabulary (XLA:CPU sorts 8 x 49k logits in ~70 ms; the bisection takes ~2 ms), and are exact:
    top-k keeps the values ≥ the k-th largest; top-p keeps the values ≥ the largest t whose
    {x ≥ t} holds at least top_p of the (top-k-filtered) probability mass.
    """

    def filtered(x):
        key = _order_key(x)
        k = jnp.where(top_k > 0, top_k, 1)
        thr_k = _largest_threshold(key, lambda keep: jnp.sum(keep, axis=-1) >= k)
        thr_k = jnp.where(top_k > 0, thr_k, 0)
        probs = jax.nn.softmax(jnp.where(key >= thr_k[:, None], x, -jnp.inf), axis=-1)
        thr_p = _largest_threshold(key, lambda keep: jnp.sum(jnp.where(keep, probs, 0.0), axis=-1) >= top_p)
        thr = jnp.maximum(thr_k, jnp.where(top_p < 1.0, thr_p, 0))
        thr_m = jnp.max(x, axis=-1) + jnp.log(jnp.maximum(min_p, 1e-30))
        keep = (key >= thr[:, None]) & ((min_p <= 0.0)[:, None] | (x >= thr_m[:, None]))
        return jnp.where(keep, x, -jnp.inf)

    needed = jnp.any((top_k > 0) | (top_p < 1.0) | (min_p > 0.0))
    return jax.lax.cond(needed, filtered, lambda x: x, x)
