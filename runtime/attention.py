"""Paged KV cache and the XLA attention over it.

Dimension letters: B sequences, T query tokens per sequence, L layers, N pages in the pool, P tokens
per page, W page-table width (pages per sequence), H kv heads, G query heads per kv head, D head dim.

One function serves prefill (B=1, T=chunk) and decode (B=slots, T=1): queries at absolute positions
`q_pos[B, T]` attend to keys at positions `< kv_len[B]` that are `<= q_pos` (causal) and, for a
sliding-window layer, `> q_pos - window` (HF's rule). Keys are read from the pages in
`page_table[B, W]` one block of `block` tokens at a time with an online softmax; the loop starts
at the first block any query's window reaches and stops at the longest `kv_len` of the batch, so
the cost follows the real context length, or the window.

When the table is exactly one block wide there is no loop: decode cuts the table to a KV-length
bucket and attends densely, because on CPU each loop iteration costs ~0.1 ms per layer, more than
the attention itself at short contexts.

Quantized cache (`kv_cache_dtype` int8 or fp8): K and V are stored as int8 or float8 e4m3 with one
float32 scale per token and kv head (`k_scale`, `v_scale` [L, N, P, H]): x ~= stored * scale, the
scale being max|x| over the head dim divided by the format's largest value (127, 448). Attention
never materializes dequantized K/V: the key scales multiply the scores and the value scales the
softmax weights, both [.., keys], so the extra work is per key, not per element. Keys are
quantized divided by `k_smooth` [L, H, D] and queries multiplied by it (runtime/kv_smoothing.py:
a few large key channels would otherwise set every token's scale).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xlaserve.cpu_kernels import paged_attention as native
from xlaserve.pallas_kernels import paged_attention as pk
from xlaserve.pallas_kernels import tpu_attention as tpa
from xlaserve.runtime.config import XLA_KERNELS, Kernels

# A finite "minus infinity": exp() of it underflows to 0 without producing NaN in max-subtraction.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
NO_WINDOW = 1 << 30  # the window of a global layer: longer than any context


# kv_cache_dtype -> (stored dtype, the largest magnitude it holds); "auto" stores the engine dtype
KV_FORMATS = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, N, P, H, D]
    v: jax.Array  # [L, N, P, H, D]
    k_scale: jax.Array | None = None  # [L, N, P, H] float32 when quantized, else None
    v_scale: jax.Array | None = None
    k_smooth: jax.Array | None = None  # [L, H, D] float32 when quantized: keys stored divided by it

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def per_token(self) -> tuple:
        """The arrays holding something per token: K, V and their scales (not k_smooth)."""
        return tuple(a for a in (self.k, self.v, self.k_scale, self.v_scale) if a is not None)

    @staticmethod
    def abstract(shape, dtype: str, kv_cache_dtype: str = "auto", sharding=None):
        """A cache of ShapeDtypeStructs: K/V of `shape` [L, N, P, H, D] in `dtype` ("auto") or the
        quantized format, with their scales [L, N, P, H] and key divisors [L, H, D]. `sharding`: a
        NamedSharding of K/V (kv heads split or not); the others follow its head axis."""
        if kv_cache_dtype == "auto":
            kv = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
            return KVCache(kv, kv)
        heads = None if sharding is None else sharding.spec[3]
        like = lambda *spec: None if sharding is None else NamedSharding(sharding.mesh, P(*spec))
        kv = jax.ShapeDtypeStruct(shape, KV_FORMATS[kv_cache_dtype][0], sharding=sharding)
        scale = jax.ShapeDtypeStruct(shape[:-1], jnp.float32, sharding=like(None, None, None, heads))
        smooth = (shape[0], *shape[3:])
        return KVCache(
            kv, kv, scale, scale, jax.ShapeDtypeStruct(smooth, jnp.float32, sharding=like(None, heads, None))
        )


def token_bytes(cache: KVCache) -> int:
    """Bytes one token's K and V (and scales) take, over every layer."""
    tokens = cache.num_pages * cache.page_size
    return sum(a.size * jnp.dtype(a.dtype).itemsize for a in cache.per_token()) // tokens


