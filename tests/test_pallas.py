"""Our Pallas kernels in interpret mode (CPU) against their pure-jnp references, on a pairwise grid
of shapes, with fresh random inputs each run. Interpret mode fills every output with NaN before the
kernel runs (jax's `uninitialized_value`), so "finite everywhere" proves every element was written.
"""

from __future__ import annotations

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
from xlaserve.runtime.quant import QuantArray, dequantize, unpack

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


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


# (page size, batch, group G, head dim, dtype, splits, pages per tile): pairwise over the axes; G 3
# and 6 are not powers of two; 3 splits do not divide the tiles.
DECODE = [
    (8, 3, 3, 64, jnp.float32, 1, 2),
    (16, 1, 1, 128, jnp.bfloat16, 3, 2),
    (32, 3, 4, 64, jnp.bfloat16, 2, 1),
    (16, 3, 6, 128, jnp.float32, 3, 2),
    (8, 1, 8, 256, jnp.float32, 2, 4),
    (128, 3, 2, 64, jnp.float32, 1, 1),
    (64, 3, 3, 128, jnp.bfloat16, 2, 1),
]


@pytest.mark.parametrize("page, batch, g, d, dtype, splits, ppt", DECODE)
def test_decode_attention_matches_reference(page, batch, g, d, dtype, splits, ppt):
    rng = np.random.default_rng()
    width = 4 * ppt * 2
    edge = [0, 1, page - 1, page, page + 1, int(rng.integers(1, width * page + 1))]
    lengths = [edge[(i + int(rng.integers(6))) % 6] for i in range(batch)]
    if batch == 3:
        lengths[0] = 0  # an idle slot in every multi-slot case
    q, k, v, table, lens = paged_case(
        rng, batch=batch, page=page, g=g, d=d, dtype=dtype, lengths=lengths, width=width
    )
    layer = jnp.int32(1)
    out = decode_attention(q, k, v, layer, lens, table, pages_per_tile=ppt, splits=splits, interpret=True)
    ref = decode_attention_reference(q, k, v, layer, lens, table)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=TOL[dtype], rtol=TOL[dtype]
    )
    if lengths[0] == 0:
        np.testing.assert_array_equal(np.asarray(out, np.float32)[0], 0.0)


# (page size, G, head dim, dtype, cached prefix tokens, new tokens, padded chunk, block_q)
PREFILL = [
    (16, 3, 64, jnp.float32, 0, 20, 32, 16),  # a first chunk, padded
    (8, 4, 128, jnp.bfloat16, 37, 16, 16, 16),  # after a prefix (a cache hit or an earlier chunk)
    (16, 1, 64, jnp.float32, 16, 32, 32, 16),  # starts on a page boundary
    (32, 6, 64, jnp.float32, 5, 7, 16, 4),  # G 6 -> 8 rows per token
]


@pytest.mark.parametrize("page, g, d, dtype, start, n_new, t, block_q", PREFILL)
def test_prefill_attention_matches_reference(page, g, d, dtype, start, n_new, t, block_q):
    rng = np.random.default_rng()
    width = -(-(start + t) // page) + 4
    width += (-width) % 4
    q, k, v, table, _ = paged_case(rng, batch=1, page=page, g=g, d=d, dtype=dtype, lengths=[0], width=width)
    q = jnp.asarray(rng.standard_normal((t, 2, g, d)), dtype)
    args = (q, k, v, jnp.int32(0), jnp.int32(start), jnp.int32(start + n_new), table[0])
    out = prefill_attention(*args, block_q=block_q, pages_per_tile=4, interpret=True)
    ref = prefill_attention_reference(*args)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:n_new], ref[:n_new], atol=TOL[dtype], rtol=TOL[dtype])


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
    scale = max(1.0, float(np.abs(ref).max()))
    tol = TOL[dtype] * scale if dtype == jnp.bfloat16 else 1e-5 * scale
    np.testing.assert_allclose(out, ref, atol=tol, rtol=TOL[dtype])


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
    from helpers import TEST_ENGINE

    from xlaserve import LLM, SamplingParams

    kernels = LLM(
        str(model_path),
        **{**TEST_ENGINE, "max_slots": 2, "prefill_buckets": (32,)},
        attention_impl="pallas",
        matmul_impl="pallas",
        scoring=False,
    )
    assert kernels.engine.st.kernels.attention == kernels.engine.st.kernels.matmul == "pallas"
    assert kernels.engine.weights.layers.w_up.packed  # the kernel reads GGUF's packed nibbles
    prompts = ["The capital of France is", "def add(a, b):"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ours = [o.token_ids for o in kernels.generate(prompts, params)]
    assert ours == [o.token_ids for o in llm.generate(prompts, params)]
