"""Paged attention for TPU (Pallas/Mosaic): decode (one query per sequence) and chunked prefill (a
chunk of one sequence), over the same cache, arguments and mask as `paged_attention.py`'s Triton
kernels, whose pure-jnp references (`decode_attention_reference`, `prefill_attention_reference`)
are these kernels' references too.

Why not an established kernel. jax's `pallas.ops.tpu.paged_attention` wants K and V each as
[kv_heads, pages, page, D] (head-major; ours is [L, N, P, H, D], and no reshape puts H in front),
masks by length only (no sliding window) and has no prefill. The ragged paged attention (RPA) that
vLLM's TPU backend uses wants K and V interleaved in one array [pages, page, 2H, D] and takes the
sliding window as a static int (ours is traced per layer). Both would need the cache in another
layout (a per-step transpose of the whole cache, or a different cache made by the engine), so we
use our own kernel in the RPA style: its head selection from a [P, H, D] page (a ref reshape to
[P*H, D] and a strided row load; for bfloat16 a uint32 view whose halves hold two heads).

Pages reach VMEM through the Pallas pipeline: the page table is scalar-prefetched, and each grid
step's K/V blocks are `pages_per_tile` pages, one BlockSpec per page whose index_map reads the page
id from the table (a page is [P, H, D], the full last two dims of the cache, so any H and D pass
Mosaic's (8, 128) rule). Tiles outside the visible range are clamped to the nearest visible one,
so their block index repeats and the pipeline does not fetch them again: a windowed layer reads
about `window` tokens of K/V. (Tile and page indices are clamped into the table and the pool, so
padding queries and idle slots never address memory outside them.) Per step, all kv heads are
processed (a static loop), each with its G query heads padded to `rows` (a multiple of 8); the
online-softmax state lives in VMEM scratch ([rows, 128] lane-replicated m and l, as jax's flash
attention keeps them).

Decode: grid (B, tiles) (B "parallel" for megacore), output written at the last tile. Prefill:
q [T, H, G, D] is laid out [H, T*Gr, D] (row = token * Gr + head in group, Gr = G padded to a power
of two) and cut into query blocks of `block_q` tokens; grid (T / block_q, tiles).

Supported (`unsupported` says why not; the runtime then uses the XLA path): K/V float32 or
bfloat16, page size a multiple of 8 (16 for bfloat16), and for bfloat16 an even number of kv heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128
NT = (((1,), (1,)), ((), ()))  # dot_general: a [m, k] x b [n, k] -> [m, n]


def unsupported(dtype, kv_heads: int, page_size: int) -> str | None:
    """Why these kernels cannot run on a cache of this dtype and shape (None: they can)."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"K/V dtype {dtype} (float32 or bfloat16 only)"
    if page_size % (8 * (4 // dtype.itemsize)):
        return f"page size {page_size} (a multiple of {8 * (4 // dtype.itemsize)} for {dtype})"
    if dtype == jnp.bfloat16 and kv_heads % 2:
        return f"{kv_heads} kv heads in bfloat16 (heads are read in pairs)"
    return None


def _interpret_default() -> bool:
    return jax.default_backend() == "cpu"


def _scale(scale: float | None, d: int) -> float:
    return d**-0.5 if scale is None else float(scale)


def _head(ref, h: int, heads: int):
    """Head h of a page block [P, H, D] as [P, D] float32 (bfloat16 values are exact in f32)."""
    p, _, d = ref.shape
    rows = ref.reshape(p * heads, d)
    if ref.dtype == jnp.float32:
        return rows[h::heads, :] if heads > 1 else rows[...]
    pairs = rows.bitcast(jnp.uint32)  # row r holds heads 2r % H (low half) and 2r % H + 1 (high)
    both = pairs[h // 2 :: heads // 2, :] if heads > 2 else pairs[...]
    bits = both << 16 if h % 2 == 0 else both & jnp.uint32(0xFFFF0000)
    return pltpu.bitcast(bits, jnp.float32)


def _tile(refs, h: int, heads: int):
    """Head h of a tile of pages: [pages_per_tile * P, D] float32."""
    parts = [_head(r, h, heads) for r in refs]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def _update(h, q, k, v, visible, m_ref, l_ref, acc_ref, scale, softcap):
    """One tile of the online softmax for kv head h. q [R, D]; k, v [T, D] f32; visible [R|1, T]."""
    dt = q.dtype
    s = jax.lax.dot_general(q, k.astype(dt), NT, preferred_element_type=jnp.float32)
    s = s * scale if softcap is None else softcap * jnp.tanh(s * (scale / softcap))
    s = jnp.where(visible, s, MASK_VALUE)
    m_prev, l_prev = m_ref[h], l_ref[h]  # [R, 128], every lane equal
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_next[:, :1]), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_ref[h] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_ref[h] = m_next
    pv = jnp.dot(p.astype(dt), v.astype(dt), preferred_element_type=jnp.float32)
    acc_ref[h] = acc_ref[h] * alpha[:, :1] + pv


def _init(m_ref, l_ref, acc_ref):
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def _finish(o_ref, l_ref, acc_ref, heads: int):
    for h in range(heads):
        total = l_ref[h][:, :1]
        o_ref[h] = (acc_ref[h] / jnp.where(total == 0.0, 1.0, total)).astype(o_ref.dtype)


def _kv_specs(block, pages_per_tile: int, page_of):
    """One BlockSpec per page of a tile; page_of(i, *grid_and_prefetch) -> (layer, page id)."""

    def spec(i):
        return pl.BlockSpec(block, lambda *a: (*page_of(i, *a), 0, 0, 0))

    return [spec(i) for i in range(pages_per_tile)]


def _div(a, b: int):
    """a // b for a ≥ 0 (lax.div: jnp's floor division lowers through `sign`, which Mosaic
    lowers only on a real TPU)."""
    return jax.lax.div(a, jnp.int32(b))


def _clamp_page(page, num_pages: int):
    return jnp.minimum(jnp.maximum(page, 0), num_pages - 1)


def _scratch(heads: int, rows: int, d: int):
    return [
        pltpu.VMEM((heads, rows, LANES), jnp.float32),  # m
        pltpu.VMEM((heads, rows, LANES), jnp.float32),  # l
        pltpu.VMEM((heads, rows, d), jnp.float32),  # acc
    ]


def _rows(g: int) -> int:
    return -(-g // 8) * 8


# -- decode ------------------------------------------------------------------------------------------


def _decode_range(length, window, tile: int, tiles: int):
    """Visible tiles [begin, end) of a decode query at length - 1, and the first visible key."""
    lo = jnp.maximum(length - window, 0)
    return _div(lo, tile), jnp.minimum(_div(length + tile - 1, tile), tiles), lo


def _decode_kernel(meta_ref, lengths_ref, table_ref, q_ref, *refs, ppt, tiles, scale, softcap):
    k_refs, v_refs = refs[:ppt], refs[ppt : 2 * ppt]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * ppt :]
    heads = q_ref.shape[0]
    b, t = pl.program_id(0), pl.program_id(1)
    length, window = lengths_ref[b], meta_ref[1]
    tile = ppt * k_refs[0].shape[0]
    begin, end, lo = _decode_range(length, window, tile, tiles)

    @pl.when(t == 0)
    def _():
        _init(m_ref, l_ref, acc_ref)

    @pl.when((t >= begin) & (t < end))
    def _():
        pos = t * tile + jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1)
        visible = (pos < length) & (pos >= lo)
        for h in range(heads):
            k, v = _tile(k_refs, h, heads), _tile(v_refs, h, heads)
            _update(h, q_ref[h], k, v, visible, m_ref, l_ref, acc_ref, scale, softcap)

    @pl.when(t == tiles - 1)
    def _():
        _finish(o_ref, l_ref, acc_ref, heads)


@functools.partial(jax.jit, static_argnames=("pages_per_tile", "scale", "softcap", "interpret"))
def decode_attention(
    q,
    k,
    v,
    layer,
    window,
    lengths,
    page_table,
    *,
    pages_per_tile: int = 8,
    scale: float | None = None,
    softcap: float | None = None,
    interpret: bool | None = None,
):
    """One new token per sequence; arguments as `paged_attention.decode_attention` (q [B, H, G, D];
    k, v [L, N, P, H, D]; layer, window int32; lengths [B]; page_table [B, W], W a multiple of
    pages_per_tile). Returns [B, H, G, D] in q's dtype; an idle sequence (length 0) gets zeros."""
    b, h, g, d = q.shape
    _, n, page = k.shape[:3]
    width = page_table.shape[1]
    assert width % pages_per_tile == 0, (width, pages_per_tile)
    why = unsupported(k.dtype, h, page)
    assert why is None, why
    rows, tiles, tile = _rows(g), width // pages_per_tile, pages_per_tile * page
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, rows - g), (0, 0)))

    def page_of(i, bi, t, meta_ref, lengths_ref, table_ref):
        begin, end, _ = _decode_range(lengths_ref[bi], meta_ref[1], tile, tiles)
        t = jnp.minimum(jnp.minimum(jnp.maximum(t, begin), jnp.maximum(end - 1, begin)), tiles - 1)
        return meta_ref[0], _clamp_page(table_ref[bi * width + t * pages_per_tile + i], n)

    kv = _kv_specs((None, None, page, h, d), pages_per_tile, page_of)
    q_spec = pl.BlockSpec((None, h, rows, d), lambda bi, t, *_: (bi, 0, 0, 0))
    kernel = functools.partial(
        _decode_kernel, ppt=pages_per_tile, tiles=tiles, scale=_scale(scale, d), softcap=softcap
    )
    meta = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(window, jnp.int32)])
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, tiles),
            in_specs=[q_spec, *kv, *kv],
            out_specs=q_spec,
            scratch_shapes=_scratch(h, rows, d),
        ),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interpret_default() if interpret is None else interpret,
        name="xlaserve_decode_attention",
    )(
        meta,
        lengths.astype(jnp.int32),
        page_table.astype(jnp.int32).reshape(-1),
        qp,
        *[k] * pages_per_tile,
        *[v] * pages_per_tile,
    )
    return out[:, :, :g]


