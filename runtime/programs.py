"""The device programs: module-level pure functions, jitted once per shape, cache donated.

- `prefill`: one prompt chunk [T] of one sequence; writes its K/V, samples the next token.
- `prefill_batch`: one chunk of each of several sequences [R, T] in one call, each row as `prefill`.
- `prefill_packed`: chunks of several sequences as one stream of tokens [N] (no padding per chunk).
- `score`: one chunk of each of several sequences [B, T]; log-probs of the given next tokens.
- `score_packed`: `score`'s work over chunks packed as `prefill_packed`'s.
- `insert`: put a prefilled sequence into a decode slot.
- `decode`: advance every slot by `steps` tokens.
- `verify`: speculative decoding's step: score each slot's token and K guesses, keep what agrees.
- `free`: retire a slot.

The model is reached through `Statics` (its config names the family: `Statics.forward`,
`Statics.logits`), so these programs serve every family. Results leave the device as one int32
array per call ("packed"): for each row
[token, bitcast(logprob), top ids (N), bitcast(top logprobs) (N)], so the host copies once
(read on the host as results.Sampled).
`prefill`, `score` and `decode` also return, last, the real tokens routed to each expert in each
layer int32 [L, E] (E = 0 for a dense model): the engine sums them (`Engine.routed_tokens`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime import models
from xlaserve.runtime.attention import KVCache
from xlaserve.runtime.config import XLA_KERNELS, Kernels, ModelConfig
from xlaserve.runtime.sampling import SamplingState, argmax, log_probs_of, sample
from xlaserve.runtime.speculative import accept


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DecodeState:
    """Everything the decode program keeps per slot (S slots, V vocab)."""

    tokens: jax.Array  # [S] int32: the next input token (last one sampled)
    lengths: jax.Array  # [S] int32: tokens already in the cache = position of `tokens`
    active: jax.Array  # [S] bool
    sampling: SamplingState  # [S] each
    seen: jax.Array  # [S, V] bool: tokens the repetition penalty applies to

    @staticmethod
    def zeros(slots: int, vocab: int) -> DecodeState:
        return DecodeState(
            tokens=np.zeros((slots,), np.int32),
            lengths=np.zeros((slots,), np.int32),
            active=np.zeros((slots,), bool),
            sampling=SamplingState.zeros(slots),
            seen=np.zeros((slots, vocab), bool),
        )


@dataclass(frozen=True)
class Statics:
    """Compile-time constants shared by the programs (hashable: part of the jit cache key)."""

    cfg: ModelConfig
    block: int
    dtype: str
    max_top: int
    kernels: Kernels = XLA_KERNELS

    @property
    def family(self) -> models.Family:
        """The model family running `cfg`: its forward and logits."""
        return models.of(self.cfg)

    def forward(
        self, weights, cache, tokens, positions, valid, page_table, kv_len, block=None, routed=False, **kw
    ):
        """The family's forward; kw: `features=True` (the shared decoder's only) adds the states
        before the final norm."""
        return self.family.forward(
            weights,
            cache,
            tokens,
            positions,
            valid,
            page_table,
            kv_len,
            cfg=self.cfg,
            block=self.block if block is None else block,
            dtype=self.dtype,
            kernels=self.kernels,
            routed=routed,
            **kw,
        )

    def logits(self, weights, hidden):
        return self.family.logits(weights, hidden, self.kernels, self.cfg)


def pack(tokens, logprobs, top_ids, top_lps):
    """[R] tokens, [R] logprobs, [R, N] ids, [R, N] logprobs -> int32 [R, 2 + 2N]."""
    as_int = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.concatenate(
        [tokens[:, None], as_int(logprobs)[:, None], top_ids, as_int(top_lps)], axis=-1
    ).astype(jnp.int32)


def _prefill_hidden(weights, cache, tokens, start, n_valid, page_row, st: Statics):
    """The decoder over one chunk [T] of one sequence: hidden states [T, D], the cache and the
    tokens routed per layer and expert [L, E]."""
    idx = jnp.arange(tokens.shape[0])
    hidden, cache, routed = st.forward(
        weights,
        cache,
        tokens[None, :],
        (start + idx)[None, :],
        (idx < n_valid)[None, :],
        page_row[None, :],
        (start + n_valid)[None],
        routed=True,
    )
    return hidden[0], cache, routed


def prefill(
    weights,
    cache: KVCache,
    tokens,
    start,
    n_valid,
    page_row,
    sampling,
    presence,
    allowed=None,
    *,
    st: Statics,
    all_logits: bool = False,
):
    """One chunk of one prompt.

    tokens [T] (padded); start: tokens of this sequence already cached; n_valid: real tokens in the
    chunk; page_row [W]; sampling: a 1-row SamplingState; presence [V] bool: the prompt's tokens
    (for the repetition penalty); allowed: None, or the grammar's bitmask int32 [ceil(V/32)] for the
    token sampled (the masked variant, a program of its own). Returns (cache, packed [1, C]) and,
    with all_logits, the float32 logits of every chunk position [T, V]; then routed [L, E].
    """
    hidden, cache, routed = _prefill_hidden(weights, cache, tokens, start, n_valid, page_row, st)
    last = jax.lax.dynamic_index_in_dim(hidden, n_valid - 1, keepdims=True)  # [1, D]
    mask = None if allowed is None else allowed[None, :]
    result = _sample_rows(weights, last, sampling, presence[None, :], (start + n_valid)[None], st, mask)
    if all_logits:
        return cache, result, st.logits(weights, hidden), routed
    return cache, result, routed


def prefill_batch(
    weights, cache: KVCache, tokens, start, n_valid, page_rows, sampling, presence, *, st: Statics
):
    """One chunk of each of R sequences in one call, each row doing `prefill`'s work: tokens [R, T]
    (padded); start, n_valid [R] (a row with n_valid 0 is padding: it writes nothing and its result
    is junk); page_rows [R, W]; sampling: an R-row SamplingState; presence [R, V] bool. Returns
    (cache, packed [R, C], routed [L, E]): row r's token sampled after its last real token (the
    first output token when the chunk ends its prompt; otherwise unread)."""
    idx = jnp.arange(tokens.shape[1])
    hidden, cache, routed = st.forward(
        weights,
        cache,
        tokens,
        start[:, None] + idx,
        idx[None, :] < n_valid[:, None],
        page_rows,
        start + n_valid,
        routed=True,
    )
    last = jnp.take_along_axis(hidden, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
    return cache, _sample_rows(weights, last, sampling, presence, start + n_valid, st), routed


def prefill_packed(
    weights, cache: KVCache, tokens, positions, seq_of, count, page_rows, last, sampling, presence, *, st
):
    """Chunks of R sequences packed back to back, each token a row of its own (prefill_calls.Packed):
    tokens, positions, seq_of [N] (token i is at positions[i] of sequence seq_of[i]); the first
    `count` are real, the rest padding (they write nothing); page_rows [R, W]; last [R]: the index of
    each sequence's last token, whose next token is sampled (sampling R rows, presence [R, V]).
    Each layer writes every token's K/V before any token attends, so a token sees the tokens before
    it in its own chunk. Returns (cache, packed [R, C], routed [L, E]), as `prefill_batch`."""
    hidden, cache, routed = _packed_hidden(weights, cache, tokens, positions, seq_of, count, page_rows, st)
    return cache, _sample_rows(weights, hidden[last], sampling, presence, positions[last] + 1, st), routed


def _packed_hidden(weights, cache, tokens, positions, seq_of, count, page_rows, st: Statics):
    """The decoder over packed tokens (`prefill_packed`): hidden states [N, D], cache, routed."""
    valid = jnp.arange(tokens.shape[0]) < count
    hidden, cache, routed = st.forward(
        weights,
        cache,
        tokens[:, None],
        positions[:, None],
        valid[:, None],
        page_rows[seq_of],
        jnp.where(valid, positions + 1, 0),
        routed=True,
    )
    return hidden[:, 0], cache, routed


def _sample_rows(weights, hidden, sampling, presence, count, st: Statics, allowed=None):
    """The packed token sampled from each row's hidden state [R, D] (its logits: st.logits)."""
    return pack(
        *sample(st.logits(weights, hidden), sampling, presence, count, max_top=st.max_top, allowed=allowed)
    )


