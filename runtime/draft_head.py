"""An EAGLE-style draft head (Li et al. 2024, "EAGLE: speculative sampling requires rethinking
feature uncertainty"): a proposer that reads the target model's own features.

One step: the target's feature f_t [D] (its last hidden state before the final norm at position t,
`draft_features.features`) and the embedding of the token x_{t+1} (the target's own table, frozen)
are concatenated, mapped 2D -> D by `fc`, and one decoder layer of the target family's shape (its
own small weights: pre-norm attention with GQA and RoPE, gated feed-forward) predicts f_{t+1}. The
target's frozen final norm and lm_head turn that into logits for x_{t+2}.

A proposal is a chain of K steps (`chain`): step 0 reads the target's real feature f_p and the token
x_{p+1}; step j > 0 reads the feature step j-1 predicted and the token it guessed. The layer's
attention spans the chain only (its K steps, RoPE at their absolute positions): the head keeps no
cache over the context, which reaches it through the target's feature. Training unrolls the same
chain on the head's own predicted features (runtime/draft_train.py), so it learns what it runs.

Departures from EAGLE-1's code, and why: its features are the target's post-norm states and its
head attends over the whole context with a KV cache of its own; here the features are pre-norm (the
final norm is applied to the prediction) and the context enters through f_p alone, so the runner
needs nothing from the head but its parameters. `fc` starts as [identity | small]: an untrained
head predicts f_{t+1} = f_t plus noise, a better start than noise alone.

Dimension letters: R rows (independent chains), C chain slots (K), D hidden, F ffn, V vocab,
H kv heads, G query heads per kv head, Kd head dim.
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
    """One chain step (see the module docstring); parameters float32."""

    cfg: HeadConfig

    @nn.compact
    def __call__(self, feat, emb, pos, cache, j):
        """feat, emb [R, D]: the input feature and the input token's embedding; pos [R] int32: the
        step's absolute position; cache (k, v) [R, C, H, Kd]: the chain's keys and values, steps
        < j filled; j: this step's index (< C). Returns (predicted feature [R, D] float32, cache
        with step j's key and value)."""
        c = self.cfg
        r = feat.shape[0]
        h, g, kd = c.kv_heads, c.heads // c.kv_heads, c.head_dim
        init = nn.initializers.normal(INIT_STD)
        dense = lambda n, name, bias=False: nn.Dense(n, use_bias=bias, kernel_init=init, name=name)
        unit = nn.initializers.constant(1.0 - c.norm_offset)  # a norm that starts as the identity
        norm = lambda x, name, n=c.hidden: rms_norm(x, self.param(name, unit, (n,)), c.eps, c.norm_offset)

        x = nn.Dense(c.hidden, kernel_init=_fc_init, name="fc")(
            jnp.concatenate([feat.astype(jnp.float32), emb.astype(jnp.float32)], axis=-1)
        )
        y = norm(x, "attn_norm")
        q = dense(h * g * kd, "wq", c.qkv_bias)(y).reshape(r, 1, h, g, kd)
        k = dense(h * kd, "wk", c.qkv_bias)(y).reshape(r, 1, h, kd)
        v = dense(h * kd, "wv", c.qkv_bias)(y).reshape(r, h, kd)
        if c.qk_norm:
            q, k = norm(q, "q_norm", kd), norm(k, "k_norm", kd)
        inv_freq = jnp.asarray(c.inv_freq, jnp.float32)
        q, k = rope(q, pos[:, None], inv_freq)[:, 0], rope(k, pos[:, None], inv_freq)[:, 0]
        ks, vs = cache
        ks = jax.lax.dynamic_update_index_in_dim(ks, k, j, axis=1)
        vs = jax.lax.dynamic_update_index_in_dim(vs, v, j, axis=1)
        s = jnp.einsum("rhgd,rchd->rhgc", q, ks, precision=jax.lax.Precision.HIGHEST) * c.scale
        s = jnp.where(jnp.arange(ks.shape[1]) <= j, s, -jnp.inf)  # the chain's steps so far
        o = jnp.einsum("rhgc,rchd->rhgd", jax.nn.softmax(s, axis=-1), vs, precision=jax.lax.Precision.HIGHEST)
        x = x + dense(c.hidden, "wo")(o.reshape(r, h * g * kd))
        y = norm(x, "mlp_norm")
        act = decoder.ACTIVATIONS[c.act]
        x = x + dense(c.hidden, "w_down")(act(dense(c.ffn, "w_gate")(y)) * dense(c.ffn, "w_up")(y))
        return x, (ks, vs)


def empty_cache(cfg: HeadConfig, rows: int, k: int):
    """The chain's keys and values before its first step: (k, v) [R, C, H, Kd] float32 zeros."""
    zeros = jnp.zeros((rows, k, cfg.kv_heads, cfg.head_dim), jnp.float32)
    return zeros, zeros


def init_params(cfg: ModelConfig, seed: int = 0):
    """Fresh head parameters for a target of config `cfg` (a nested dict of float32 arrays)."""
    hc = HeadConfig.of(cfg)
    d = hc.hidden
    zeros = jnp.zeros((1, d), jnp.float32)
    return DraftHead(hc).init(
        jax.random.key(seed), zeros, zeros, jnp.zeros((1,), jnp.int32), empty_cache(hc, 1, 1), 0
    )


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k={k!r}: the draft head's chain length must be an integer in [1, {MAX_K}]")


def chain(params, target, feat, token, pos, *, cfg: ModelConfig, k: int, forced=None):
    """Run k chain steps for R rows from the target's feature feat [R, D] at position p, the token
    token [R] at position p+1 and pos [R] = p+1. forced: None (step j > 0 reads the token step j-1
    guessed: inference) or int32 [R, k] (step j reads forced[:, j]: teacher-forced tokens, with
    forced[:, 0] == token). target: the target's weights (embed, final_norm, lm_head are read).
    Returns (predicted features [R, k, D] float32, logits [R, k, V] float32): step j predicts the
    feature at position p+1+j and the logits for the token at p+2+j."""
    check_k(k)
    hc = HeadConfig.of(cfg)
    model = DraftHead(hc)
    cache = empty_cache(hc, feat.shape[0], k)
    feats, logits = [], []
    for j in range(k):  # k is small and static: unrolled
        emb = draft_features.embed(target, token, cfg)
        feat, cache = model.apply(params, feat, emb, pos + j, cache, j)
        lg = draft_features.final_logits(target, feat, cfg)
        feats.append(feat)
        logits.append(lg)
        if j + 1 < k:
            token = forced[:, j + 1] if forced is not None else jnp.argmax(lg, axis=-1).astype(jnp.int32)
    return jnp.stack(feats, axis=1), jnp.stack(logits, axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "k"))
def propose(params, target, feature, token, position, *, cfg: ModelConfig, k: int):
    """k greedy guesses per row for speculative decoding: what the runner calls to fill verify's
    `proposed` (runtime/programs.py).

    feature [R, D]: the target's hidden state before its final norm (`draft_features.features`) at
    each row's last accepted position p, the position whose logits chose `token`; token [R] int32:
    that token, at position p+1 (DecodeState.tokens: the token verify scores first); position [R]
    int32: p+1 (DecodeState.lengths). target: the target's weights as the engine holds them (only
    embed, final_norm and lm_head are read); params: a trained head's (checkpoints/draft_head.py),
    trained for this target. Returns int32 [R, k]: the guesses for positions p+2 .. p+k+1. Rows are
    independent; an idle row's guesses are garbage that verify's n_proposed = 0 ignores."""
    _, logits = chain(params, target, feature, token, position, cfg=cfg, k=k)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
