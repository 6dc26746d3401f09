"""What a draft head reads from its target: the hidden state before the final norm, and the target's
frozen way from such a state to logits (final norm, then lm_head).

`decoder.forward` returns hidden states after the final RMSNorm, and that norm cannot be undone (it
divides each state by its own RMS). So `features` runs the layers `decoder.forward` runs, built
from the same pieces (norms, RoPE, `paged_attention`, the one matmul entry point, the MoE block),
over whole sequences at once, and stops before the final norm. Each sequence's K/V is one page of
its own (page size T), so the attention is the dense one-block path the engine's decode takes.
`final_logits(features)` equals the engine's logits for the same tokens
(tests/test_draft_features.py checks it against `Engine.prefill_with_logits` and `decoder.forward`).

Dimension letters: B sequences, T tokens, D hidden, V vocab, H kv heads, G query heads per kv head,
K head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from xlaserve.runtime import models
from xlaserve.runtime.attention import KVCache, paged_attention
from xlaserve.runtime.config import XLA_KERNELS, ModelConfig
from xlaserve.runtime.models import decoder
from xlaserve.runtime.models import moe as moe_ffn
from xlaserve.runtime.models.layers import matmul, rms_norm, rope
from xlaserve.runtime.quant import take_rows


def style_of(cfg: ModelConfig) -> decoder.Style:
    """The shared decoder's style (norm offset, embedding scale) `cfg`'s family runs it with; a
    family with a forward of its own is refused (its features would not be these)."""
    forward = models.of(cfg).forward
    if getattr(forward, "func", forward) is not decoder.forward:
        raise ValueError(
            f"architecture={cfg.architecture!r}: a draft head reads the features of the shared decoder "
            "(runtime/models/decoder.py); this family runs a forward of its own"
        )
    return getattr(forward, "keywords", {}).get("style", decoder.Style())


def embed(weights: decoder.Weights, tokens, cfg: ModelConfig, dtype=jnp.float32):
    """The target's input embedding of tokens [...] -> [..., D], as its forward computes it."""
    x = take_rows(weights.embed, tokens, dtype)
    if style_of(cfg).embed_scale:
        x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)
    return x


def final_logits(weights: decoder.Weights, feats, cfg: ModelConfig):
    """Pre-norm features [..., D] -> float32 logits [..., V]: the target's final norm and lm_head."""
    hidden = rms_norm(feats, weights.final_norm, cfg.rms_norm_eps, style_of(cfg).norm_offset)
    return decoder.logits(weights, hidden, XLA_KERNELS, cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def features(weights: decoder.Weights, tokens, lengths, *, cfg: ModelConfig, dtype: str = "float32"):
    """tokens [B, T] int32 (each row's first lengths[b] are real, from position 0) -> the last
    layer's output before the final norm [B, T, D] in `dtype` (padding positions hold garbage)."""
    style = style_of(cfg)
    b, t = tokens.shape
    h, g, k = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    act = decoder.ACTIVATIONS[cfg.hidden_act]
    scale = None if cfg.query_pre_attn_scalar is None else float(cfg.query_pre_attn_scalar) ** -0.5
    norm = lambda x, w: rms_norm(x, w, cfg.rms_norm_eps, style.norm_offset)
    windows, inv_freqs = decoder.per_layer(cfg)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = positions < lengths[:, None]
    pages = jnp.arange(b, dtype=jnp.int32)[:, None]  # sequence b is page b of a one-layer cache
    mm = matmul(XLA_KERNELS, "layers.")

    def proj(y, w, bias, name, shape):
        out = mm(y, w, name)
        return (out if bias is None else out + bias.astype(out.dtype)).reshape(shape)

    def layer(x, xs):
        w, window, inv_freq = xs
        y = norm(x, w.attn_norm)
        q = proj(y, w.wq, w.bq, "wq", (b, t, h, g, k))
        kk = proj(y, w.wk, w.bk, "wk", (b, t, h, k))
        v = proj(y, w.wv, w.bv, "wv", (b, t, h, k))
        if w.q_norm is not None:
            q, kk = norm(q, w.q_norm), norm(kk, w.k_norm)
        q, kk = rope(q, positions, inv_freq), rope(kk, positions, inv_freq)
        cache = KVCache(kk.astype(dtype)[None], v.astype(dtype)[None])  # [1, B, T, H, K]
        o = paged_attention(
            q,
            cache,
            0,
            pages,
            positions,
            lengths,
            block=t,
            window=window,
            scale=scale,
            softcap=cfg.attn_logit_softcapping,
        )
        o = mm(o.reshape(b, t, h * g * k), w.wo, "wo")
        x = x + (o if w.post_attn_norm is None else norm(o, w.post_attn_norm))
        y = norm(x, w.mlp_norm)
        if w.moe is not None:
            y, _ = moe_ffn.block(y, w.moe, cfg=cfg, kernels=XLA_KERNELS, act=act, mm=mm, valid=valid)
        else:
            y = mm(act(mm(y, w.w_gate, "w_gate")) * mm(y, w.w_up, "w_up"), w.w_down, "w_down")
        return x + (y if w.post_mlp_norm is None else norm(y, w.post_mlp_norm)), None

    x = embed(weights, tokens, cfg, dtype)
    x, _ = jax.lax.scan(layer, x, (weights.layers, jnp.asarray(windows), jnp.asarray(inv_freqs)))
    return x
