"""An EAGLE-style draft head (Li et al. 2024, "EAGLE: speculative sampling requires rethinking
feature uncertainty"): a proposer that reads the target model's own features.

One step: the target's feature f_t [D] (its last hidden state before the final norm at position t,
`draft_features.features`) and the embedding of the token x_{t+1} (the target's own table, frozen)
are concatenated, mapped 2D -> D by `fc`, and one decoder layer of the target family's shape (its
own small weights: pre-norm attention with GQA and RoPE, gated feed-forward) predicts f_{t+1}. The
target's frozen final norm and lm_head turn that into logits for x_{t+2}.

A proposal is a chain of K steps (`chain`) after a window of W context positions: the head first
runs over the target's real features f_{p-W+1..p} and the tokens after them (causal attention over
the window, RoPE at the tokens' positions); its output at p is step 0's prediction. Step j > 0
reads the feature step j-1 predicted and the token it guessed, attending to the window and the
chain so far. W = 1 is the last accepted position alone; a larger W lets the head see recent
context (what n-gram lookup copies from) at W more positions of a one-layer cost each. Training
unrolls the same chain on the head's own predicted features (runtime/draft_train.py), so it learns
what it runs.

Departures from EAGLE-1's code, and why: its features are the target's post-norm states and its
head attends over the whole context with a KV cache of its own; here the features are pre-norm (the
final norm is applied to the prediction) and the context is the last W positions, recomputed per
proposal, so the runner keeps the last W features per slot and nothing of the head's. Both inputs
are RMS-normalized before `fc` (as EAGLE-3 does; see `DraftHead`). `fc` starts as [identity |
small]: an untrained head predicts f_{t+1} = f_t (normalized) plus noise, a better start than noise.

Dimension letters: R rows (independent chains), W window, C cache slots (W + K - 1), T positions
in a block, D hidden, F ffn, V vocab, H kv heads, G query heads per kv head, Kd head dim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlaserve.runtime import draft_features, models
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models import decoder
from xlaserve.runtime.models.layers import rms_norm, rope
from xlaserve.runtime.sampling import argmax

INIT_STD = 0.02  # the head's matrices start ~ N(0, 0.02²), as EAGLE's (HF's Llama init)
MAX_K = 16  # the longest chain a head runs: the verify program's guesses are a handful


@dataclass(frozen=True)
class HeadConfig:
    """The head's shapes and arithmetic, all taken from the target's config (hashable: static)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    act: str
    eps: float
    norm_offset: float  # RMSNorm multiplies by (offset + w), as the target's norms do
    qkv_bias: bool
    qk_norm: bool
    scale: float  # attention scale
    inv_freq: tuple[float, ...]  # RoPE inverse frequencies [Kd/2]: the target's global layers'

    @staticmethod
    def of(cfg: ModelConfig) -> HeadConfig:
        layer = models.declare(cfg).layers
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        return HeadConfig(
            hidden=cfg.hidden_size,
            heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            ffn=cfg.intermediate_size,
            act=cfg.hidden_act,
            eps=cfg.rms_norm_eps,
            norm_offset=draft_features.style_of(cfg).norm_offset,
            qkv_bias=layer.bq is not None,
            qk_norm=layer.q_norm is not None,
            scale=float(scalar) ** -0.5,
            inv_freq=tuple(float(f) for f in cfg.rope.inv_freq(cfg.head_dim)),
        )


def _fc_init(key, shape, dtype):
    """[2D, D] (flax's [in, out]): the feature half the identity, the embedding half small."""
    d = shape[1]
    small = jax.random.normal(key, (d, d), dtype) * INIT_STD
    return jnp.concatenate([jnp.eye(d, dtype=dtype), small], axis=0)


