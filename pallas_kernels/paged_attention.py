"""Paged attention in Pallas (Triton style): decode with split-K (flash-decoding) and chunked
prefill, each with its pure-jnp reference. Causal, with an optional sliding window, a custom scale
and Gemma-2-style logit soft-capping.

Cache layout (shared with the XLA path): k, v [L, N, P, H, D] (layers, pages, page size, kv heads,
head dim), read for one `layer` given at run time. A program handles one kv head and the G query
heads that share it, padded to `rows` (≥ 16, a power of two: Triton's dot needs M ≥ 16), so each K/V
byte is read once per kv head. Page ids are loaded from the page table and used as a gather index
into the whole pool (pointer arithmetic on GPU; nothing is copied). All loads have power-of-two
shapes.

Mask: a key at absolute position p is visible to a query at position t iff

    p <= t  and  p < length  and  t - p < window

(HF transformers' sliding-window rule; a decode query sits at t = length - 1). `window` is an int32
given at run time like `layer`, so one compiled kernel serves local and global layers; pass a huge
value (2**30) for global attention.

Quantized cache: with `k_scale`, `v_scale` [L, N, P, H] (float32, one per token and kv head) the
stored k, v (int8 or float8 e4m3) stand for k * k_scale, v * v_scale. A tile's keys are converted to
q's dtype (exact for both formats), their scales multiply the tile's scores and the value scales
the softmax weights: dequantized K/V never exist in memory.

Scores are q·k * scale (scale defaults to D**-0.5), or with `softcap` softcap * tanh(q·k * scale /
softcap), before masking. Hidden positions get a finite mask value and weights of exactly 0, so an
idle slot (length 0) yields zeros, never NaN.

Only the tiles holding visible keys are read: each loop starts at the tile of the first position any
query of the program can see, and stops after the tile of the last, so a windowed layer reads about
`window` tokens of K/V however long the context.

Decode: grid (B, H, S). The visible tiles of a sequence are cut into S runs of equal length (the
last may be short or empty); split s covers run s and writes (acc, m, l), and a small XLA epilogue
combines the splits (a split with nothing visible has total 0 and is ignored). Prefill: grid
(T/BQ, H); query block i covers chunk tokens [i*BQ, (i+1)*BQ) at absolute positions start + ...,
and loops over the tiles from the first key its first query can see to its last query's position.
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


def _scores(q, k, scale: float, softcap: float | None, k_scale=None):
    """q [R, D] · k [T, D] -> [R, T] f32 logits, scaled (k_scale [T]: per key too) and
    (optionally) soft-capped."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
    if k_scale is not None:
        s = s * k_scale[None, :]
    if softcap is None:
        return s * scale
    return softcap * jnp.tanh(s * (scale / softcap))


def _softmax_step(carry, q, k, v, visible, scale, softcap, scales=None):
    """One tile of the online softmax. q [R, D]; k, v [T, D]; visible [R, T] or [1, T]; scales:
    None, or (k_scale, v_scale) [T] of a quantized tile."""
    peak, total, acc = carry
    k_scale = None
    if scales is not None:
        (k_scale, v_scale), k, v = scales, k.astype(q.dtype), v.astype(q.dtype)
    s = jnp.where(visible, _scores(q, k, scale, softcap, k_scale), MASK_VALUE)
    peak_new = jnp.maximum(peak, jnp.max(s, axis=1))
    p = jnp.where(visible, jnp.exp(s - peak_new[:, None]), 0.0)
    correction = jnp.exp(peak - peak_new)
    total = total * correction + jnp.sum(p, axis=1)
    pw = p if scales is None else p * v_scale[None, :]
    acc = acc * correction[:, None] + jnp.dot(pw.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return peak_new, total, acc


def _tile_scales(refs, layer, pids, h, tile: int):
    """(k_scale, v_scale) [tile] of a tile's pages for kv head h, or None for a float cache."""
    if not refs:
        return None
    return tuple(r[layer, pids, :, h].reshape(tile) for r in refs)


def _init_state(rows: int, d: int):
    return (
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, d), jnp.float32),
    )


