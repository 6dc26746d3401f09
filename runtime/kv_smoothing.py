"""Key smoothing for a quantized KV cache: per (layer, kv head, channel) divisors for the keys.

An 8-bit cache keeps one scale per token and head, so a head's largest channel sets the step for
all of them. Some models have a few key channels far larger than the rest in every token (Qwen2.5's
k bias: in layer 0 of the 0.5B model two rotary pairs have RMS ~140 against a median of 7), and
int8 then rounds the small channels to a few levels: measured on Qwen2.5-Coder-0.5B, the mean
log-prob moved by 0.38 nats a token, all of it from the keys (the values alone: 0.01).

So keys are stored divided by s[layer, head, channel] and queries multiplied by it: q.k is unchanged
in exact arithmetic, and the stored keys have channels of similar size. s is each rotary pair's RMS
over the keys of a calibration text (both channels of a pair get one divisor, so the rotation
commutes with it), over the median pair's, measured once at start-up in full precision. It is
fixed for the engine's life (deterministic: the same text gives the same s), as the smoothing
scales of SmoothQuant are. A model without such channels gets s near 1 and loses nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime.attention import KVCache

TOKENS = 256  # calibration tokens (a multiple of 16: the Pallas prefill kernel's query block)
FLOOR = 0.05  # a divisor never below 1/20 of the median: a near-zero channel stays near zero


def calibration_tokens(vocab_size: int, tokens=None) -> np.ndarray:
    """The calibration text's ids cut or cycled to TOKENS; without a text, seeded random ids."""
    if tokens is None or len(tokens) == 0:
        return np.random.default_rng(0).integers(0, vocab_size, TOKENS).astype(np.int32)
    return np.resize(np.asarray(tokens, np.int32), TOKENS)


def pair_divisors(keys: np.ndarray) -> np.ndarray:
    """keys [L, T, H, D] -> s [L, H, D] float32: each rotary pair's (channels c and c + D/2, the
    rotate-half layout) RMS over T, over the median pair's, at least FLOOR."""
    rms = np.sqrt(np.mean(np.square(keys.astype(np.float64)), axis=1))  # [L, H, D]
    half = keys.shape[-1] // 2
    pair = np.sqrt((rms[..., :half] ** 2 + rms[..., half:] ** 2) / 2)
    pair = pair / np.maximum(np.median(pair, axis=-1, keepdims=True), 1e-30)
    return np.concatenate([pair, pair], axis=-1).clip(FLOOR).astype(np.float32)


def measure(st, weights, smooth_shape, tokens: np.ndarray, page_size: int) -> np.ndarray:
    """Run the model over `tokens` once into a small full-precision cache (of the engine's dtype)
    and return the key divisors s [L, H, D] (`smooth_shape`)."""
    n = len(tokens)
    pages = -(-n // page_size)
    layers, heads, head_dim = smooth_shape
    shape = (layers, pages, page_size, heads, head_dim)
    dtype = jnp.dtype(st.dtype)

    @jax.jit
    def keys(weights, tokens):
        cache = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        positions = jnp.arange(n, dtype=jnp.int32)[None]
        table = jnp.arange(pages, dtype=jnp.int32)[None]
        valid = jnp.ones((1, n), bool)
        kv_len, block = jnp.asarray([n], jnp.int32), pages * page_size
        _, cache = st.forward(weights, cache, tokens[None], positions, valid, table, kv_len, block)
        return cache.k.reshape(shape[0], pages * page_size, *shape[3:])[:, :n]

    return pair_divisors(np.asarray(jax.device_get(keys(weights, jnp.asarray(tokens))), np.float32))
