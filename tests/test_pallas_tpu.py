"""Our TPU (Mosaic) kernels: in interpret mode on CPU against the same references as the Triton
kernels (tests/test_pallas.py), through the runtime's dispatch, and lowered for TPU with
`jax.export` (which runs Pallas's Mosaic lowering without a TPU: block shapes, memory spaces and
the ops it has rules for; libtpu's own Mosaic passes still need a TPU).

Interpret mode fills outputs with NaN before the kernel runs, so "finite" proves every element was
written; pages outside the tiles a query may see are NaN, so reading one would show.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas import GLOBAL, check_close, dense_attention, make_weight, poison_unread, windows_for

from xlaserve.pallas_kernels import tpu_attention as tpa
from xlaserve.pallas_kernels import tpu_matmul as tpm
from xlaserve.pallas_kernels.paged_attention import (
    decode_attention_reference,
    prefill_attention_reference,
)
from xlaserve.pallas_kernels.quantized_matmul import dequantize_reference, quantized_matmul_reference
from xlaserve.runtime.attention import NO_WINDOW, KVCache, paged_attention
from xlaserve.runtime.config import Kernels
from xlaserve.runtime.quant import linear

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def cache(rng, *, heads, page, d, dtype, pool, layers=2):
    return tuple(jnp.asarray(rng.standard_normal((layers, pool, page, heads, d)), dtype) for _ in "kv")


def tables(rng, batch, width, pool):
    """Random non-contiguous page tables sharing their first page (a common prefix)."""
    table = np.stack([rng.permutation(pool)[:width] for _ in range(batch)]).astype(np.int32)
    table[:, 0] = table[0, 0]
    return jnp.asarray(table)


# (page, batch, kv heads, G, head dim, dtype, pages per tile, softcap, scale): G 3 and 6 pad to 8
# rows; 3 kv heads (f32) exercise the strided head rows, 4 (bf16) the paired-head uint32 view.
DECODE = [
    (8, 3, 3, 3, 64, jnp.float32, 2, None, None),
    (16, 3, 2, 4, 128, jnp.bfloat16, 1, 5.0, 0.2),
    (16, 1, 4, 6, 64, jnp.bfloat16, 2, None, None),
]


@pytest.mark.parametrize("page, batch, h, g, d, dtype, ppt, softcap, scale", DECODE)
def test_tpu_decode_attention_matches_reference(page, batch, h, g, d, dtype, ppt, softcap, scale):
    rng = np.random.default_rng()
    width = 4 * ppt
    pool = batch * width + 3
    k, v = cache(rng, heads=h, page=page, d=d, dtype=dtype, pool=pool)
    table = tables(rng, batch, width, pool)
    lengths = [int(rng.integers(1, width * page + 1)) for _ in range(batch)]
    if batch == 3:
        lengths[:2] = [0, page + 1]  # an idle slot; a length just past a page
    lens = jnp.asarray(lengths, jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, h, g, d)), dtype)
    layer, tile, opts = jnp.int32(1), page * ppt, {"scale": scale, "softcap": softcap}
    for window in windows_for(rng, page, max(lengths)):
        needed = [
            (b, t) for b, n in enumerate(lengths) for t in range(max(n - window, 0) // tile, -(-n // tile))
        ]
        kp, vp = poison_unread(k, v, table, needed, ppt)
        out = tpa.decode_attention(
            q, kp, vp, layer, window, lens, table, pages_per_tile=ppt, interpret=True, **opts
        )
        ref = decode_attention_reference(q, k, v, layer, jnp.int32(window), lens, table, **opts)
        assert out.shape == q.shape and np.isfinite(np.asarray(out, np.float32)).all(), window
        check_close(out, ref, dtype)
        if lengths[0] == 0:
            np.testing.assert_array_equal(np.asarray(out, np.float32)[0], 0.0)
    dense = dense_attention(q[-1:], k, v, 1, table[-1], [lengths[-1] - 1], lengths[-1], GLOBAL, **opts)
    check_close(ref[-1:], dense, dtype)


# (page, kv heads, G, head dim, dtype, cached prefix, new tokens, padded chunk, block_q, softcap,
# scale); tiles of 2 pages
PREFILL = [
    (8, 3, 3, 64, jnp.float32, 0, 20, 32, None, None, None),  # a first chunk, padded
    (16, 2, 4, 128, jnp.bfloat16, 37, 16, 16, 4, 5.0, 0.3),  # after a prefix, 16-row blocks
    (8, 1, 1, 64, jnp.float32, 13, 11, 16, 8, 8.0, None),  # one kv head, one query head
]


@pytest.mark.parametrize("page, h, g, d, dtype, start, n_new, t, block_q, softcap, scale", PREFILL)
def test_tpu_prefill_attention_matches_reference(
    page, h, g, d, dtype, start, n_new, t, block_q, softcap, scale
):
    rng = np.random.default_rng()
    width = -(-(start + t) // page) + 2
    width += width % 2
    k, v = cache(rng, heads=h, page=page, d=d, dtype=dtype, pool=width + 3)
    table = tables(rng, 1, width, width + 3)
    q = jnp.asarray(rng.standard_normal((t, h, g, d)), dtype)
    kv_len, tile, opts = start + n_new, 2 * page, {"scale": scale, "softcap": softcap}
    bq = block_q or tpa.prefill_block_q(t, g)
    for window in windows_for(rng, page, kv_len):
        needed = []
        for q0 in range(start, start + t, bq):
            stop = min(kv_len, q0 + bq)
            needed += [(0, i) for i in range(max(q0 - window + 1, 0) // tile, -(-stop // tile))]
        kp, vp = poison_unread(k, v, table, needed, 2)
        args = (jnp.int32(0), window, jnp.int32(start), jnp.int32(kv_len), table[0])
        out = tpa.prefill_attention(
            q, kp, vp, *args, block_q=block_q, pages_per_tile=2, interpret=True, **opts
        )
        ref = prefill_attention_reference(q, k, v, *args, **opts)
        out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
        assert out.shape == q.shape and np.isfinite(out).all(), window
        check_close(out[:n_new], ref[:n_new], dtype)
    dense = dense_attention(q[:n_new], k, v, 0, table[0], range(start, kv_len), kv_len, window, **opts)
    check_close(ref[:n_new], dense, dtype)


def test_runtime_dispatches_attention_to_the_tpu_kernels_and_falls_back_where_they_do_not_fit():
    """paged_attention with Kernels(platform="tpu") runs the Mosaic kernels (interpreted) for decode
    and prefill and agrees with the XLA path; caches they do not take (float16, an odd number of
    bfloat16 kv heads, pages of 4) run the XLA path, decided from shapes alone."""
    rng = np.random.default_rng()
    kernels = Kernels(attention="pallas", interpret=True, platform="tpu")
    assert kernels.pallas_platform == "tpu" and Kernels().pallas_platform == "gpu"  # CPU: Triton
    h, g, d, page, width = 2, 2, 64, 8, 8
    k, v = cache(rng, heads=h, page=page, d=d, dtype=jnp.float32, pool=2 * width)
    table = tables(rng, 2, width, 2 * width)
    kv = KVCache(k, v)
    window = jnp.int32(NO_WINDOW)
    # decode: 2 slots
    q = jnp.asarray(rng.standard_normal((2, 1, h, g, d)), jnp.float32)
    kv_len = jnp.asarray([5, 40], jnp.int32)
    args = (q, kv, jnp.int32(1), table, (kv_len - 1)[:, None], kv_len)
    want = paged_attention(*args, block=2 * page, window=window, softcap=4.0)
    got = paged_attention(*args, block=2 * page, window=window, softcap=4.0, kernels=kernels)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    # prefill: one sequence, a chunk of 16 at position 8
    q = jnp.asarray(rng.standard_normal((1, 16, h, g, d)), jnp.float32)
    q_pos, kv_len = (8 + jnp.arange(16))[None], jnp.asarray([20], jnp.int32)
    args = (q, kv, jnp.int32(0), table[:1], q_pos, kv_len)
    want = paged_attention(*args, block=2 * page, window=jnp.int32(6))
    got = paged_attention(*args, block=2 * page, window=jnp.int32(6), kernels=kernels)
    np.testing.assert_allclose(np.asarray(got)[:, :12], np.asarray(want)[:, :12], atol=1e-5, rtol=1e-5)
    assert tpa.unsupported(jnp.float16, 8, 16) and tpa.unsupported(jnp.bfloat16, 3, 16)
    assert tpa.unsupported(jnp.float32, 8, 4) and tpa.unsupported(jnp.bfloat16, 8, 8)
    assert tpa.unsupported(jnp.bfloat16, 8, 16) is None and tpa.unsupported(jnp.float32, 3, 8) is None
    odd = KVCache(*(jnp.zeros((1, 4, 16, 3, d), jnp.bfloat16) for _ in "kv"))
    q = jnp.ones((1, 1, 3, 1, d), jnp.bfloat16)
    jaxpr = lambda q, c: str(
        jax.make_jaxpr(
            lambda q, c: paged_attention(
                q,
                c,
                0,
                jnp.zeros((1, 4), jnp.int32),
                jnp.zeros((1, 1), jnp.int32),
                jnp.ones((1,), jnp.int32),
                block=64,
                kernels=kernels,
            )
        )(q, c)
    )
    assert "xlaserve_decode_attention" not in jaxpr(q, odd)  # the XLA path
    even = KVCache(*(jnp.zeros((1, 4, 16, 2, d), jnp.bfloat16) for _ in "kv"))
    assert "xlaserve_decode_attention" in jaxpr(jnp.ones((1, 1, 2, 1, d), jnp.bfloat16), even)


# -- quantized matmul ------------------------------------------------------------------------------

# (kind, group (k = per channel), M, K, N, activation dtype): GGUF Q4_0/Q4_1/Q8_0, the K-quants'
# groups of 16 with float32 scales (and mins), int8/int4 per channel from convert; K of 12288 (q4)
# takes three K-tiles, the others one tile with a partial scale block.
MATMUL = [
    ("q4_1", 32, 1, 512, 192, jnp.float32),
    ("q4_0", 32, 7, 256, 64, jnp.bfloat16),
    ("q4_1", 64, 33, 512, 256, jnp.bfloat16),
    ("q4_0", 128, 16, 512, 128, jnp.float32),
    ("q8_0", 32, 16, 512, 64, jnp.float32),
    ("q8_0", 16, 1, 256, 128, jnp.bfloat16),
    ("q8_1", 16, 17, 256, 128, jnp.float32),
    ("q8_0", "k", 1, 384, 192, jnp.bfloat16),
    ("q8_1", "k", 2, 256, 64, jnp.float32),
    ("q4_1", 32, 3, 12288, 128, jnp.float32),
]


@pytest.mark.parametrize("kind, group, m, k, n, dtype", MATMUL)
def test_tpu_quantized_matmul_matches_reference(kind, group, m, k, n, dtype):
    rng = np.random.default_rng()
    w = jax.tree.map(jnp.asarray, make_weight(rng, kind, n, k, k if group == "k" else group))
    if kind == "q4_1" and group == 32 and k > 4096:  # the K-quants' float32 scales and mins
        w = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float16 else a, w)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    out = np.asarray(tpm.quantized_matmul(x, *w.arrays, **w.layout, interpret=True))
    ref = np.asarray(quantized_matmul_reference(x, *w.arrays, **w.layout))
    assert out.shape == (m, n) and np.isfinite(out).all()
    dense = np.asarray(dequantize_reference(*w.arrays, **w.layout), np.float32)
    tol = TOL[dtype] * np.maximum(np.abs(np.asarray(x, np.float32)) @ np.abs(dense).T, 1.0)
    assert (np.abs(out - ref) <= tol).all(), float(np.max(np.abs(out - ref) / tol))


def test_runtime_dispatches_matmul_to_the_tpu_kernel_and_falls_back_where_it_does_not_fit():
    rng = np.random.default_rng()
    kernels = Kernels(matmul="pallas", interpret=True, platform="tpu")
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.float32)
    for n, k in ((128, 256), (64, 576)):  # 576 / 2 = 288 stored columns: not whole lanes -> XLA
        w = jax.tree.map(jnp.asarray, make_weight(rng, "q4_1", n, k, 32))
        xk = x[..., :k] if k <= 256 else jnp.asarray(rng.standard_normal((2, 3, k)), jnp.float32)
        got = linear(xk, w, kernels=kernels)
        want = linear(xk, w)
        assert got.shape == (2, 3, n)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3, rtol=1e-4)
        jaxpr = str(jax.make_jaxpr(lambda x, w: linear(x, w, kernels=kernels))(xk, w))
        assert ("xlaserve_quantized_matmul" in jaxpr) == (k == 256)
    assert tpm.unsupported(64, 576, "q4_1", 32, True) and tpm.unsupported(100, 256, "q8_0", 32, False)
    assert tpm.unsupported(4096, 4096, "q4_1", 32, True) is None


# -- lowering for TPU (Mosaic) ---------------------------------------------------------------------

S = jax.ShapeDtypeStruct
I32 = S((), jnp.int32)


def export_tpu(fn, *specs) -> str:
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*specs).mlir_module()


@pytest.mark.parametrize("d, dtype", [(64, jnp.bfloat16), (128, jnp.bfloat16), (128, jnp.float32)])
def test_tpu_attention_lowers_with_mosaic(d, dtype):
    """Llama-like shapes: 8 kv heads x 4 queries, page 16, a 512-token table (4 tiles of 128)."""
    h, g, page, layers, pages, b, width, t = 8, 4, 16, 4, 512, 8, 32, 128
    kv = S((layers, pages, page, h, d), dtype)
    decode = export_tpu(
        lambda q, k, v, layer, window, lengths, table: tpa.decode_attention(
            q, k, v, layer, window, lengths, table, softcap=50.0, interpret=False
        ),
        S((b, h, g, d), dtype),
        kv,
        kv,
        I32,
        I32,
        S((b,), jnp.int32),
        S((b, width), jnp.int32),
    )
    prefill = export_tpu(
        lambda q, k, v, layer, window, start, kv_len, row: tpa.prefill_attention(
            q, k, v, layer, window, start, kv_len, row, interpret=False
        ),
        S((t, h, g, d), dtype),
        kv,
        kv,
        I32,
        I32,
        I32,
        I32,
        S((width,), jnp.int32),
    )
    for text, name in ((decode, "xlaserve_decode_attention"), (prefill, "xlaserve_prefill_attention")):
        assert "tpu_custom_call" in text and name in text


# (kind, group, scale dtype, mins, M, N, K): decode and prefill tilings at Llama-3-8B shapes
LOWER_MATMUL = [
    ("q4_1", 32, jnp.float16, True, 1, 4096, 4096),  # GGUF Q4_1
    ("q4_0", 32, jnp.float16, False, 256, 14336, 4096),  # GGUF Q4_0 / convert int4 sym, prefill
    ("q4_1", 32, jnp.float32, True, 8, 4096, 14336),  # Q4_K (w_down: one K-tile, partial scales)
    ("q8_0", 32, jnp.float16, False, 16, 4096, 4096),  # GGUF Q8_0
    ("q8_0", 16, jnp.float32, True, 1, 4096, 14336),  # Q2_K-like: groups of 16 with mins
    ("q8_0", 4096, jnp.float32, False, 64, 4096, 4096),  # convert int8 per channel
    ("q8_0", 4096, jnp.float32, True, 1, 1024, 4096),  # convert int8 asym per channel
]


@pytest.mark.parametrize("kind, group, scale_dtype, mins, m, n, k", LOWER_MATMUL)
def test_tpu_quantized_matmul_lowers_with_mosaic(kind, group, scale_dtype, mins, m, n, k):
    four_bit = kind != "q8_0"
    data = S((n, k // 2 if four_bit else k), jnp.uint8 if four_bit else jnp.int8)
    scale = S((n, k // group), scale_dtype)
    text = export_tpu(
        lambda x, d, s, mn: tpm.quantized_matmul(x, d, s, mn, kind=kind, block=group, interpret=False),
        S((m, k), jnp.bfloat16),
        data,
        scale,
        scale if mins else None,
    )
    assert "tpu_custom_call" in text and f"xlaserve_quantized_matmul_{kind}" in text
