"""Paged attention in Pallas (Triton style): decode with split-K (flash-decoding) and chunked
prefill, each with its pure-jnp reference.

Cache layout (shared with the XLA path): k, v [L, N, P, H, D] (layers, pages, page size, kv heads,
head dim), read for one `layer` given at run time. A program handles one kv head and the G query
heads that share it, padded to `rows` (≥ 16, a power of two: Triton's dot needs M ≥ 16), so each K/V
byte is read once per kv head. Page ids are loaded from the page table and used as a gather index
into the whole pool (pointer arithmetic on GPU; nothing is copied). All loads have power-of-two
shapes. Positions at or past a sequence's length are masked with a finite value and weights of
exactly 0, so an idle slot (length 0) yields zeros, never NaN.

Decode: grid (B, H, S). Split s covers page tiles [s*T/S, (s+1)*T/S) of the table; each writes
(acc, m, l) and a small XLA epilogue combines the splits. Prefill: grid (T/BQ, H); query block i
covers chunk tokens [i*BQ, (i+1)*BQ) at absolute positions start + ..., attends to keys at
positions ≤ its own (the cached prefix and the chunk itself), looping only up to the block's last
position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


def _interpret_default() -> bool:
    return jax.default_backend() == "cpu"


def _softmax_step(carry, q, k, v, visible, scale):
    """One tile of the online softmax. q [R, D]; k, v [T, D]; visible [R, T] or [1, T]."""
    peak, total, acc = carry
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    s = jnp.where(visible, s, MASK_VALUE)
    peak_new = jnp.maximum(peak, jnp.max(s, axis=1))
    p = jnp.where(visible, jnp.exp(s - peak_new[:, None]), 0.0)
    correction = jnp.exp(peak - peak_new)
    total = total * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return peak_new, total, acc


# -- decode ------------------------------------------------------------------------------------------


def _decode_kernel(
    layer_ref,
    lengths_ref,
    table_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    m_ref,
    l_ref,
    *,
    pages_per_tile: int,
    tiles_per_split: int,
    tiles: int,
    scale: float,
):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, length = layer_ref[0], lengths_ref[b]
    rows, d = q_ref.shape
    page = k_ref.shape[2]
    tile = pages_per_tile * page
    q = q_ref[...]
    first = split * tiles_per_split
    last = jnp.minimum(jnp.minimum(first + tiles_per_split, tiles), (length + tile - 1) // tile)

    def body(t, carry):
        pids = table_ref[b, pl.ds(t * pages_per_tile, pages_per_tile)]
        k = k_ref[layer, pids, :, h, :].reshape(tile, d)
        v = v_ref[layer, pids, :, h, :].reshape(tile, d)
        visible = (t * tile + jnp.arange(tile))[None, :] < length
        return _softmax_step(carry, q, k, v, visible, scale)

    init = (
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, d), jnp.float32),
    )
    peak, total, acc = jax.lax.fori_loop(first, jnp.maximum(first, last), body, init)
    o_ref[...] = acc
    m_ref[...] = peak
    l_ref[...] = total


@functools.partial(
    jax.jit, static_argnames=("pages_per_tile", "splits", "interpret", "num_warps", "num_stages")
)
def decode_attention(
    q,
    k,
    v,
    layer,
    lengths,
    page_table,
    *,
    pages_per_tile: int = 4,
    splits: int = 1,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """q [B, H, G, D]; k, v [L, N, P, H, D]; layer int32 scalar; lengths [B] (tokens to attend,
    0 for idle); page_table [B, W] with W a multiple of pages_per_tile.
    Returns [B, H, G, D] in q's dtype."""
    b, h, g, d = q.shape
    width = page_table.shape[1]
    assert width % pages_per_tile == 0, (width, pages_per_tile)
    tiles = width // pages_per_tile  # cut into `splits` runs of ceil(tiles / splits); the last may be short
    rows = _pow2(g)
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    interpret = _interpret_default() if interpret is None else interpret
    kernel = functools.partial(
        _decode_kernel,
        pages_per_tile=pages_per_tile,
        tiles_per_split=-(-tiles // splits),
        tiles=tiles,
        scale=d**-0.5,
    )
    full = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    layer = jnp.reshape(layer, (1,)).astype(jnp.int32)
    acc, peak, total = pl.pallas_call(
        kernel,
        grid=(b, h, splits),
        in_specs=[
            full(layer),
            full(lengths),
            full(page_table),
            pl.BlockSpec((None, None, rows, d), lambda i, j, s: (i, j, 0, 0)),
            full(k),
            full(v),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda i, j, s: (i, j, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, splits, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, h, splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((b, h, splits, rows), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )(layer, lengths.astype(jnp.int32), page_table.astype(jnp.int32), qp, k, v)
    return combine_splits(acc, peak, total)[:, :, :g].astype(q.dtype)


def combine_splits(acc, peak, total):
    """Merge per-split online-softmax states: acc [..., S, R, D], peak/total [..., S, R]."""
    top = jnp.max(peak, axis=-2, keepdims=True)
    w = jnp.where(total > 0, jnp.exp(peak - top), 0.0)  # [..., S, R]
    num = jnp.sum(acc * w[..., None], axis=-3)
    den = jnp.sum(total * w, axis=-2)
    return num / jnp.where(den == 0, 1.0, den)[..., None]


def decode_attention_reference(q, k, v, layer, lengths, page_table):
    """Gather every table page densely and run masked softmax attention (f32, HIGHEST)."""
    b, h, _, d = q.shape
    kk = k[layer][page_table].reshape(b, -1, h, d).astype(jnp.float32)  # [B, S, H, D]
    vv = v[layer][page_table].reshape(b, -1, h, d).astype(jnp.float32)
    s = (
        jnp.einsum("bhgd,bshd->bhgs", q.astype(jnp.float32), kk, precision=jax.lax.Precision.HIGHEST)
        * d**-0.5
    )
    visible = jnp.arange(kk.shape[1])[None, :] < lengths[:, None]
    s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
    p = jnp.nan_to_num(jax.nn.softmax(s, axis=-1))
    return jnp.einsum("bhgs,bshd->bhgd", p, vv, precision=jax.lax.Precision.HIGHEST).astype(q.dtype)


# -- prefill (one chunk of one sequence) -------------------------------------------------------------


def _prefill_kernel(
    layer_ref,
    meta_ref,
    table_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    *,
    block_q: int,
    g_rows: int,
    pages_per_tile: int,
    scale: float,
):
    i, h = pl.program_id(0), pl.program_id(1)
    layer, start, kv_len = layer_ref[0], meta_ref[0], meta_ref[1]
    rows, d = q_ref.shape  # rows = block_q * g_rows
    page = k_ref.shape[2]
    tile = pages_per_tile * page
    q = q_ref[...]
    q_pos = start + i * block_q + jnp.arange(rows) // g_rows  # absolute position of each row's token
    stop = jnp.minimum(kv_len, start + (i + 1) * block_q)  # keys this block can see: positions < stop

    def body(t, carry):
        pids = table_ref[pl.ds(t * pages_per_tile, pages_per_tile)]
        k = k_ref[layer, pids, :, h, :].reshape(tile, d)
        v = v_ref[layer, pids, :, h, :].reshape(tile, d)
        kv_pos = t * tile + jnp.arange(tile)
        visible = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < kv_len)
        return _softmax_step(carry, q, k, v, visible, scale)

    init = (
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, d), jnp.float32),
    )
    _, total, acc = jax.lax.fori_loop(0, (stop + tile - 1) // tile, body, init)
    o_ref[...] = (acc / jnp.where(total == 0, 1.0, total)[:, None]).astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("block_q", "pages_per_tile", "interpret", "num_warps", "num_stages")
)
def prefill_attention(
    q,
    k,
    v,
    layer,
    start,
    kv_len,
    page_row,
    *,
    block_q: int = 16,
    pages_per_tile: int = 4,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """q [T, H, G, D] at positions start .. start+T-1 (T a multiple of block_q; rows past
    kv_len - start are padding); k, v [L, N, P, H, D]; page_row [W] (W a multiple of
    pages_per_tile). Returns [T, H, G, D]: attention over keys at positions ≤ each query's and
    < kv_len."""
    t, h, g, d = q.shape
    assert t % block_q == 0 and page_row.shape[0] % pages_per_tile == 0
    g_rows = _pow2(g, least=1)
    rows = block_q * g_rows
    assert rows >= 16 and rows & (rows - 1) == 0, "block_q * padded G must be a power of two ≥ 16"
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, g_rows - g), (0, 0)))  # [T, H, Gr, D]
    qp = qp.transpose(1, 0, 2, 3).reshape(h, t * g_rows, d)  # row = token * Gr + head in group
    interpret = _interpret_default() if interpret is None else interpret
    kernel = functools.partial(
        _prefill_kernel, block_q=block_q, g_rows=g_rows, pages_per_tile=pages_per_tile, scale=d**-0.5
    )
    full = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    layer = jnp.reshape(layer, (1,)).astype(jnp.int32)
    meta = jnp.stack([jnp.asarray(start, jnp.int32), jnp.asarray(kv_len, jnp.int32)])
    out = pl.pallas_call(
        kernel,
        grid=(t // block_q, h),
        in_specs=[
            full(layer),
            full(meta),
            full(page_row),
            pl.BlockSpec((None, rows, d), lambda i, j: (j, i, 0)),
            full(k),
            full(v),
        ],
        out_specs=pl.BlockSpec((None, rows, d), lambda i, j: (j, i, 0)),
        out_shape=jax.ShapeDtypeStruct((h, t * g_rows, d), q.dtype),
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )(layer, meta, page_row.astype(jnp.int32), qp, k, v)
    return out.reshape(h, t, g_rows, d).transpose(1, 0, 2, 3)[:, :, :g]


def prefill_attention_reference(q, k, v, layer, start, kv_len, page_row):
    t, h, _, d = q.shape
    kk = k[layer][page_row].reshape(-1, h, d).astype(jnp.float32)
    vv = v[layer][page_row].reshape(-1, h, d).astype(jnp.float32)
    s = jnp.einsum("thgd,shd->thgs", q.astype(jnp.float32), kk, precision=jax.lax.Precision.HIGHEST) * d**-0.5
    kv_pos, q_pos = jnp.arange(kk.shape[0]), start + jnp.arange(t)
    visible = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < kv_len)
    s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
    p = jnp.nan_to_num(jax.nn.softmax(s, axis=-1))
    return jnp.einsum("thgs,shd->thgd", p, vv, precision=jax.lax.Precision.HIGHEST).astype(q.dtype)