class DraftHead(nn.Module):
    """The head over a block of positions (see the module docstring); parameters float32."""

    cfg: HeadConfig

    @nn.compact
    def __call__(self, feat, emb, pos, cache, start: int, pad):
        """feat, emb [R, T, D]: input features and the embeddings of the tokens after them; pos
        [R, T] int32: the positions of those tokens; cache (k, v) [R, C, H, Kd]: keys and values of
        the slots before `start` (static), where this block's T go; pad [R] int32: each row's
        leading slots that hold no position (never attended). A query attends to the slots from
        pad to its own. Returns (predicted features [R, T, D] float32, in units of the features' RMS:
        the inputs are normalized and the final norm ignores scale), the cache with the block)."""
        c = self.cfg
        r, t = feat.shape[:2]
        h, g, kd = c.kv_heads, c.heads // c.kv_heads, c.head_dim
        init = nn.initializers.normal(INIT_STD)
        dense = lambda n, name, bias=False: nn.Dense(n, use_bias=bias, kernel_init=init, name=name)
        unit = nn.initializers.constant(1.0 - c.norm_offset)  # a norm that starts as the identity
        norm = lambda x, name, n=c.hidden: rms_norm(x, self.param(name, unit, (n,)), c.eps, c.norm_offset)

        # both inputs RMS-normalized first (as EAGLE-3 does): a pre-norm feature's RMS is ~40 with
        # channels in the thousands, an embedding's ~0.05; unnormalized, the token would be lost
        both = [norm(feat.astype(jnp.float32), "feat_norm"), norm(emb.astype(jnp.float32), "emb_norm")]
        x = nn.Dense(c.hidden, kernel_init=_fc_init, name="fc")(jnp.concatenate(both, axis=-1))
        y = norm(x, "attn_norm")
        q = dense(h * g * kd, "wq", c.qkv_bias)(y).reshape(r, t, h, g, kd)
        k = dense(h * kd, "wk", c.qkv_bias)(y).reshape(r, t, h, kd)
        v = dense(h * kd, "wv", c.qkv_bias)(y).reshape(r, t, h, kd)
        if c.qk_norm:
            q, k = norm(q, "q_norm", kd), norm(k, "k_norm", kd)
        inv_freq = jnp.asarray(c.inv_freq, jnp.float32)
        q, k = rope(q, pos, inv_freq), rope(k, pos, inv_freq)
        ks = jax.lax.dynamic_update_slice_in_dim(cache[0], k, start, axis=1)
        vs = jax.lax.dynamic_update_slice_in_dim(cache[1], v, start, axis=1)
        s = jnp.einsum("rthgd,rchd->rthgc", q, ks, precision=jax.lax.Precision.HIGHEST) * c.scale
        slot, own = jnp.arange(ks.shape[1]), start + jnp.arange(t)
        # [R, T, C]: causal over the slots, padding slots hidden (a padding query sees itself)
        seen = (slot[None, None, :] <= own[None, :, None]) & (slot[None, None, :] >= pad[:, None, None])
        seen |= slot[None, None, :] == own[None, :, None]
        s = jnp.where(seen[:, :, None, None, :], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("rthgc,rchd->rthgd", p, vs, precision=jax.lax.Precision.HIGHEST)
        x = x + dense(c.hidden, "wo")(o.reshape(r, t, h * g * kd))
        y = norm(x, "mlp_norm")
        act = decoder.ACTIVATIONS[c.act]
        x = x + dense(c.hidden, "w_down")(act(dense(c.ffn, "w_gate")(y)) * dense(c.ffn, "w_up")(y))
        return x, (ks, vs)


def empty_cache(cfg: HeadConfig, rows: int, slots: int):
    """Keys and values before the first block: (k, v) [R, C, H, Kd] float32 zeros."""
    zeros = jnp.zeros((rows, slots, cfg.kv_heads, cfg.head_dim), jnp.float32)
    return zeros, zeros


def init_params(cfg: ModelConfig, seed: int = 0):
    """Fresh head parameters for a target of config `cfg` (a nested dict of float32 arrays)."""
    hc = HeadConfig.of(cfg)
    zeros = jnp.zeros((1, 1, hc.hidden), jnp.float32)
    one = jnp.zeros((1, 1), jnp.int32)
    return DraftHead(hc).init(jax.random.key(seed), zeros, zeros, one, empty_cache(hc, 1, 1), 0, one[:, 0])


@dataclass(frozen=True)
class Head:
    """A trained head as the engine runs it (checkpoints/draft_head.load gives params and manifest):
    params; window: W, the context positions it was trained to read (manifest settings.window)."""

    params: dict
    window: int


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k={k!r}: the draft head's chain length must be an integer in [1, {MAX_K}]")


def chain(params, target, feats, tokens, pos, *, cfg: ModelConfig, k: int, pad=None, forced=None):
    """Run a chain of k steps for R rows from a window of W context positions ending at p.

    feats [R, W, D]: the target's features at positions p-W+1 .. p; tokens [R, W] int32: the token
    after each (x_{p-W+2} .. x_{p+1}); pos [R] int32: p+1; pad [R] int32: leading window entries
    that are padding (a sequence shorter than the window; default none). Step 0 is the window's
    last position; step j > 0 reads the feature step j-1 predicted and the token after it: the
    guess of step j-1 (forced None: inference) or forced[:, j] (int32 [R, k], forced[:, 0] ==
    tokens[:, -1]: teacher forcing). target: the target's weights (embed, final_norm and lm_head
    are read). Returns (predicted features [R, k, D] float32, logits [R, k, V] float32): step j
    predicts the feature at position p+1+j and the logits for the token at p+2+j."""
    check_k(k)
    hc = HeadConfig.of(cfg)
    model = DraftHead(hc)
    r, w = tokens.shape
    pad = jnp.zeros((r,), jnp.int32) if pad is None else pad
    cache = empty_cache(hc, r, w + k - 1)
    positions = pos[:, None] + jnp.arange(1 - w, 1)[None, :]  # [R, W]: p-W+2 .. p+1
    emb = draft_features.embed(target, tokens, cfg)
    out, cache = model.apply(params, feats, emb, positions, cache, 0, pad)
    feat = out[:, -1]
    predicted, logits = [], []
    for j in range(k):  # k is small and static: unrolled
        lg = draft_features.final_logits(target, feat, cfg)
        predicted.append(feat)
        logits.append(lg)
        if j + 1 < k:
            token = forced[:, j + 1] if forced is not None else argmax(lg)
            emb = draft_features.embed(target, token, cfg)[:, None]
            out, cache = model.apply(params, feat[:, None], emb, (pos + j + 1)[:, None], cache, w + j, pad)
            feat = out[:, 0]
    return jnp.stack(predicted, axis=1), jnp.stack(logits, axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "k"))
def propose(params, target, features, tokens, position, pad=None, *, cfg: ModelConfig, k: int):
    """k greedy guesses per row for speculative decoding: what the runner calls to fill verify's
    `proposed` (runtime/programs.py).

    features [R, W, D]: the target's hidden states before its final norm (`draft_features.features`)
    at each row's last W accepted positions p-W+1 .. p (W: the window the head was trained with,
    `draft_head.json` "settings.window"; W = 1 is the last accepted position alone), oldest first;
    tokens [R, W] int32: the token after each of them, the last being the token at p+1 that p's
    logits chose (DecodeState.tokens: the one verify scores first); position [R] int32: p+1
    (DecodeState.lengths); pad [R] int32: leading window entries a short sequence does not have
    (None: none). target: the target's weights as the engine holds them (only embed, final_norm and
    lm_head are read); params: a head trained for this target (checkpoints/draft_head.py). Returns
    int32 [R, k]: the guesses for positions p+2 .. p+k+1. Rows are independent; an idle row's
    guesses are garbage that verify's n_proposed = 0 ignores."""
    _, logits = chain(params, target, features, tokens, position, cfg=cfg, k=k, pad=pad)
    return argmax(logits)
