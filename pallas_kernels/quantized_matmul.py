"""Weight-only quantized matmul in Pallas (Triton style): y[M, N] = x[M, K] @ dequant(W)^T, with its
pure-jnp reference and the 4-bit pack/unpack helpers.

W [N, K] comes as plain arrays (data, scale, min) plus its static kind and block, in the packed
layout of `runtime/quant.py`'s QuantArray (this file imports nothing of the project):
  - int8 ("q8_0"): data int8 [N, K], scale [N, K / g] with g = block (16, 32, or K for per-channel),
    w = d * q, or w = d * q + m when mins are given (asymmetric int8: GGUF's Q5_1, Q2_K, Q5_K);
  - 4-bit ("q4_0", "q4_1"), groups of g ∈ {32, 64, 128}: data uint8 [N, K / 2] where byte j of a
    group holds element j in its low nibble and element j + g/2 in its high nibble (GGUF's order for
    g = 32); w = d * (q - 8) (q4_0) or d * q + m (q4_1; an AWQ/GPTQ zero point z is m = -d * z).
Dequantization happens in registers, in the same float32 operations as `dequantize_reference`;
products accumulate in float32. For 4-bit weights x is split outside the kernel (a free reshape)
into the halves of each group that meet the low and the high nibbles, so the kernel never
interleaves nibbles along K (Triton can only join on the minor axis).

Tilings: decode (M ≤ 16, padded to 16, Triton's smallest dot) runs grid (N / bn, splits) over
K-splits, partial sums added by XLA; prefill (larger M) runs grid (M / bm, N / bn) over all of K.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def pack_int4(q: np.ndarray, group: int) -> np.ndarray:
    """Unsigned 4-bit values [N, K] (0..15) -> bytes [N, K / 2] in the half-group layout."""
    n, k = q.shape
    g = q.reshape(n, k // group, group).astype(np.uint8)
    return (g[..., : group // 2] | (g[..., group // 2 :] << 4)).reshape(n, k // 2)


def unpack_int4(packed, group: int):
    """Inverse of pack_int4 (numpy or jax arrays)."""
    xp = np if isinstance(packed, np.ndarray) else jnp
    n, half = packed.shape
    b = packed.reshape(n, half * 2 // group, group // 2)
    return xp.concatenate([b & 0x0F, b >> 4], axis=-1).reshape(n, half * 2)


def _largest_pow2_divisor(n: int, cap: int, least: int) -> int:
    best = least
    while best * 2 <= cap and n % (best * 2) == 0:
        best *= 2
    if n % best:
        raise ValueError(f"dimension {n} is not a multiple of {least}")
    return best


def split_x(x, kind: str | None, group: int):
    """x [M, K] -> (x_lo, x_hi): for 4-bit kinds the halves of each group of K that meet the low and
    the high nibbles, each [M, K / 2] (a free reshape); else (x, x[:, :1]) (x_hi unused)."""
    if kind in (None, "q8_0"):
        return x, x[:, :1]
    m, k = x.shape
    xg = x.reshape(m, k // group, group)
    return xg[..., : group // 2].reshape(m, k // 2), xg[..., group // 2 :].reshape(m, k // 2)


def tile_product(x_lo, x_hi, w, d, m, kind: str | None):
    """One K-tile's products [bm, bn] in float32: x parts [bm, c] times the stored weight tile
    w [bn, c] dequantized in registers with its scales d and mins m [bn, c / columns per group]
    (d None: per channel, scaled by the caller; m None: no mins), in the float32 operations of
    `dequantize_reference`. kind None: w is a dense float tile."""
    dot = lambda a, b: jnp.dot(a, b.astype(a.dtype).T, preferred_element_type=jnp.float32)
    if kind is None:
        return dot(x_lo, w)
    bn, cols = w.shape

    def expand(s):  # [bn, groups] -> [bn, cols]
        groups = s.shape[1]
        s = s.astype(jnp.float32)
        return jnp.broadcast_to(s[:, :, None], (bn, groups, cols // groups)).reshape(bn, cols)

    if kind == "q8_0":
        w = w.astype(jnp.float32)
        w = w if d is None else w * expand(d)
        return dot(x_lo, w if m is None else w + expand(m))
    lo, hi, d = (w & 0x0F).astype(jnp.float32), (w >> 4).astype(jnp.float32), expand(d)
    if kind == "q4_0":
        lo, hi = d * (lo - 8.0), d * (hi - 8.0)
    else:
        m = expand(m)
        lo, hi = d * lo + m, d * hi + m
    return dot(x_lo, lo) + dot(x_hi, hi)


def _kernel(
    x_lo_ref,
    x_hi_ref,
    w_ref,
    d_ref,
    m_ref,
    o_ref,
    *,
    kind: str,
    group: int,
    bk: int,
    tiles_per_split: int,
    per_channel: bool,
    asym: bool,
):
    """One (rows, cols, split) program. For 4-bit kinds x_lo/x_hi are [bm, K/2]; for int8 x_hi is
    unused and x_lo is x [bm, K]."""
    split = pl.program_id(2)
    four_bit = kind != "q8_0"
    cols = bk // 2 if four_bit else bk  # stored bytes of W per tile along K
    groups = bk // group if not per_channel else 1

    def body(t, acc):
        span, gspan = pl.ds(t * cols, cols), pl.ds(t * groups, groups)
        d = None if per_channel else d_ref[:, gspan]
        m = m_ref[:, gspan] if asym or kind == "q4_1" else None
        x_hi = x_hi_ref[:, span] if four_bit else None
        return acc + tile_product(x_lo_ref[:, span], x_hi, w_ref[:, span], d, m, kind)

    first = split * tiles_per_split
    acc = jax.lax.fori_loop(
        first, first + tiles_per_split, body, jnp.zeros((x_lo_ref.shape[0], w_ref.shape[0]), jnp.float32)
    )
    if per_channel:
        acc = acc * d_ref[...].astype(jnp.float32)[:, 0][None, :]
    o_ref[...] = acc


@functools.partial(
    jax.jit, static_argnames=("kind", "block", "interpret", "splits", "block_n", "block_k", "block_m")
)
def quantized_matmul(
    x,
    data,
    scale,
    mins,
    *,
    kind: str,
    block: int,
    interpret: bool | None = None,
    splits: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    block_m: int = 64,
):
    """x [M, K] @ dequant(W)^T -> [M, N] float32, W given as (data, scale, mins) of `kind` in
    groups of `block` (mins: q4_1's, or asymmetric int8's; else None). Decode tiling when M ≤ 16,
    prefill tiling above."""
    m, k = x.shape
    four_bit = kind != "q8_0"
    n, k_w = data.shape[0], data.shape[1] * (2 if four_bit else 1)
    assert k == k_w, (x.shape, data.shape, kind)
    asym = not four_bit and mins is not None
    per_channel = not four_bit and block == k and not asym  # one scale per row: applied at the end
    group = k if per_channel else block
    bk = block_k or _largest_pow2_divisor(k, 256, 32 if per_channel else max(group, 32))
    bn = block_n or _largest_pow2_divisor(n, 128, 16)
    if not per_channel and bk % group:
        raise ValueError(f"block_k={bk} must be a multiple of the group size {group}")
    k_tiles = k // bk
    decode = m <= 16
    bm = 16 if decode else block_m
    mp = -(-m // bm) * bm
    if decode:
        want = splits or max(1, min(k_tiles, 256 // max(1, n // bn)))
        splits = max(s for s in range(1, want + 1) if k_tiles % s == 0)
    else:
        splits = 1
    x_lo, x_hi = split_x(jnp.pad(x, ((0, mp - m), (0, 0))), kind, group)
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    kernel = functools.partial(
        _kernel,
        kind=kind,
        group=group,
        bk=bk,
        tiles_per_split=k_tiles // splits,
        per_channel=per_channel,
        asym=asym,
    )
    mins = mins if mins is not None else scale[:, :1]
    whole_k = lambda a: pl.BlockSpec((bm, a.shape[1]), lambda i, j, s: (i, 0))
    rows_of = lambda a: pl.BlockSpec((bn, a.shape[1]), lambda i, j, s: (j, 0))
    out = pl.pallas_call(
        kernel,
        grid=(mp // bm, n // bn, splits),
        in_specs=[whole_k(x_lo), whole_k(x_hi), rows_of(data), rows_of(scale), rows_of(mins)],
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32),
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
    )(x_lo, x_hi, data, scale, mins)
    return out.sum(axis=0)[:m]


def dequantize_reference(data, scale, mins, *, kind: str, block: int):
    """W [N, K] float32 from its packed blocks, with the gguf.quants arithmetic."""
    n = data.shape[0]
    q = data if kind == "q8_0" else unpack_int4(data, block)
    q = q.reshape(n, -1, block).astype(jnp.float32)
    d = scale.astype(jnp.float32)[..., None]
    if kind == "q4_0":
        return (d * (q - 8.0)).reshape(n, -1)
    w = q * d  # q8_0 (symmetric when mins is None) or q4_1
    return (w if mins is None else w + mins.astype(jnp.float32)[..., None]).reshape(n, -1)


def quantized_matmul_reference(x, data, scale, mins, *, kind: str, block: int):
    """float32 x @ dequant(W)^T at HIGHEST precision."""
    w = dequantize_reference(data, scale, mins, kind=kind, block=block)
    return jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