def score(weights, cache: KVCache, tokens, start, n_valid, page_rows, targets, sel=None, *, st: Statics):
    """One chunk of each of B sequences being scored, in one call: for each row b, position i and
    candidate k, the log-probability of targets[b, i, k] as the token at position start[b] + i + 1
    and whether it is the argmax. Candidate 0 is the row's own next token; the others are other
    continuations of the same prefix, read from the same logits (LLM.score shares one row among
    requests that differ only in their last token). tokens [B, T], targets [B, T, K] (padded);
    start, n_valid [B] (a row with n_valid 0 is padding: it writes nothing); page_rows [B, W].
    sel: None, or int32 [B, S]: the only positions scored (the `score_few` variant; targets then
    [B, S, K]): the logits of every position cost a [T, V] matmul per row, often more than the rest
    of the model, when a multiple-choice row scores a handful of them.
    Returns (cache, int32 [B, T or S, K, 2]: bitcast log-prob, is-greedy, routed [L, E])."""
    idx = jnp.arange(tokens.shape[1])
    hidden, cache, routed = st.forward(
        weights,
        cache,
        tokens,
        start[:, None] + idx,
        idx[None, :] < n_valid[:, None],
        page_rows,
        start + n_valid,
        routed=True,
    )
    if sel is not None:
        hidden = jnp.take_along_axis(hidden, sel[..., None], axis=1)  # [B, S, D]
    return cache, _scores(st.logits(weights, hidden), targets), routed


