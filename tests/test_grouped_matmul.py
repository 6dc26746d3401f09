"""The grouped matmul kernels (pallas_kernels/grouped_matmul.py: Triton; tpu_grouped_matmul.py:
Mosaic, megablox for dense experts) in interpret mode on CPU, against their pure-jnp reference and
against jax.lax.ragged_dot on the dequantized weights: ragged group sizes with empty groups (first,
inner, last), several groups inside one row tile and groups crossing tile boundaries, rows past
sum(sizes) (which must come out zero), dense float32/bfloat16 experts and every packed layout; and
lowered for cuda (Triton) and tpu (Mosaic) on this CPU-only machine.

Interpret mode fills outputs with NaN before a kernel runs, so "finite everywhere" proves every
element was written."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas import TOL, make_weight

from xlaserve.pallas_kernels import grouped_matmul as gm
from xlaserve.pallas_kernels import tpu_grouped_matmul as tgm

KERNELS = {"gpu": gm.grouped_matmul, "tpu": tgm.grouped_matmul}


def ragged_sizes(rng, m: int, g: int) -> np.ndarray:
    """g group sizes summing to at most m (0-3 rows left past every group), groups 0 and g - 1
    (and one inner group when g > 3) empty."""
    total = m - int(rng.integers(0, 4))
    cuts = np.sort(rng.integers(0, total + 1, g - 3)) if g > 3 else np.array([total // 2])
    inner = np.diff(np.concatenate([[0], cuts, [total]]))  # g - 2 sizes (or 2 when g <= 3)
    sizes = np.concatenate([[0], inner, [0]])[:g] if g > 3 else np.concatenate([[0], inner])[:g]
    if g > 3:
        sizes[2] += sizes[1]  # group 1 empty too, its rows to group 2
        sizes[1] = 0
    assert sizes.sum() <= m and len(sizes) == g
    return sizes.astype(np.int32)


def experts(rng, kind, group, g, n, k, dtype):
    """(rhs, scale, mins, layout) of g experts [N, K], dense or packed."""
    if kind is None:
        return jnp.asarray(rng.standard_normal((g, n, k)) * 0.3, dtype), None, None, {}
    ws = [make_weight(rng, kind, n, k, k if group == "k" else group) for _ in range(g)]
    stack = lambda a: None if a[0] is None else jnp.asarray(np.stack(a))
    rhs, scale, mins = (stack([getattr(w, f) for w in ws]) for f in ("data", "scale", "min"))
    return rhs, scale, mins, ws[0].layout


# (kind, group (k = per channel), M, K, N, G, activation dtype)
CASES = [
    (None, None, 70, 256, 64, 6, jnp.float32),
    (None, None, 33, 256, 192, 4, jnp.bfloat16),  # bfloat16 experts
    ("q4_1", 32, 70, 256, 64, 6, jnp.float32),  # GGUF Q4_1 (Q4_K loads as it, float32 scales)
    ("q4_0", 64, 40, 256, 64, 5, jnp.bfloat16),
    ("q8_0", 32, 70, 256, 64, 6, jnp.bfloat16),  # GGUF Q8_0
    ("q8_0", "k", 40, 256, 64, 3, jnp.float32),  # convert-time int8 per channel
    ("q8_1", 16, 150, 256, 64, 8, jnp.float32),  # int8 with mins (Q2_K-like); > 128 rows: tiles
]


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("kind, group, m, k, n, g, dtype", CASES)
def test_grouped_matmul_matches_reference_and_ragged_dot(platform, kind, group, m, k, n, g, dtype):
    rng = np.random.default_rng()
    rhs, scale, mins, layout = experts(rng, kind, group, g, n, k, dtype)
    sizes = jnp.asarray(ragged_sizes(rng, m, g))
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    out = np.asarray(KERNELS[platform](x, rhs, sizes, scale, mins, **layout, interpret=True))
    ref = np.asarray(gm.grouped_matmul_reference(x, rhs, sizes, scale, mins, **layout))
    assert out.shape == (m, n) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out[int(sizes.sum()) :], 0.0)
    # the rounding bound of each output: eps x sum_k |x_k w_nk| over its group's weights
    w = np.asarray(gm.dequantize_experts(rhs, scale, mins, **layout))
    row_group = np.minimum(np.searchsorted(np.cumsum(sizes), np.arange(m), side="right"), g - 1)
    terms = np.einsum("mk,mnk->mn", np.abs(np.asarray(x, np.float32)), np.abs(w[row_group]))
    tol = TOL[dtype] * np.maximum(terms, 1.0)
    assert (np.abs(out - ref) <= tol).all(), float(np.max(np.abs(out - ref) / tol))
    # jax.lax.ragged_dot, the XLA path, on the same (dequantized) weights
    ragged = jax.lax.ragged_dot(
        x.astype(jnp.float32), jnp.asarray(w).transpose(0, 2, 1), sizes, precision=jax.lax.Precision.HIGHEST
    )
    assert (np.abs(out - np.asarray(ragged)) <= tol).all()


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("kind", [None, "q4_1"])
def test_all_groups_empty_gives_zeros(platform, kind):
    rng = np.random.default_rng(0)
    rhs, scale, mins, layout = experts(rng, kind, 32, 4, 64, 256, jnp.float32)
    x = jnp.asarray(rng.standard_normal((40, 256)), jnp.float32)
    out = KERNELS[platform](x, rhs, jnp.zeros((4,), jnp.int32), scale, mins, **layout, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_row_tiles_know_the_groups_that_meet_them():
    """Tiles of 4 rows over sizes [0, 3, 0, 6, 1] (rows 10, 11 past every group): tile 0 loops
    over groups 1 to 3 (2 is empty: no K-steps), tile 1 over 3, tile 2 over 3 and 4, tile 3 over
    none (first 5 > last 4)."""
    offsets, tiles = gm.tile_groups(jnp.asarray([0, 3, 0, 6, 1]), 16, 4)
    assert offsets.tolist() == [0, 0, 3, 3, 9, 10]
    assert tiles.tolist() == [[1, 3, 3, 5], [3, 3, 4, 4]]  # [first, last] x tiles


# -- lowering on CPU for cuda (Triton) and tpu (Mosaic), Qwen3-30B-A3B's expert shapes -----------

S = jax.ShapeDtypeStruct
E, F, D = 128, 768, 2048  # experts, expert ffn, hidden


def weights(kind, group, n, k):
    """(rhs, scale, mins) shapes of E experts [n, k] in a layout; group "k": per channel."""
    if kind is None:
        return S((E, n, k), jnp.bfloat16), None, None
    block = k if group == "k" else group
    data = S((E, n, k // 2), jnp.uint8) if kind.startswith("q4") else S((E, n, k), jnp.int8)
    scale = S((E, n, k // block), jnp.float32 if kind == "q8_1" or group == "k" else jnp.float16)
    return data, scale, scale if kind in ("q4_1", "q8_1") else None


STORED = {"q4_1": "q4_1", "q4_0": "q4_0", "q8_0": "q8_0", "q8_1": "q8_0"}  # q8_1: int8 with mins
LOWER = [(None, None), ("q4_1", 32), ("q4_0", 32), ("q8_0", 32), ("q8_0", "k"), ("q8_1", 16)]


def lowered(platform, kind, group, m, n, k) -> str:
    rhs, scale, mins = weights(kind, group, n, k)
    layout = {} if kind is None else {"kind": STORED[kind], "block": k if group == "k" else group}
    fn = functools.partial(KERNELS[platform], **layout, interpret=False)
    args = (S((m, k), jnp.bfloat16), rhs, S((E,), jnp.int32), scale, mins)
    if platform == "tpu":
        return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("kind, group", LOWER)
def test_triton_grouped_matmul_lowers_for_cuda(kind, group):
    for n, k in ((F, D), (D, F)):  # gate/up, down
        text = lowered("gpu", kind, group, 512, n, k)
        assert "__gpu$xla.gpu.triton" in text and "_grouped_kernel" in text


@pytest.mark.parametrize("kind, group", LOWER)
def test_mosaic_grouped_matmul_lowers_for_tpu(kind, group):
    for n, k in ((F, D), (D, F)):
        text = lowered("tpu", kind, group, 512, n, k)
        assert "tpu_custom_call" in text
        assert kind is None or f"xlaserve_grouped_matmul_{STORED[kind]}" in text
