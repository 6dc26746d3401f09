"""Grouped matmul in Pallas (Triton style), megablox's problem: rows of lhs [M, K] sorted by group,
rhs [G, N, K] one matrix per group stored [out, in] as our matrices are, and

    out[r] = lhs[r] @ rhs[g]^T   for start[g] <= r < start[g] + group_sizes[g],  0 past sum(sizes)

(jax.lax.ragged_dot's result, with rhs transposed), float32 [M, N]. rhs is dense (float) or
quantized in the packed layouts `quantized_matmul.py` documents, as plain arrays: data [G, N, K]
int8 or [G, N, K / 2] uint8 nibbles, scale (and mins) [G, N, K / block]. Dequantization happens in
the tile, in registers (`quantized_matmul.tile_product`, the same float32 operations as
`dequantize_reference`); products accumulate in float32.

Tiling: grid (M / bm, N / bn), one program per output tile, so every element is written exactly
once and no tile is revisited (Triton has no scalar prefetch and no dynamic grid). A program loops
over the groups whose rows meet its tile (their range per tile is computed by XLA beforehand, a
searchsorted over the group ends), each group over all of K, and keeps the rows of that group:
a tile straddling j group boundaries costs j + 1 tile products, megablox's count. An empty group
runs no K-steps; a tile past sum(sizes) runs none and writes zeros. The groups and tiles come in
as small int32 arrays read with scalar loads; W is passed whole along G and the group's tile is
loaded with a dynamic index (pointer arithmetic: nothing is copied). Loads are powers of two
(bm, bn ≥ 16, Triton's smallest dot).

`grouped_matmul_reference` is the pure-jnp reference: every group's product, rows kept by group.
The TPU kernel is tpu_grouped_matmul.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .quantized_matmul import _largest_pow2_divisor, dequantize_reference, split_x, tile_product


def unsupported(n: int, k: int, kind: str | None, block: int | None, has_mins: bool) -> str | None:
    """Why the kernel cannot take rhs [G, N, K] (None: it can)."""
    if n % 16:
        return f"{n} output rows (a multiple of 16)"
    per_channel = kind == "q8_0" and block == k and not has_mins
    if kind is not None and not per_channel and block & (block - 1):
        return f"group size {block} (a power of two)"
    least = 16 if kind is None or per_channel else max(block, 32)
    if k % least:
        return f"{k} input columns (a multiple of {least})"
    return None


def tile_groups(group_sizes, m: int, bm: int):
    """Group row offsets [G + 1] and, per row tile of bm rows, the first and the last group whose
    rows may meet it ([2, ceil(M / bm)] int32; last < first for a tile past every group)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    first_rows = jnp.arange(0, m, bm, dtype=jnp.int32)
    first = jnp.searchsorted(ends, first_rows, side="right")  # the group holding each tile's first row
    last = jnp.searchsorted(ends, first_rows + bm - 1, side="right")
    last = jnp.minimum(last, group_sizes.shape[0] - 1)  # rows past sum(sizes) belong to no group
    return offsets, jnp.stack([first, last]).astype(jnp.int32)


def _grouped_kernel(
    offsets_ref,
    tiles_ref,
    x_lo_ref,
    x_hi_ref,
    w_ref,
    d_ref,
    m_ref,
    o_ref,
    *,
    kind,
    cols,
    groups,
    k_tiles,
    per_channel,
    with_mins,
):
    """One output tile [bm, bn]. x_lo/x_hi [bm, K or K/2]; w [G, bn, stored K]; d, m [G, bn, K/block]."""
    i = pl.program_id(0)
    bm, bn = o_ref.shape
    rows = i * bm + jnp.arange(bm)

    def one_group(g, out):
        start, end = offsets_ref[g], offsets_ref[g + 1]

        def step(t, acc):
            span, gspan = pl.ds(t * cols, cols), pl.ds(t * groups, groups)
            d = None if per_channel or kind is None else d_ref[g, :, gspan]
            m = m_ref[g, :, gspan] if with_mins else None
            x_hi = x_hi_ref[:, span] if kind not in (None, "q8_0") else None
            return acc + tile_product(x_lo_ref[:, span], x_hi, w_ref[g, :, span], d, m, kind)

        steps = jnp.where(end > start, k_tiles, 0)  # an empty group costs no K-steps
        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
        if per_channel:
            acc = acc * d_ref[g].astype(jnp.float32)[:, 0][None, :]
        return jnp.where(((rows >= start) & (rows < end))[:, None], acc, out)

    first, last = tiles_ref[0, i], tiles_ref[1, i]
    o_ref[...] = jax.lax.fori_loop(
        first, jnp.maximum(first, last + 1), one_group, jnp.zeros((bm, bn), jnp.float32)
    )


