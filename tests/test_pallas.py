"""Our Pallas kernels in interpret mode (CPU) against their pure-jnp references, on a pairwise grid
of shapes, with fresh random inputs each run. Interpret mode fills every output with NaN before the
kernel runs (jax's `uninitialized_value`), so "finite everywhere" proves every element was written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.pallas_kernels.paged_attention import (
    decode_attention,
    decode_attention_reference,
    prefill_attention,
    prefill_attention_reference,
)
from xlaserve.pallas_kernels.quantized_matmul import (
    dequantize_reference,
    pack_int4,
    quantized_matmul,
    quantized_matmul_reference,
    unpack_int4,
)
from xlaserve.runtime.quant import QuantArray, dequantize
from xlaserve.runtime.quant_layouts import unpack

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
GLOBAL = 2**30  # the window the caller passes for a global layer


def paged_case(rng, *, batch, page, g, d, dtype, lengths, width):
    """A cache with random values everywhere, page tables that are random, non-contiguous and
    share their first page between sequences."""
    layers, h, pool = 2, 2, batch * width + 4
    k = jnp.asarray(rng.standard_normal((layers, pool, page, h, d)), dtype)
    v = jnp.asarray(rng.standard_normal((layers, pool, page, h, d)), dtype)
    table = np.stack([rng.permutation(pool)[:width] for _ in range(batch)]).astype(np.int32)
    table[:, 0] = table[0, 0]  # a shared prefix page
    q = jnp.asarray(rng.standard_normal((batch, h, g, d)), dtype)
    return q, k, v, jnp.asarray(table), jnp.asarray(lengths, jnp.int32)


def dense_attention(q, k, v, layer, page_row, q_pos, kv_len, window, *, scale=None, softcap=None):
    """An independent check of the references, in float64 numpy: q [n, H, G, D] at positions
    q_pos [n]; the keys at positions 0 .. kv_len-1 are gathered one by one through page_row, and
    key p is visible to the query at t iff p <= t, p < kv_len and t - p < window."""
    q, k, v = (np.asarray(x, np.float32).astype(np.float64) for x in (q, k, v))
    page_row = np.asarray(page_row)
    page, d = k.shape[2], q.shape[-1]
    kk = np.array([k[layer, page_row[p // page], p % page] for p in range(kv_len)]).reshape(-1, *k.shape[3:])
    vv = np.array([v[layer, page_row[p // page], p % page] for p in range(kv_len)]).reshape(-1, *v.shape[3:])
    out = np.zeros(q.shape)
    for i, t in enumerate(q_pos):
        seen = [p for p in range(kv_len) if p <= t and t - p < window]
        if not seen:
            continue
        s = np.einsum("hgd,shd->hgs", q[i], kk[seen]) * (d**-0.5 if scale is None else scale)
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        w = np.exp(s - s.max(axis=-1, keepdims=True))
        out[i] = np.einsum("hgs,shd->hgd", w / w.sum(axis=-1, keepdims=True), vv[seen])
    return out


def poison_unread(k, v, table, tiles, ppt):
    """NaN in every page that is not in one of the page tiles `tiles` ((row, tile) pairs) the
    kernel may read: if it touched one, its output would be NaN (0 * NaN in p @ v)."""
    keep = {int(p) for row, t in tiles for p in np.asarray(table)[row, t * ppt : (t + 1) * ppt]}
    bad = np.array([p not in keep for p in range(k.shape[1])])[None, :, None, None, None]
    return jnp.where(bad, jnp.nan, k), jnp.where(bad, jnp.nan, v)


def windows_for(rng, page, context):
    """1; not a multiple of the page (nor the tile); random; equal to the context; global."""
    return [1, page + 3, int(rng.integers(2, 2 * context + 3)), context, GLOBAL]


def check_close(out, ref, dtype):
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=TOL[dtype], rtol=TOL[dtype]
    )


# (page size, batch, group G, head dim, dtype, splits, pages per tile, softcap, scale): pairwise over
# the axes; G 3 and 6 are not powers of two; 3 splits do not divide the tiles.
DECODE = [
    (8, 3, 3, 64, jnp.float32, 1, 2, None, None),
    (16, 1, 1, 128, jnp.bfloat16, 3, 2, 5.0, None),
    (32, 3, 4, 64, jnp.bfloat16, 2, 1, None, 0.2),
    (16, 3, 6, 128, jnp.float32, 3, 2, 8.0, 0.25),
    (8, 1, 8, 256, jnp.float32, 2, 4, None, None),
    (128, 3, 2, 64, jnp.float32, 1, 1, 5.0, None),
    (64, 3, 3, 128, jnp.bfloat16, 2, 1, None, None),
]


@pytest.mark.parametrize("page, batch, g, d, dtype, splits, ppt, softcap, scale", DECODE)
def test_decode_attention_matches_reference(page, batch, g, d, dtype, splits, ppt, softcap, scale):
    """For several sliding windows (one compile: the window is traced), the kernel against the
    reference, reading only the tiles its window can see; the reference against dense numpy."""
    rng = np.random.default_rng()
    width = 4 * ppt * 2
    edge = [0, 1, page - 1, page, page + 1, int(rng.integers(1, width * page + 1))]
    lengths = [edge[(i + int(rng.integers(6))) % 6] for i in range(batch)]
    if batch == 3:
        lengths[0] = 0  # an idle slot in every multi-slot case
        lengths[-1] = int(rng.integers(4 * page, width * page + 1))  # a context longer than a tile
    q, k, v, table, lens = paged_case(
        rng, batch=batch, page=page, g=g, d=d, dtype=dtype, lengths=lengths, width=width
    )
    layer, tile, opts = jnp.int32(1), page * ppt, {"scale": scale, "softcap": softcap}
    for window in windows_for(rng, page, max(lengths)):
        needed = [
            (b, t) for b, n in enumerate(lengths) for t in range(max(n - window, 0) // tile, -(-n // tile))
        ]
        kp, vp = poison_unread(k, v, table, needed, ppt)
        out = decode_attention(
            q, kp, vp, layer, window, lens, table, pages_per_tile=ppt, splits=splits, interpret=True, **opts
        )
        ref = decode_attention_reference(q, k, v, layer, jnp.int32(window), lens, table, **opts)
        assert np.isfinite(np.asarray(out, np.float32)).all(), window
        check_close(out, ref, dtype)
        dense = [
            dense_attention(q[b : b + 1], k, v, 1, table[b], [n - 1], n, window, **opts)[0]
            for b, n in enumerate(lengths)
        ]
        check_close(ref, np.stack(dense), dtype)
        if lengths[0] == 0:
            np.testing.assert_array_equal(np.asarray(out, np.float32)[0], 0.0)


# (page size, G, head dim, dtype, cached prefix tokens, new tokens, padded chunk, block_q, softcap,
# scale); prefill tiles are 4 pages.
PREFILL = [
    (16, 3, 64, jnp.float32, 0, 20, 32, 16, None, None),  # a first chunk, padded
    (8, 4, 128, jnp.bfloat16, 37, 16, 16, 16, 5.0, None),  # after a prefix (a cache hit or an earlier chunk)
    (16, 1, 64, jnp.float32, 144, 32, 32, 16, None, 0.3),  # a long prefix; starts on a page boundary
    (32, 6, 64, jnp.float32, 5, 7, 16, 4, 8.0, 0.2),  # G 6 -> 8 rows per token
]


@pytest.mark.parametrize("page, g, d, dtype, start, n_new, t, block_q, softcap, scale", PREFILL)
def test_prefill_attention_matches_reference(page, g, d, dtype, start, n_new, t, block_q, softcap, scale):
    """As the decode test: several windows, kernel vs reference vs dense numpy, and no reads of
    tiles below the window of every query of a block."""
    rng = np.random.default_rng()
    width = -(-(start + t) // page) + 4
    width += (-width) % 4
    q, k, v, table, _ = paged_case(rng, batch=1, page=page, g=g, d=d, dtype=dtype, lengths=[0], width=width)
    q = jnp.asarray(rng.standard_normal((t, 2, g, d)), dtype)
    kv_len, tile, opts = start + n_new, 4 * page, {"scale": scale, "softcap": softcap}
    for window in windows_for(rng, page, kv_len):
        needed = []
        for q0 in range(start, start + t, block_q):
            stop = min(kv_len, q0 + block_q)
            needed += [(0, i) for i in range(max(q0 - window + 1, 0) // tile, -(-stop // tile))]
        kp, vp = poison_unread(k, v, table, needed, 4)
        args = (jnp.int32(0), window, jnp.int32(start), jnp.int32(kv_len), table[0])
        out = prefill_attention(q, kp, vp, *args, block_q=block_q, pages_per_tile=4, interpret=True, **opts)
        ref = prefill_attention_reference(q, k, v, *args, **opts)
        out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
        assert np.isfinite(out).all(), window
        check_close(out[:n_new], ref[:n_new], dtype)
        positions = range(start, start + n_new)
        dense = dense_attention(q[:n_new], k, v, 0, table[0], positions, kv_len, window, **opts)
        check_close(ref[:n_new], dense, dtype)


# -- quantized matmul ------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_pack_unpack_round_trip_is_bit_exact(group):
    rng = np.random.default_rng()
    q = rng.integers(0, 16, (24, 4 * group), dtype=np.uint8)
    packed = pack_int4(q, group)
    assert packed.shape == (24, 2 * group) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_int4(packed, group), q)
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(packed), group)), q)
    if group == 32:  # the same layout as GGUF's Q4_0/Q4_1 blocks
        w = QuantArray(packed, np.ones((24, 4), np.float16), np.zeros((24, 4), np.float16), kind="q4_1")
        np.testing.assert_array_equal(unpack(w).data, q)


def make_weight(rng, kind: str, n: int, k: int, group: int) -> QuantArray:
    """Random quantized weights with awkward blocks: some all-zero scales, large magnitudes and
    negative mins. "q8_1" is int8 with a min (asymmetric int8, float32 scales as GGUF's K-quants
    load)."""
    blocks = k // group
    scale = (rng.standard_normal((n, blocks)) * 0.05).astype(np.float16)
    scale[0, 0] = 0.0
    scale[1, :] *= 100
    if kind in ("q8_0", "q8_1"):
        mins = (
            (-np.abs(rng.standard_normal((n, blocks))) * 0.3).astype(np.float32) if kind == "q8_1" else None
        )
        scale = scale.astype(np.float32) if kind == "q8_1" else scale
        return QuantArray(
            rng.integers(-127, 128, (n, k), dtype=np.int8), scale, mins, kind="q8_0", block=group
        )
    data = pack_int4(rng.integers(0, 16, (n, k), dtype=np.uint8), group)
    mins = (-np.abs(rng.standard_normal((n, blocks))) * 0.3).astype(np.float16) if kind == "q4_1" else None
    return QuantArray(data, scale, mins, kind=kind, block=group)


# (kind, group (k = per channel), M, K, N, activation dtype)
MATMUL = [
    ("q4_1", 32, 1, 576, 192, jnp.float32),
    ("q4_0", 32, 7, 256, 64, jnp.bfloat16),
    ("q4_1", 64, 16, 256, 192, jnp.bfloat16),
    ("q4_1", 128, 33, 512, 64, jnp.float32),
    ("q8_0", 32, 16, 576, 64, jnp.float32),
    ("q8_0", "k", 1, 256, 192, jnp.bfloat16),
    ("q8_0", "k", 33, 576, 64, jnp.float32),
    ("q4_0", 64, 1, 512, 128, jnp.float32),
    ("q8_0", 16, 1, 512, 64, jnp.bfloat16),  # GGUF Q6_K/Q3_K's groups of 16
    ("q8_1", 16, 16, 256, 128, jnp.float32),  # Q2_K: groups of 16 with mins
    ("q8_1", 32, 33, 512, 64, jnp.bfloat16),  # Q5_1/Q5_K: int8 with mins, prefill tiling
]


@pytest.mark.parametrize("kind, group, m, k, n, dtype", MATMUL)
def test_quantized_matmul_matches_reference(kind, group, m, k, n, dtype):
    rng = np.random.default_rng()
    w = make_weight(rng, kind, n, k, k if group == "k" else group)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    wj = jax.tree.map(jnp.asarray, w)
    out = np.asarray(quantized_matmul(x, *wj.arrays, **wj.layout, interpret=True))
    ref = np.asarray(quantized_matmul_reference(x, *wj.arrays, **wj.layout))
    assert out.shape == (m, n) and np.isfinite(out).all()
    # rounding error bound of each output: eps x sum_k |x_k w_nk| (the signed sum can cancel to
    # much less than the terms, so a bound on |ref| alone flakes in bfloat16)
    dense = np.asarray(dequantize_reference(*wj.arrays, **wj.layout), np.float32)
    terms = np.abs(np.asarray(x, np.float32)) @ np.abs(dense).T
    tol = TOL[dtype] * np.maximum(terms, 1.0)
    assert (np.abs(out - ref) <= tol).all(), float(np.max(np.abs(out - ref) / tol))


@pytest.mark.parametrize(
    "kind, group", [("q4_1", 32), ("q4_0", 64), ("q8_0", 32), ("q8_0", "k"), ("q8_0", 16), ("q8_1", 16)]
)
def test_reference_dequantizes_exactly_like_the_model(kind, group):
    """The kernel's reference (which takes plain arrays) and the model's dequantization, packed and
    unpacked, give the same weights bit for bit."""
    rng = np.random.default_rng()
    w = make_weight(rng, kind, 8, 64, 64 if group == "k" else group)
    a = np.asarray(dequantize(jax.tree.map(jnp.asarray, w)))
    b = np.asarray(dequantize(unpack(w)))
    c = np.asarray(dequantize_reference(*jax.tree.map(jnp.asarray, w).arrays, **w.layout))
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    np.testing.assert_array_equal(a.view(np.uint32), c.view(np.uint32))


def test_smollm2_greedy_through_the_kernels_equals_the_xla_path(llm, model_path):
    """The real model with both kernels (interpret mode) against the default XLA engine."""
    from helpers import SMALL_ENGINE

    from xlaserve import LLM, SamplingParams

    kernels = LLM(str(model_path), **SMALL_ENGINE, attention_impl="pallas", matmul_impl="pallas")
    assert kernels.engine.st.kernels.attention == kernels.engine.st.kernels.matmul == "pallas"
    assert kernels.engine.weights.layers.w_up.packed  # the kernel reads GGUF's packed nibbles
    prompts = ["The capital of France is", "def add(a, b):"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ours = [o.token_ids for o in kernels.generate(prompts, params)]
    assert ours == [o.token_ids for o in llm.generate(prompts, params)]


# -- lowering for GPU (Triton), on any machine -----------------------------------------------------


def export_cuda(fn, *specs) -> str:
    """`jax.export` for CUDA runs the Pallas -> Triton lowering here (no GPU needed) and raises
    Triton's constraint errors; PTX compilation still needs a GPU."""
    from jax.experimental.pallas import triton as pltriton

    target = getattr(pltriton, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
    checks = [jax.export.DisabledSafetyCheck.custom_call(target)]
    return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*specs).mlir_module()