# -- prefill (one chunk of one sequence) -------------------------------------------------------------


def _prefill_range(i, meta_ref, block_q: int, tile: int, tiles: int):
    """Query block i's first position, and the tiles [first, last) its queries can see."""
    start, kv_len, window = meta_ref[1], meta_ref[2], meta_ref[3]
    q0 = start + i * block_q
    stop = jnp.minimum(kv_len, q0 + block_q)
    first = _div(jnp.maximum(q0 - window + 1, 0), tile)
    return q0, first, jnp.minimum(_div(stop + tile - 1, tile), tiles)


def _prefill_kernel(meta_ref, table_ref, q_ref, *refs, ppt, tiles, block_q, g_shift, scale, softcap):
    k_refs, v_refs = refs[:ppt], refs[ppt : 2 * ppt]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * ppt :]
    heads, rows, _ = q_ref.shape
    i, t = pl.program_id(0), pl.program_id(1)
    kv_len, window = meta_ref[2], meta_ref[3]
    tile = ppt * k_refs[0].shape[0]
    q0, first, last = _prefill_range(i, meta_ref, block_q, tile, tiles)

    @pl.when(t == 0)
    def _():
        _init(m_ref, l_ref, acc_ref)

    @pl.when((t >= first) & (t < last))
    def _():
        q_pos = q0 + jax.lax.shift_right_logical(jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0), g_shift)
        kv_pos = t * tile + jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1)
        visible = (kv_pos <= q_pos) & (kv_pos < kv_len) & (q_pos - kv_pos < window)
        for h in range(heads):
            k, v = _tile(k_refs, h, heads), _tile(v_refs, h, heads)
            _update(h, q_ref[h], k, v, visible, m_ref, l_ref, acc_ref, scale, softcap)

    @pl.when(t == tiles - 1)
    def _():
        _finish(o_ref, l_ref, acc_ref, heads)


