"""What a draft head reads from its target: the hidden state before the final norm, and the target's
frozen way from such a state to logits (final norm, then lm_head).

The final RMSNorm cannot be undone (it divides each state by its own RMS), so `features` asks
`decoder.forward` for the states before it (`features=True`: the same flag the engine's decode and
verify programs set for a draft head), over whole sequences at once. Each sequence's K/V is one page
of a cache of its own (page size T, all layers: a 512-token SmolLM2 sequence is ~23 MB in
float32), so the attention is the dense one-block path.
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
from xlaserve.runtime.attention import KVCache
from xlaserve.runtime.config import XLA_KERNELS, ModelConfig
from xlaserve.runtime.models import decoder
from xlaserve.runtime.models.layers import rms_norm
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
    b, t = tokens.shape
    spec = models.kv_spec(cfg)
    zeros = jnp.zeros((spec.num_layers, b, t, spec.num_kv_heads, spec.head_dim), dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    pages = jnp.arange(b, dtype=jnp.int32)[:, None]  # sequence b is page b of a cache of its own
    _, _, x = decoder.forward(
        weights,
        KVCache(zeros, zeros),
        tokens,
        positions,
        positions < lengths[:, None],
        pages,
        lengths,
        cfg=cfg,
        block=t,
        dtype=dtype,
        style=style_of(cfg),
        features=True,
    )
    return x