@functools.partial(jax.jit, static_argnames=("kind", "block", "interpret", "block_m", "block_n", "block_k"))
def grouped_matmul(
    lhs,
    rhs,
    group_sizes,
    scale=None,
    mins=None,
    *,
    kind: str | None = None,
    block: int | None = None,
    interpret: bool | None = None,
    block_m: int = 64,
    block_n: int | None = None,
    block_k: int | None = None,
):
    """lhs [M, K] (rows sorted by group) times group g's rhs [N, K]^T for its rows -> [M, N] float32.
    kind None: rhs [G, N, K] float. Else rhs is the packed data of `kind` ("q8_0", "q4_0", "q4_1")
    in groups of `block` along K with scale and mins ([G, N, K / block]; mins: q4_1's or asymmetric
    int8's, else None); int8 with block == K and no mins is per channel."""
    m, k = lhs.shape
    g, n = rhs.shape[:2]
    four_bit = kind not in (None, "q8_0")
    assert rhs.shape[2] * (2 if four_bit else 1) == k and group_sizes.shape == (g,), (lhs.shape, rhs.shape)
    per_channel = kind == "q8_0" and block == k and mins is None
    group = block if kind is not None and not per_channel else None
    least = 16 if group is None else max(group, 32)
    bk = block_k or _largest_pow2_divisor(k, 64 if kind is None else 256, least)
    bn = block_n or _largest_pow2_divisor(n, 128, 16)
    if group and bk % group:
        raise ValueError(f"block_k={bk} must be a multiple of the group size {group}")
    bm = 16 if m <= 16 else block_m
    mp = -(-m // bm) * bm
    x_lo, x_hi = split_x(jnp.pad(lhs, ((0, mp - m), (0, 0))), kind, block)
    offsets, tiles = tile_groups(group_sizes, mp, bm)
    if scale is None:  # dense: placeholders the kernel never reads
        scale = jnp.zeros((g, n, 1), jnp.float32)
    with_mins = mins is not None and kind in ("q8_0", "q4_1")
    mins = mins if mins is not None else scale[..., :1]
    kernel = functools.partial(
        _grouped_kernel,
        kind=kind,
        cols=bk // 2 if four_bit else bk,
        groups=bk // group if group else 1,
        k_tiles=k // bk,
        per_channel=per_channel,
        with_mins=with_mins,
    )
    full = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
    rows_of = lambda a: pl.BlockSpec((bm, a.shape[1]), lambda i, j: (i, 0))
    cols_of = lambda a: pl.BlockSpec((g, bn, a.shape[2]), lambda i, j: (0, j, 0))
    out = pl.pallas_call(
        kernel,
        grid=(mp // bm, n // bn),
        in_specs=[
            full(offsets),
            full(tiles),
            rows_of(x_lo),
            rows_of(x_hi),
            cols_of(rhs),
            cols_of(scale),
            cols_of(mins),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
        interpret=jax.default_backend() == "cpu" if interpret is None else interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
    )(offsets, tiles, x_lo, x_hi, rhs, scale, mins)
    return out[:m]


def dequantize_experts(rhs, scale=None, mins=None, *, kind: str | None = None, block: int | None = None):
    """rhs [G, N, K] float32 (dense rhs as it is, quantized rhs dequantized exactly)."""
    if kind is None:
        return rhs.astype(jnp.float32)
    g, n = rhs.shape[:2]
    flat = lambda a: None if a is None else a.reshape(g * n, a.shape[2])
    return dequantize_reference(flat(rhs), flat(scale), flat(mins), kind=kind, block=block).reshape(g, n, -1)


def grouped_matmul_reference(lhs, rhs, group_sizes, scale=None, mins=None, *, kind=None, block=None):
    """Every group's float32 product at HIGHEST precision, each row keeping its group's (zeros past
    sum(sizes)); same arguments as `grouped_matmul`."""
    w = dequantize_experts(rhs, scale, mins, kind=kind, block=block)
    every = jnp.einsum("mk,gnk->gmn", lhs.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")  # G past sum(sizes)
    keep = row_group[None, :] == jnp.arange(w.shape[0])[:, None]  # [G, M]
    return jnp.where(keep[..., None], every, 0.0).sum(0)