def quantize_kv(x, dtype):
    """x [..., D] -> (stored [..., D] in `dtype`, scale [...] float32) with x ~= stored * scale."""
    top = next(t for d, t in KV_FORMATS.values() if jnp.dtype(d) == jnp.dtype(dtype))
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / top
    y = x * jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)[..., None]
    if jnp.issubdtype(dtype, jnp.integer):
        y = jnp.clip(jnp.round(y), -top, top)
    return y.astype(dtype), scale


def dequantize_kv(cache: KVCache, dtype=jnp.float32) -> KVCache:
    """The full-precision cache a quantized one stands for (tests, references)."""
    if not cache.quantized:
        return cache
    de = lambda x, s: x.astype(jnp.float32) * s[..., None]
    k = de(cache.k, cache.k_scale)
    if cache.k_smooth is not None:
        k = k * cache.k_smooth[:, None, None]
    return KVCache(k.astype(dtype), de(cache.v, cache.v_scale).astype(dtype))


def write_kv(cache: KVCache, layer, k, v, pages, offsets) -> KVCache:
    """Store k, v [B, T, H, D] at (pages, offsets) [B, T] of `layer`, quantized (with their scales)
    when the cache is. A page index ≥ N is dropped; callers use it for padding tokens and idle
    slots."""
    idx = (layer, pages, offsets)
    put = lambda arr, x: arr.at[idx].set(x.astype(arr.dtype), mode="drop")
    if not cache.quantized:
        return KVCache(put(cache.k, k), put(cache.v, v))
    if cache.k_smooth is not None:
        k = k.astype(jnp.float32) / cache.k_smooth[layer]
    (kq, ks), (vq, vs) = quantize_kv(k, cache.k.dtype), quantize_kv(v, cache.v.dtype)
    stored = (put(cache.k, kq), put(cache.v, vq), put(cache.k_scale, ks), put(cache.v_scale, vs))
    return KVCache(*stored, cache.k_smooth)


def token_slots(page_table, positions, valid, page_size: int, num_pages: int):
    """(page, offset) [B, T] where the tokens at `positions` [B, T] live. Tokens that are not
    `valid`, or fall past the end of the table, map to page `num_pages` (dropped on write)."""
    width = page_table.shape[1]
    page_idx = positions // page_size
    in_table = valid & (page_idx < width)
    pages = jnp.take_along_axis(page_table, jnp.clip(page_idx, 0, width - 1), axis=1)
    return jnp.where(in_table, pages, num_pages), positions % page_size


