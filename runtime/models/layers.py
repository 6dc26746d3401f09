"""Building blocks shared by the families: norms, rotary embeddings, the matmul by weight name.

Dimension letters: B batch, T tokens, D hidden, H kv heads, G query heads per kv head, K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime.config import Kernels
from xlaserve.runtime.quant import linear, linears


def rms_norm(x, weight, eps: float, offset: float = 0.0):
    """RMSNorm over the last axis, times `weight` (Llama) or, with offset 1, times 1 + weight in
    float32 (Gemma), as HF computes each."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return ((offset + weight.astype(jnp.float32)) * y).astype(x.dtype)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope(x, positions, inv_freq: np.ndarray):
    """Rotate-half RoPE. x [B, T, ..., K]; positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, K/2]
    freqs = freqs.reshape(*freqs.shape[:2], *(1,) * (x.ndim - 3), freqs.shape[-1])
    cos, sin = jnp.cos(freqs).astype(x.dtype), jnp.sin(freqs).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def matmul(kernels: Kernels, prefix: str = ""):
    """mm(x, w, name): x @ w^T through the one matmul entry point, with the mesh axes of the
    weight called `prefix + name` (a split input axis ends in an all-reduce)."""
    return lambda x, w, name, **kw: linear(x, w, kernels=kernels, spec=kernels.spec(prefix + name), **kw)


def matmuls(kernels: Kernels, prefix: str = ""):
    """mms(x, ws, names): [x @ w^T for w in ws] of one input x (q, k, v; gate, up), in one native
    kernel call where the matrices allow (`linears`); else as `matmul`'s, each."""
    return lambda x, ws, names: linears(
        x, ws, kernels=kernels, specs=[kernels.spec(prefix + n) for n in names]
    )


def head(weights, hidden, kernels: Kernels) -> jax.Array:
    """float32 logits [..., V] from hidden [..., D]: `lm_head`, or the embedding when tied (None)."""
    tied = weights.lm_head is None
    w = weights.embed if tied else weights.lm_head
    return linear(
        hidden, w, out_dtype=jnp.float32, kernels=kernels, spec=kernels.spec("embed" if tied else "lm_head")
    )