def _scale(scale: float | None, d: int) -> float:
    return d**-0.5 if scale is None else float(scale)


# -- decode ------------------------------------------------------------------------------------------


def _decode_kernel(
    meta_ref,
    lengths_ref,
    table_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,  # [ks_ref, vs_ref,] o_ref, m_ref, l_ref
    pages_per_tile: int,
    splits: int,
    tiles: int,
    scale: float,
    softcap: float | None,
):
    *scale_refs, o_ref, m_ref, l_ref = refs
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, window, length = meta_ref[0], meta_ref[1], lengths_ref[b]
    rows, d = q_ref.shape
    page = k_ref.shape[2]
    tile = pages_per_tile * page
    q = q_ref[...]
    lo = jnp.maximum(length - window, 0)  # first visible position (the query sits at length - 1)
    begin = lo // tile
    end = jnp.minimum((length + tile - 1) // tile, tiles)  # visible tiles: [begin, end)
    per_split = (jnp.maximum(end - begin, 0) + splits - 1) // splits
    first = begin + split * per_split
    last = jnp.minimum(first + per_split, end)

    def body(t, carry):
        pids = table_ref[b, pl.ds(t * pages_per_tile, pages_per_tile)]
        k = k_ref[layer, pids, :, h, :].reshape(tile, d)
        v = v_ref[layer, pids, :, h, :].reshape(tile, d)
        pos = (t * tile + jnp.arange(tile))[None, :]
        visible = (pos < length) & (pos >= lo)
        scales = _tile_scales(scale_refs, layer, pids, h, tile)
        return _softmax_step(carry, q, k, v, visible, scale, softcap, scales)

    peak, total, acc = jax.lax.fori_loop(first, jnp.maximum(first, last), body, _init_state(rows, d))
    o_ref[...] = acc
    m_ref[...] = peak
    l_ref[...] = total


@functools.partial(
    jax.jit,
    static_argnames=("pages_per_tile", "splits", "scale", "softcap", "interpret", "num_warps", "num_stages"),
)
def decode_attention(
    q,
    k,
    v,
    layer,
    window,
    lengths,
    page_table,
    k_scale=None,
    v_scale=None,
    *,
    pages_per_tile: int = 4,
    splits: int = 1,
    scale: float | None = None,
    softcap: float | None = None,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """One new token per sequence. q [B, H, G, D]; k, v [L, N, P, H, D]; layer, window int32
    scalars; lengths [B] (tokens to attend, the query's own included; 0 for idle); page_table [B, W]
    with W a multiple of pages_per_tile; k_scale, v_scale [L, N, P, H] for a quantized cache.
    Sequence b's query sits at position lengths[b] - 1 and sees
    keys p with lengths[b] - window <= p < lengths[b]. scale: None for D**-0.5; softcap: None or
    the Gemma 2 attention logit cap. Returns [B, H, G, D] in q's dtype."""
    b, h, g, d = q.shape
    width = page_table.shape[1]
    assert width % pages_per_tile == 0, (width, pages_per_tile)
    rows = _pow2(g)
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    interpret = _interpret_default() if interpret is None else interpret
    kernel = functools.partial(
        _decode_kernel,
        pages_per_tile=pages_per_tile,
        splits=splits,
        tiles=width // pages_per_tile,
        scale=_scale(scale, d),
        softcap=softcap,
    )
    full = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    meta = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(window, jnp.int32)])
    scales = () if k_scale is None else (k_scale, v_scale)
    acc, peak, total = pl.pallas_call(
        kernel,
        grid=(b, h, splits),
        in_specs=[
            full(meta),
            full(lengths),
            full(page_table),
            pl.BlockSpec((None, None, rows, d), lambda i, j, s: (i, j, 0, 0)),
            full(k),
            full(v),
            *map(full, scales),
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
    )(meta, lengths.astype(jnp.int32), page_table.astype(jnp.int32), qp, k, v, *scales)
    return combine_splits(acc, peak, total)[:, :, :g].astype(q.dtype)


def combine_splits(acc, peak, total):
    """Merge per-split online-softmax states: acc [..., S, R, D], peak/total [..., S, R]. Splits
    with total 0 (nothing visible) get weight 0; if every split is empty the result is 0."""
    top = jnp.max(peak, axis=-2, keepdims=True)
    w = jnp.where(total > 0, jnp.exp(peak - top), 0.0)  # [..., S, R]
    num = jnp.sum(acc * w[..., None], axis=-3)
    den = jnp.sum(total * w, axis=-2)
    return num / jnp.where(den == 0, 1.0, den)[..., None]


def _masked_softmax(q, kk, visible, spec, scale, softcap):
    """Dense f32 attention weights: scores by the einsum `spec` of q and kk, scaled and capped,
    hidden where `visible` is False; a row with nothing visible is all 0."""
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum(spec, q.astype(jnp.float32), kk, precision=hi) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(visible, s, -jnp.inf)
    return jnp.nan_to_num(jax.nn.softmax(s, axis=-1))


def decode_attention_reference(
    q, k, v, layer, window, lengths, page_table, *, scale: float | None = None, softcap: float | None = None
):
    """Gather every table page densely and run masked softmax attention (f32, HIGHEST); same
    arguments and mask as decode_attention."""
    b, h, _, d = q.shape
    kk = k[layer][page_table].reshape(b, -1, h, d).astype(jnp.float32)  # [B, S, H, D]
    vv = v[layer][page_table].reshape(b, -1, h, d).astype(jnp.float32)
    pos, lengths = jnp.arange(kk.shape[1])[None, :], jnp.asarray(lengths)[:, None]
    visible = (pos < lengths) & ((lengths - 1) - pos < window)  # [B, S]
    p = _masked_softmax(q, kk, visible[:, None, None, :], "bhgd,bshd->bhgs", _scale(scale, d), softcap)
    return jnp.einsum("bhgs,bshd->bhgd", p, vv, precision=jax.lax.Precision.HIGHEST).astype(q.dtype)


# -- prefill (one chunk of one sequence) -------------------------------------------------------------


def _prefill_kernel(
    meta_ref,
    table_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,  # [ks_ref, vs_ref,] o_ref
    block_q: int,
    g_rows: int,
    pages_per_tile: int,
    scale: float,
    softcap: float | None,
):
    *scale_refs, o_ref = refs
    i, h = pl.program_id(0), pl.program_id(1)
    layer, start, kv_len, window = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    rows, d = q_ref.shape  # rows = block_q * g_rows
    page = k_ref.shape[2]
    tile = pages_per_tile * page
    q = q_ref[...]
    q0 = start + i * block_q  # the block's first query position
    q_pos = q0 + jnp.arange(rows) // g_rows  # absolute position of each row's token
    stop = jnp.minimum(kv_len, q0 + block_q)  # keys this block can see: positions < stop ...
    lo = jnp.maximum(q0 - window + 1, 0)  # ... and ≥ lo (the first query's window)
    first, last = lo // tile, (stop + tile - 1) // tile

    def body(t, carry):
        pids = table_ref[pl.ds(t * pages_per_tile, pages_per_tile)]
        k = k_ref[layer, pids, :, h, :].reshape(tile, d)
        v = v_ref[layer, pids, :, h, :].reshape(tile, d)
        kv_pos = (t * tile + jnp.arange(tile))[None, :]
        visible = (kv_pos <= q_pos[:, None]) & (kv_pos < kv_len) & (q_pos[:, None] - kv_pos < window)
        scales = _tile_scales(scale_refs, layer, pids, h, tile)
        return _softmax_step(carry, q, k, v, visible, scale, softcap, scales)

    _, total, acc = jax.lax.fori_loop(first, jnp.maximum(first, last), body, _init_state(rows, d))
    o_ref[...] = (acc / jnp.where(total == 0, 1.0, total)[:, None]).astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("block_q", "pages_per_tile", "scale", "softcap", "interpret", "num_warps", "num_stages"),
)
def prefill_attention(
    q,
    k,
    v,
    layer,
    window,
    start,
    kv_len,
    page_row,
    k_scale=None,
    v_scale=None,
    *,
    block_q: int = 16,
    pages_per_tile: int = 4,
    scale: float | None = None,
    softcap: float | None = None,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """One chunk of one sequence. q [T, H, G, D] at positions start .. start+T-1 (T a multiple of
    block_q; rows past kv_len - start are padding); k, v [L, N, P, H, D]; layer, window, start,
    kv_len int32 scalars; page_row [W] (W a multiple of pages_per_tile); k_scale, v_scale
    [L, N, P, H] for a quantized cache. The query at position t
    sees keys p with t - window < p <= t and p < kv_len (the cached prefix and the chunk itself).
    scale: None for D**-0.5; softcap: None or the Gemma 2 attention logit cap.
    Returns [T, H, G, D] in q's dtype; a row with nothing visible is 0."""
    t, h, g, d = q.shape
    assert t % block_q == 0 and page_row.shape[0] % pages_per_tile == 0
    g_rows = _pow2(g, least=1)
    rows = block_q * g_rows
    assert rows >= 16 and rows & (rows - 1) == 0, "block_q * padded G must be a power of two ≥ 16"
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, g_rows - g), (0, 0)))  # [T, H, Gr, D]
    qp = qp.transpose(1, 0, 2, 3).reshape(h, t * g_rows, d)  # row = token * Gr + head in group
    interpret = _interpret_default() if interpret is None else interpret
    kernel = functools.partial(
        _prefill_kernel,
        block_q=block_q,
        g_rows=g_rows,
        pages_per_tile=pages_per_tile,
        scale=_scale(scale, d),
        softcap=softcap,
    )
    full = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    meta = jnp.stack([jnp.asarray(x, jnp.int32) for x in (layer, start, kv_len, window)])
    scales = () if k_scale is None else (k_scale, v_scale)
    out = pl.pallas_call(
        kernel,
        grid=(t // block_q, h),
        in_specs=[
            full(meta),
            full(page_row),
            pl.BlockSpec((None, rows, d), lambda i, j: (j, i, 0)),
            full(k),
            full(v),
            *map(full, scales),
        ],
        out_specs=pl.BlockSpec((None, rows, d), lambda i, j: (j, i, 0)),
        out_shape=jax.ShapeDtypeStruct((h, t * g_rows, d), q.dtype),
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )(meta, page_row.astype(jnp.int32), qp, k, v, *scales)
    return out.reshape(h, t, g_rows, d).transpose(1, 0, 2, 3)[:, :, :g]


def prefill_attention_reference(
    q,
    k,
    v,
    layer,
    window,
    start,
    kv_len,
    page_row,
    *,
    scale: float | None = None,
    softcap: float | None = None,
):
    """Gather every page of the row densely and run masked softmax attention (f32, HIGHEST); same
    arguments and mask as prefill_attention."""
    t, h, _, d = q.shape
    kk = k[layer][page_row].reshape(-1, h, d).astype(jnp.float32)
    vv = v[layer][page_row].reshape(-1, h, d).astype(jnp.float32)
    kv_pos, q_pos = jnp.arange(kk.shape[0])[None, :], start + jnp.arange(t)[:, None]
    visible = (kv_pos <= q_pos) & (kv_pos < kv_len) & (q_pos - kv_pos < window)  # [T, S]
    p = _masked_softmax(q, kk, visible[:, None, None, :], "thgd,shd->thgs", _scale(scale, d), softcap)
    return jnp.einsum("thgs,shd->thgd", p, vv, precision=jax.lax.Precision.HIGHEST).astype(q.dtype)