def test_triton_kernels_lower_for_cuda():
    """Llama-like shapes: 8 kv heads x 4 queries, head_dim 128, page 16, bfloat16; Q4_1 and int8."""
    s, i32 = jax.ShapeDtypeStruct, jax.ShapeDtypeStruct((), jnp.int32)
    kv = s((2, 64, 16, 8, 128), jnp.bfloat16)
    texts = [
        export_cuda(
            lambda q, k, v, layer, window, lengths, table: decode_attention(
                q, k, v, layer, window, lengths, table, splits=2, softcap=30.0, interpret=False
            ),
            s((4, 8, 4, 128), jnp.bfloat16),
            kv,
            kv,
            i32,
            i32,
            s((4,), jnp.int32),
            s((4, 16), jnp.int32),
        ),
        export_cuda(
            lambda q, k, v, layer, window, start, kv_len, row: prefill_attention(
                q, k, v, layer, window, start, kv_len, row, interpret=False
            ),
            s((64, 8, 4, 128), jnp.bfloat16),
            kv,
            kv,
            i32,
            i32,
            i32,
            i32,
            s((16,), jnp.int32),
        ),
    ]
    for kind, block, data, mins in (
        ("q4_1", 32, s((512, 1024), jnp.uint8), True),
        ("q8_0", 2048, s((512, 2048), jnp.int8), False),
    ):
        scale = s((512, 2048 // block), jnp.float16 if block == 32 else jnp.float32)
        for m in (1, 64):
            texts.append(
                export_cuda(
                    functools.partial(quantized_matmul, kind=kind, block=block, interpret=False),
                    s((m, 2048), jnp.bfloat16),
                    data,
                    scale,
                    scale if mins else None,
                )
            )
    assert all("triton" in text for text in texts)