def paged_attention(
    q,
    cache: KVCache,
    layer,
    page_table,
    q_pos,
    kv_len,
    *,
    block: int,
    kernels: Kernels = XLA_KERNELS,
    window=None,
    scale: float | None = None,
    softcap: float | None = None,
):
    """softmax(softcap(q k^T * scale)) v over the paged cache of `layer`.

    q [B, T, H, G, D]; page_table [B, W] (W a multiple of block / P); q_pos [B, T]; kv_len [B];
    window: int32 scalar (traced; a huge value for a global layer) or None; scale: static (None:
    D ** -0.5); softcap: static c, scores -> c * tanh(scores / c) before masking (None: off).
    Returns [B, T, H, G, D] in q's dtype. A sequence with kv_len 0 gets zeros, never NaN.
    With kernels.attention == "pallas", our Pallas kernels run: the decode kernel for T = 1, the
    one-sequence prefill kernel for B = 1 (T a multiple of 16), and that kernel batched over rows
    otherwise (verify's K+1 queries a slot, scoring rows); q_pos must then be consecutive from
    q_pos[:, 0] (as the engine's always are). With kernels.attention == "native" (CPU, one device, a
    float32 cache), our C++ kernel reads K/V in their pages (cpu_kernels/paged_attention.cc).
    """
    b, t, h, g, d = q.shape
    scale = d**-0.5 if scale is None else scale
    window = jnp.asarray(NO_WINDOW if window is None else window, jnp.int32)
    if cache.k_smooth is not None:  # keys were stored divided by it: q.k is unchanged
        q = (q * cache.k_smooth[layer][:, None, :]).astype(q.dtype)
    if kernels.attention == "pallas" and _kernel_takes(cache, h, kernels):
        return _pallas_attention(q, cache, layer, window, page_table, q_pos, kv_len, kernels, scale, softcap)
    if kernels.attention == "native" and _native_takes(q, cache, kernels):
        args = (q, cache.k, cache.v, layer, page_table, q_pos, kv_len, window)
        return native.paged_attention(*args, scale=scale, softcap=softcap)
    assert page_table.shape[1] * cache.page_size % block == 0, (page_table.shape, block)
    page_size = cache.page_size
    pages_per_block = block // page_size
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    n_blocks = (jnp.max(kv_len) + block - 1) // block
    # the first key any live sequence's first query can see (queries of a row are consecutive)
    first = jnp.min(jnp.where(kv_len > 0, q_pos[:, 0], jnp.iinfo(jnp.int32).max))
    first_block = jnp.maximum(first - window + 1, 0) // block

    def body(j, carry):
        peak, total, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(page_table, j * pages_per_block, pages_per_block, axis=1)
        k = cache.k[layer, pages].reshape(b, block, h, d)  # gather: [B, block, H, D]
        v = cache.v[layer, pages].reshape(b, block, h, d)
        if cache.quantized:  # scales per key [B, 1, H, 1, block]: on the scores and the weights
            per_key = lambda sc: sc[layer, pages].reshape(b, block, h).transpose(0, 2, 1)[:, None, :, None]
            k_scale, v_scale = per_key(cache.k_scale), per_key(cache.v_scale)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = jnp.einsum("bthgd,bshd->bthgs", q, k, precision=precision, preferred_element_type=jnp.float32)
        s = s * (scale * k_scale if cache.quantized else scale)
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        kv_pos = j * block + jnp.arange(block)
        visible = (
            (kv_pos[None, None, :] <= q_pos[:, :, None])
            & (kv_pos[None, None, :] < kv_len[:, None, None])
            & (q_pos[:, :, None] - kv_pos[None, None, :] < window)
        )
        visible = visible[:, :, None, None, :]  # [B, T, 1, 1, block]
        s = jnp.where(visible, s, MASK_VALUE)
        peak_new = jnp.maximum(peak, s.max(axis=-1))
        p = jnp.where(visible, jnp.exp(s - peak_new[..., None]), 0.0)
        correction = jnp.exp(peak - peak_new)
        total = total * correction + p.sum(axis=-1)
        pw = p * v_scale if cache.quantized else p
        pv = jnp.einsum(
            "bthgs,bshd->bthgd",
            pw.astype(v.dtype),
            v,
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return peak_new, total, acc * correction[..., None] + pv

    init = (
        jnp.full((b, t, h, g), MASK_VALUE, jnp.float32),
        jnp.zeros((b, t, h, g), jnp.float32),
        jnp.zeros((b, t, h, g, d), jnp.float32),
    )
    if page_table.shape[1] == pages_per_block:
        _, total, acc = body(0, init)
    else:
        _, total, acc = jax.lax.fori_loop(first_block, n_blocks, body, init)
    out = acc / jnp.where(total == 0.0, 1.0, total)[..., None]
    return out.astype(q.dtype)


def _native_takes(q, cache: KVCache, kernels: Kernels) -> bool:
    """Whether our C++ kernel takes this call: float32 queries and cache (not quantized), no mesh."""
    f32 = jnp.dtype(jnp.float32)
    return kernels.mesh is None and not cache.quantized and q.dtype == f32 and cache.k.dtype == f32


def _pages_per_tile(width: int, page_size: int, tile_tokens: int = 64) -> int:
    """Pages per kernel tile: about `tile_tokens` tokens, a power of two dividing the table width."""
    ppt = 1
    while ppt * 2 * page_size <= tile_tokens and width % (ppt * 2) == 0:
        ppt *= 2
    return ppt


def _local_heads(h: int, kernels: Kernels) -> int:
    """kv heads per device: split over tp when they divide, else all of them on every device."""
    tp = kernels.mesh.shape["tp"] if kernels.mesh is not None else 1
    return h // tp if h % tp == 0 else h


def _kernel_takes(cache: KVCache, h: int, kernels: Kernels) -> bool:
    """Whether the Pallas kernels of this platform take this cache (decided statically; the TPU
    kernels need float32/bfloat16 K/V, whole sublane tiles per page and, in bfloat16, kv heads in
    pairs: `tpu_attention.unsupported`). Otherwise the XLA path runs."""
    if kernels.pallas_platform != "tpu":
        return True
    return tpa.unsupported(cache.k.dtype, _local_heads(h, kernels), cache.page_size) is None


def _pallas_attention(
    q, cache: KVCache, layer, window, page_table, q_pos, kv_len, kernels: Kernels, scale, softcap
):
    """Our kernels (Triton's on GPU, Mosaic's on TPU); on a mesh, per shard under shard_map (kv
    heads split over tp when they divide, the query heads with them; otherwise every device runs
    all heads)."""
    b, t, h = q.shape[:3]
    if t > 1 and (b > 1 or t % 16):  # several rows, or a T the one-sequence kernel does not tile
        return _batched_prefill(q, cache, layer, window, page_table, q_pos, kv_len, kernels, scale, softcap)
    if kernels.pallas_platform == "tpu":
        fn, args, q_in = _tpu_kernel(
            q, layer, window, page_table, q_pos, kv_len, cache.page_size, kernels, scale, softcap
        )
        return _run_sharded(fn, q_in, cache, args, kernels, t)
    ppt = _pages_per_tile(page_table.shape[1], cache.page_size)
    opts = dict(pages_per_tile=ppt, scale=scale, softcap=softcap, interpret=kernels.interpret)
    if t == 1:
        tiles = page_table.shape[1] // ppt
        splits = 1 if kernels.interpret else max(1, min(tiles, -(-264 // (b * h))))  # ~2 waves of 132 SMs
        fn = functools.partial(pk.decode_attention, splits=splits, **opts)
        args, q_in = (layer, window, kv_len, page_table), q[:, 0]  # q [B, H, G, D]
    else:
        block_q = 16 if t % 16 == 0 else t
        fn = functools.partial(pk.prefill_attention, block_q=block_q, **opts)
        args, q_in = (layer, window, q_pos[0, 0], kv_len[0], page_table[0]), q[0]  # q [T, H, G, D]
    return _run_sharded(fn, q_in, cache, args, kernels, t, scales=cache.quantized)


def _batched_prefill(
    q, cache: KVCache, layer, window, page_table, q_pos, kv_len, kernels: Kernels, scale, softcap
):
    """B rows of T consecutive queries each (verify's current token + K guesses, scoring rows): the
    one-sequence prefill kernel under vmap, which gives its grid one more axis over the rows (k/v
    and their scales are shared, unbatched). T is padded to a power of two the kernels tile (the
    Triton kernel needs T * padded G a power of two ≥ 16); padded queries see only keys below
    kv_len and are dropped. Rows with kv_len 0 (idle slots) come out 0."""
    t, g = q.shape[1], q.shape[3]
    g_rows = 1 << (g - 1).bit_length()
    tp = max(1 << (t - 1).bit_length(), -(-16 // g_rows))
    qp = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0), (0, 0)))
    tpu = kernels.pallas_platform == "tpu"
    ppt = _pages_per_tile(page_table.shape[1], cache.page_size, tile_tokens=128 if tpu else 64)
    opts = dict(pages_per_tile=ppt, scale=scale, softcap=softcap, interpret=kernels.interpret)
    if tpu:
        one = functools.partial(tpa.prefill_attention, **opts)
    else:
        one = functools.partial(pk.prefill_attention, block_q=16 if tp % 16 == 0 else tp, **opts)
    scales = cache.quantized  # never on TPU: the Mosaic kernels take float K/V only (_kernel_takes)
    fn = jax.vmap(one, in_axes=(0, None, None, None, None, 0, 0, 0) + (None,) * (2 * scales))
    args = (layer, window, q_pos[:, 0], kv_len, page_table)
    return _run_sharded(fn, qp, cache, args, kernels, tp, scales=scales)[:, :t]


def _tpu_kernel(
    q, layer, window, page_table, q_pos, kv_len, page_size: int, kernels: Kernels, scale, softcap
):
    """(kernel, its arguments after q, k, v, q as it takes it) for the Mosaic kernels: tiles of
    about 128 tokens (a power-of-two number of pages dividing the table width)."""
    ppt = _pages_per_tile(page_table.shape[1], page_size, tile_tokens=128)
    opts = dict(pages_per_tile=ppt, scale=scale, softcap=softcap, interpret=kernels.interpret)
    if q.shape[1] == 1:
        fn = functools.partial(tpa.decode_attention, **opts)
        return fn, (layer, window, kv_len, page_table), q[:, 0]
    fn = functools.partial(tpa.prefill_attention, **opts)
    return fn, (layer, window, q_pos[0, 0], kv_len[0], page_table[0]), q[0]


def _run_sharded(fn, q_in, cache: KVCache, args, kernels: Kernels, t: int, scales: bool = False):
    """fn(q_in, k, v, *args[, k_scale, v_scale]), per shard under shard_map on a mesh; back to
    [B, T, H, G, D]. q_in is [B, H, G, D] (decode), [T, H, G, D] (one sequence) or [B, T, H, G, D]
    (batched rows): the kv heads are its third axis from the end but one."""
    batched = q_in.ndim == 5
    h = q_in.shape[-3]
    mesh = kernels.mesh
    extra = (cache.k_scale, cache.v_scale) if scales else ()
    if mesh is not None:
        heads = "tp" if h % mesh.shape["tp"] == 0 else None
        qs = P(*(None,) * (q_in.ndim - 3), heads, None, None)
        cs, ss = P(None, None, None, heads, None), P(None, None, None, heads)
        specs = (qs, cs, cs) + (P(),) * len(args) + (ss,) * len(extra)
        fn = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qs, check_vma=False)
    out = fn(q_in, cache.k, cache.v, *args, *extra)
    if batched:
        return out
    return out[:, None] if t == 1 else out[None]


def reference_attention(q, k_seq, v_seq, q_pos, kv_len, window=None, scale=None, softcap=None):
    """Dense masked attention for tests: q [B, T, H, G, D], k/v [B, S, H, D] already gathered."""
    d = q.shape[-1]
    s = jnp.einsum("bthgd,bshd->bthgs", q, k_seq, precision=jax.lax.Precision.HIGHEST)
    s = s * (d**-0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    kv_pos = jnp.arange(k_seq.shape[1])
    visible = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < kv_len[:, None, None])
    if window is not None:
        visible &= q_pos[:, :, None] - kv_pos[None, None, :] < window
    s = jnp.where(visible[:, :, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(jnp.isnan(p), 0.0, p)
    return jnp.einsum("bthgs,bshd->bthgd", p, v_seq, precision=jax.lax.Precision.HIGHEST)
