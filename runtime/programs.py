"""The device programs: module-level pure functions, jitted once per shape, cache donated.

- `prefill`: one prompt chunk [T] of one sequence; writes its K/V, samples the next token.
- `score`: one chunk of each of several sequences [B, T]; log-probs of the given next tokens.
- `insert`: put a prefilled sequence into a decode slot.
- `decode`: advance every slot by `steps` tokens.
- `free`: retire a slot.

The model is reached through `Statics` (its config names the family: `Statics.forward`,
`Statics.logits`), so these programs serve every family. Results leave the device as one int32
array per call ("packed"): for each row
[token, bitcast(logprob), top ids (N), bitcast(top logprobs) (N)], so the host copies once.
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
from xlaserve.runtime.sampling import SamplingState, sample


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

    def forward(self, weights, cache, tokens, positions, valid, page_table, kv_len, block=None):
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
        )

    def logits(self, weights, hidden):
        return self.family.logits(weights, hidden, self.kernels, self.cfg)


def pack(tokens, logprobs, top_ids, top_lps):
    """[R] tokens, [R] logprobs, [R, N] ids, [R, N] logprobs -> int32 [R, 2 + 2N]."""
    as_int = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.concatenate(
        [tokens[:, None], as_int(logprobs)[:, None], top_ids, as_int(top_lps)], axis=-1
    ).astype(jnp.int32)


@dataclass(frozen=True)
class Sampled:
    """Host view of packed results; leading dims [...] as packed (e.g. [steps, slots])."""

    tokens: np.ndarray  # [...] int32
    logprobs: np.ndarray  # [...] float32
    top_ids: np.ndarray  # [..., N] int32
    top_logprobs: np.ndarray  # [..., N] float32

    @staticmethod
    def unpack(packed: np.ndarray) -> Sampled:
        packed = np.asarray(packed, np.int32)
        n = (packed.shape[-1] - 2) // 2
        return Sampled(
            tokens=packed[..., 0],
            logprobs=packed[..., 1].view(np.float32),
            top_ids=packed[..., 2 : 2 + n],
            top_logprobs=packed[..., 2 + n :].view(np.float32),
        )


def _prefill_hidden(weights, cache, tokens, start, n_valid, page_row, st: Statics):
    """The decoder over one chunk [T] of one sequence: hidden states [T, D] and the cache."""
    idx = jnp.arange(tokens.shape[0])
    hidden, cache = st.forward(
        weights,
        cache,
        tokens[None, :],
        (start + idx)[None, :],
        (idx < n_valid)[None, :],
        page_row[None, :],
        (start + n_valid)[None],
    )
    return hidden[0], cache


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
    with all_logits, the float32 logits of every chunk position [T, V].
    """
    hidden, cache = _prefill_hidden(weights, cache, tokens, start, n_valid, page_row, st)
    last = jax.lax.dynamic_index_in_dim(hidden, n_valid - 1, keepdims=True)  # [1, D]
    lg = st.logits(weights, last)
    mask = None if allowed is None else allowed[None, :]
    result = pack(
        *sample(lg, sampling, presence[None, :], (start + n_valid)[None], max_top=st.max_top, allowed=mask)
    )
    if all_logits:
        return cache, result, st.logits(weights, hidden)
    return cache, result


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
    Returns (cache, int32 [B, T or S, K, 2]: bitcast log-prob, is-greedy)."""
    idx = jnp.arange(tokens.shape[1])
    hidden, cache = st.forward(
        weights,
        cache,
        tokens,
        start[:, None] + idx,
        idx[None, :] < n_valid[:, None],
        page_rows,
        start + n_valid,
    )
    if sel is not None:
        hidden = jnp.take_along_axis(hidden, sel[..., None], axis=1)  # [B, S, D]
    lg = st.logits(weights, hidden)  # [B, T or S, V]
    lp = jnp.take_along_axis(jax.nn.log_softmax(lg, axis=-1), targets, axis=-1)  # [B, T, K]
    greedy = jnp.argmax(lg, axis=-1)[..., None] == targets
    return cache, jnp.stack([jax.lax.bitcast_convert_type(lp, jnp.int32), greedy.astype(jnp.int32)], axis=-1)


def insert(state: DecodeState, slot, packed, length, sampling: SamplingState, presence) -> DecodeState:
    """Slot `slot` takes a sequence of `length` cached tokens whose next token is packed[0, 0]."""
    put = lambda arr, row: jax.lax.dynamic_update_index_in_dim(arr, row.astype(arr.dtype), slot, 0)
    return DecodeState(
        tokens=put(state.tokens, packed[0, :1]),
        lengths=put(state.lengths, jnp.reshape(length, (1,))),
        active=put(state.active, jnp.ones((1,), bool)),
        sampling=jax.tree.map(put, state.sampling, sampling),
        seen=put(state.seen, presence[None, :]),
    )


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
):
    """Advance the active slots among the first `rows` by `steps` tokens (slots ≥ rows must be
    idle). page_table [S, W] must already hold pages for positions lengths .. lengths + steps - 1,
    all within the first `kv_pages` pages (the KV-length bucket this program attends over densely).
    allowed: None, or the slots' grammar bitmasks int32 [S, ceil(V/32)] (all ones for a slot without
    one): the masked variant, one step only (the host must see each token before the next mask).
    Returns (cache, state, packed [steps, rows, C]) and, with_logits, the float32 logits
    [steps, rows, V] each token was drawn from."""
    assert allowed is None or steps == 1, "a grammar mask holds for one step"
    full = state
    state = jax.tree.map(lambda a: a[:rows], state)
    page_table = page_table[:rows, :kv_pages]
    allowed = None if allowed is None else allowed[:rows]
    block = kv_pages * cache.page_size
    idx = jnp.arange(rows)

    def step(i, carry):
        cache, state, out, all_logits = carry
        pos, active = state.lengths, state.active
        seen = state.seen.at[idx, state.tokens].set(True)
        hidden, cache = st.forward(
            weights,
            cache,
            state.tokens[:, None],
            pos[:, None],
            active[:, None],
            page_table,
            jnp.where(active, pos + 1, 0),
            block,
        )
        lg = st.logits(weights, hidden[:, 0])
        tokens, *rest = sample(lg, state.sampling, seen, pos + 1, max_top=st.max_top, allowed=allowed)
        out = out.at[i].set(pack(tokens, *rest))
        if with_logits:
            all_logits = all_logits.at[i].set(lg)
        state = dataclasses.replace(
            state,
            tokens=jnp.where(active, tokens, state.tokens),
            lengths=jnp.where(active, pos + 1, pos),
            seen=seen,
        )
        return cache, state, out, all_logits

    out = jnp.zeros((steps, rows, 2 + 2 * st.max_top), jnp.int32)
    all_logits = jnp.zeros((steps, rows, st.cfg.vocab_size) if with_logits else (0,), jnp.float32)
    cache, state, out, all_logits = jax.lax.fori_loop(0, steps, step, (cache, state, out, all_logits))
    state = jax.tree.map(
        lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part, 0, 0), full, state
    )
    if with_logits:
        return cache, state, out, all_logits
    return cache, state, out