def score_packed(weights, cache: KVCache, tokens, positions, seq_of, count, page_rows, sel, targets, *, st):
    """`score` over chunks packed back to back, as `prefill_packed` takes them (tokens, positions,
    seq_of [N], count, page_rows [R, W]): sel [S] the tokens whose logits are read (pad with any
    index), targets [S, K] the candidates scored there. Returns (cache, int32 [S, K, 2], routed)."""
    hidden, cache, routed = _packed_hidden(weights, cache, tokens, positions, seq_of, count, page_rows, st)
    return cache, _scores(st.logits(weights, hidden[sel]), targets), routed


def _scores(lg, targets):
    """logits [..., V], targets [..., K] -> int32 [..., K, 2]: bitcast log-prob, is-greedy."""
    lp = log_probs_of(lg, targets)
    greedy = argmax(lg)[..., None] == targets
    return jnp.stack([jax.lax.bitcast_convert_type(lp, jnp.int32), greedy.astype(jnp.int32)], axis=-1)


def insert(state: DecodeState, slot, packed, row, length, sampling: SamplingState, presence) -> DecodeState:
    """Slot `slot` takes a sequence of `length` cached tokens whose next token is packed[row, 0]
    (packed [R, C]: a prefill's result, one row per prefilled chunk)."""
    put = lambda arr, new: jax.lax.dynamic_update_index_in_dim(arr, new.astype(arr.dtype), slot, 0)
    return DecodeState(
        tokens=put(state.tokens, jax.lax.dynamic_index_in_dim(packed[:, 0], row)),
        lengths=put(state.lengths, jnp.reshape(length, (1,))),
        active=put(state.active, jnp.ones((1,), bool)),
        sampling=jax.tree.map(put, state.sampling, sampling),
        seen=put(state.seen, presence[None, :]),
    )


def copy_page(cache: KVCache, src, dst) -> KVCache:
    """Page `dst` takes page `src`'s K/V (and their scales) in every layer: a prefix shared within a
    page (runtime/pages.py), which the new owner then writes past."""
    move = lambda a: jax.lax.dynamic_update_index_in_dim(a, jax.lax.dynamic_index_in_dim(a, src, 1), dst, 1)
    per_page = {f: getattr(cache, f) for f in ("k", "v", "k_scale", "v_scale")}
    return dataclasses.replace(cache, **{f: move(a) for f, a in per_page.items() if a is not None})


