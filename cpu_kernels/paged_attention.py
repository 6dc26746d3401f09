"""Attention over the paged KV cache by our C++ kernel (paged_attention.cc) on XLA:CPU.

The same values as runtime/attention.py's XLA path (causal, kv_len, sliding window, softcap; each
query's softmax exact in float32), read where the keys and values lie in their pages rather than
gathered into a copy per layer. Float32 caches only (a quantized or bfloat16 cache takes XLA's path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.cpu_kernels import build


def paged_attention(q, k, v, layer, page_table, q_pos, kv_len, window, *, scale: float, softcap=None):
    """q float32 [B, T, H, G, D]; k, v float32 [L, N, P, H, D]; layer and window int32 scalars;
    page_table int32 [B, W]; q_pos int32 [B, T]; kv_len int32 [B]. Returns float32 [B, T, H, G, D]."""
    build.register()
    if k.dtype != jnp.float32 or v.dtype != jnp.float32 or q.dtype != jnp.float32:
        raise ValueError(f"paged_attention takes float32 q and K/V, got {q.dtype}, {k.dtype}, {v.dtype}")
    i32 = lambda a: jnp.asarray(a, jnp.int32)
    call = jax.ffi.ffi_call(build.ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(
        q,
        k,
        v,
        i32(layer),
        i32(page_table),
        i32(q_pos),
        i32(kv_len),
        i32(window),
        scale=np.float32(scale),
        softcap=np.float32(softcap or 0.0),
    )
