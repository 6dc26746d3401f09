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
    return rotate(x, *rope_angles(positions, inv_freq))


def rope_angles(positions, inv_freq):
    """(cos, sin) float32 [..., B, T, K/2] of positions [B, T] at inverse frequencies [..., K/2]:
    one table per leading index of inv_freq (per distinct RoPE of a model's layers)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[..., None, None, :]
    return jnp.cos(freqs), jnp.sin(freqs)


def rotate(x, cos, sin):
    """Rotate-half RoPE of x [B, T, ..., K] by the angles' cos and sin [B, T, K/2] (`rope_angles`).
    A forward pass computes them once for all its layers: inside a layer, XLA fuses the
    broadcast cos and sin into the rotation and evaluates them again for every head (~5 ms of a
    64-row SmolLM2 decode step)."""
    shape = (*cos.shape[:2], *(1,) * (x.ndim - 3), cos.shape[-1])
    cos, sin = cos.reshape(shape).astype(x.dtype), sin.reshape(shape).astype(x.dtype)
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