def free(state: DecodeState, slot) -> DecodeState:
    active = jax.lax.dynamic_update_index_in_dim(state.active, jnp.zeros((1,), bool), slot, 0)
    return dataclasses.replace(state, active=active)


def decode(
    weights,
    cache: KVCache,
    state: DecodeState,
    page_table,
    allowed=None,
    *,
    st: Statics,
    steps: int,
    kv_pages: int,
    rows: int,
    with_logits: bool = False,
    features: bool = False,
):
    """Advance the active slots among the first `rows` by `steps` tokens (slots ≥ rows must be
    idle). page_table [S, W] must already hold pages for positions lengths .. lengths + steps - 1,
    all within the first `kv_pages` pages (the KV-length bucket this program attends over densely).
    allowed: None, or the slots' grammar bitmasks int32 [S, ceil(V/32)] (all ones for a slot without
    one): the masked variant, one step only (the host must see each token before the next mask).
    Returns (cache, state, packed [steps, rows, C]) and, with_logits, the float32 logits
    [steps, rows, V] each token was drawn from; with `features` (an engine for a draft head), the
    target's states before the final norm at each step's input position, float32 [steps, rows, D];
    then the active slots' tokens routed [L, E]."""
    assert allowed is None or steps == 1, "a grammar mask holds for one step"
    full = state
    state = jax.tree.map(lambda a: a[:rows], state)
    page_table = page_table[:rows, :kv_pages]
    allowed = None if allowed is None else allowed[:rows]
    block = kv_pages * cache.page_size
    idx = jnp.arange(rows)

    def step(i, carry):
        cache, state, out, all_logits, feats, routed = carry
        pos, active = state.lengths, state.active
        seen = state.seen.at[idx, state.tokens].set(True)
        hidden, cache, counts, *pre = st.forward(
            weights,
            cache,
            state.tokens[:, None],
            pos[:, None],
            active[:, None],
            page_table,
            jnp.where(active, pos + 1, 0),
            block,
            routed=True,
            **({"features": True} if features else {}),
        )
        lg = st.logits(weights, hidden[:, 0])
        tokens, *rest = sample(lg, state.sampling, seen, pos + 1, max_top=st.max_top, allowed=allowed)
        out = out.at[i].set(pack(tokens, *rest))
        if with_logits:
            all_logits = all_logits.at[i].set(lg)
        if features:
            feats = feats.at[i].set(pre[0][:, 0].astype(jnp.float32))
        state = dataclasses.replace(
            state,
            tokens=jnp.where(active, tokens, state.tokens),
            lengths=jnp.where(active, pos + 1, pos),
            seen=seen,
        )
        return cache, state, out, all_logits, feats, routed + counts

    out = jnp.zeros((steps, rows, 2 + 2 * st.max_top), jnp.int32)
    all_logits = jnp.zeros((steps, rows, st.cfg.vocab_size) if with_logits else (0,), jnp.float32)
    feats = jnp.zeros((steps, rows, st.cfg.hidden_size) if features else (0,), jnp.float32)
    routed = jnp.zeros((st.cfg.num_layers, st.cfg.num_experts), jnp.int32)
    carry = (cache, state, out, all_logits, feats, routed)
    cache, state, out, all_logits, feats, routed = jax.lax.fori_loop(0, steps, step, carry)
    state = jax.tree.map(
        lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part, 0, 0), full, state
    )
    extra = ((all_logits,) if with_logits else ()) + ((feats,) if features else ())
    return cache, state, out, *extra, routed