def prefill_block_q(t: int, g: int, target_rows: int = 256) -> int:
    """Tokens per query block: a power of two dividing t, about target_rows rows of q, and
    rows a multiple of 8 (or the whole chunk)."""
    g_rows = 1 << (g - 1).bit_length()
    bq = t
    while bq % 2 == 0 and bq * g_rows > target_rows and (bq // 2) * g_rows % 8 == 0:
        bq //= 2
    return bq


@functools.partial(jax.jit, static_argnames=("block_q", "pages_per_tile", "scale", "softcap", "interpret"))
def prefill_attention(
    q,
    k,
    v,
    layer,
    window,
    start,
    kv_len,
    page_row,
    *,
    block_q: int | None = None,
    pages_per_tile: int = 8,
    scale: float | None = None,
    softcap: float | None = None,
    interpret: bool | None = None,
):
    """One chunk of one sequence; arguments as `paged_attention.prefill_attention` (q [T, H, G, D]
    at positions start .. start+T-1; page_row [W], W a multiple of pages_per_tile). block_q: None
    for `prefill_block_q`. Returns [T, H, G, D] in q's dtype; a row with nothing visible is 0."""
    t, h, g, d = q.shape
    _, n, page = k.shape[:3]
    width = page_row.shape[0]
    assert width % pages_per_tile == 0, (width, pages_per_tile)
    why = unsupported(k.dtype, h, page)
    assert why is None, why
    block_q = block_q or prefill_block_q(t, g)
    g_rows = 1 << (g - 1).bit_length()
    rows = block_q * g_rows
    assert t % block_q == 0 and (rows % 8 == 0 or block_q == t), (t, block_q, g_rows)
    tiles, tile = width // pages_per_tile, pages_per_tile * page
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, g_rows - g), (0, 0)))
    qp = qp.transpose(1, 0, 2, 3).reshape(h, t * g_rows, d)  # row = token * Gr + head in group

    def page_of(i, qi, ti, meta_ref, table_ref):
        _, first, last = _prefill_range(qi, meta_ref, block_q, tile, tiles)
        ti = jnp.minimum(jnp.minimum(jnp.maximum(ti, first), jnp.maximum(last - 1, first)), tiles - 1)
        return meta_ref[0], _clamp_page(table_ref[ti * pages_per_tile + i], n)

    kv = _kv_specs((None, None, page, h, d), pages_per_tile, page_of)
    q_spec = pl.BlockSpec((h, rows, d), lambda qi, ti, *_: (0, qi, 0))
    kernel = functools.partial(
        _prefill_kernel,
        ppt=pages_per_tile,
        tiles=tiles,
        block_q=block_q,
        g_shift=g_rows.bit_length() - 1,
        scale=_scale(scale, d),
        softcap=softcap,
    )
    meta = jnp.stack([jnp.asarray(x, jnp.int32) for x in (layer, start, kv_len, window)])
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(t // block_q, tiles),
            in_specs=[q_spec, *kv, *kv],
            out_specs=q_spec,
            scratch_shapes=_scratch(h, rows, d),
        ),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interpret_default() if interpret is None else interpret,
        name="xlaserve_prefill_attention",
    )(meta, page_row.astype(jnp.int32), qp, *[k] * pages_per_tile, *[v] * pages_per_tile)
    return out.reshape(h, t, g_rows, d).transpose(1, 0, 2, 3)[:, :, :g]