def verify(
    weights,
    cache: KVCache,
    state: DecodeState,
    page_table,
    proposed,
    n_proposed,
    *,
    st: Statics,
    kv_pages: int,
    rows: int,
    features: bool = False,
):
    """One speculative step for the active slots among the first `rows` (slots ≥ rows must be idle).

    proposed [S, K] int32: each slot's guesses for the tokens after its current one; n_proposed [S]
    int32 in [0, K]: how many are real (0: the slot runs exactly one plain decode step). The decoder
    runs over the current token and the guesses at positions lengths .. lengths + K (guesses past
    n_proposed are padding: not valid, so their K/V is never written); `accept` keeps the agreeing
    prefix and adds the target's own token. lengths advance by the tokens emitted, so the K/V of
    rejected guesses lies beyond them: invisible, and overwritten later (the rollback). page_table
    [S, W] must hold pages for positions lengths .. lengths + n_proposed, within the first
    `kv_pages` (the KV bucket: lengths + n_proposed + 1 <= kv_pages * page_size).
    Returns (cache, state, packed int32 [rows, 1 + (K+1) C]: the count emitted (0 for an idle
    slot), then one `pack` row per position, C = 2 + 2 max_top; see `Verified`), with `features`
    the target's states before the final norm at every position run, float32 [rows, K+1, D] (the
    host keeps the first `emitted`: those of rejected guesses are discarded), then routed [L, E]
    (every valid position's tokens, rejected guesses included: load the experts carried)."""
    full = state
    state = jax.tree.map(lambda a: a[:rows], state)
    page_table, proposed = page_table[:rows, :kv_pages], proposed[:rows]
    active, pos = state.active, state.lengths
    n = jnp.where(active, n_proposed[:rows], 0)
    k1 = proposed.shape[1] + 1
    j = jnp.arange(k1)[None, :]
    seen = state.seen.at[jnp.arange(rows), state.tokens].set(True)  # as decode: the input counts
    hidden, cache, routed, *pre = st.forward(
        weights,
        cache,
        jnp.concatenate([state.tokens[:, None], proposed], axis=1),
        pos[:, None] + j,
        active[:, None] & (j <= n[:, None]),
        page_table,
        jnp.where(active, pos + n + 1, 0),
        kv_pages * cache.page_size,
        routed=True,
        **({"features": True} if features else {}),
    )
    lg = st.logits(weights, hidden)  # [rows, K+1, V] float32
    emitted, tokens, logprobs = accept(lg, proposed, n, state.sampling, seen, pos + 1)
    emitted = jnp.where(active, emitted, 0)

    def top(_):
        lp, ids = jax.lax.top_k(jax.nn.log_softmax(lg, axis=-1), st.max_top)
        return ids.astype(jnp.int32), lp

    def none(_):
        return jnp.zeros((rows, k1, st.max_top), jnp.int32), jnp.zeros((rows, k1, st.max_top), jnp.float32)

    # as `sample`: the top alternatives only when some slot asked for them
    wanted = jnp.any(state.sampling.n_top > 0) if st.max_top else False
    top_ids, top_lps = jax.lax.cond(wanted, top, none, None)
    flat = lambda a: a.reshape(rows * k1, *a.shape[2:])
    out = pack(flat(tokens), flat(logprobs), flat(top_ids), flat(top_lps)).reshape(rows, -1)
    # the penalty counts the emitted tokens but the last, which (as in decode) joins at the next
    # step; positions not counted scatter to index V and are dropped
    counted = jnp.where(j < emitted[:, None] - 1, tokens, st.cfg.vocab_size)
    last = jnp.take_along_axis(tokens, jnp.maximum(emitted - 1, 0)[:, None], axis=1)[:, 0]
    state = dataclasses.replace(
        state,
        tokens=jnp.where(active, last, state.tokens),
        lengths=pos + emitted,
        seen=seen.at[jnp.arange(rows)[:, None], counted].set(True, mode="drop"),
    )
    state = jax.tree.map(
        lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part, 0, 0), full, state
    )
    packed = jnp.concatenate([emitted[:, None], out], axis=1)
    return cache, state, packed, *[p.astype(jnp.float32) for p in pre], routed
