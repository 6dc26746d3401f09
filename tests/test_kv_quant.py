"""The quantized KV cache (`kv_cache_dtype` int8 / fp8): K/V stored in 8 bits with a float32 scale
per token and kv head.

- quantize/dequantize round trip within half a step (int8) or e4m3's relative precision (fp8);
- attention over a quantized cache equals attention over the full-precision cache it stands for
  (the dequantized one), on the XLA path and in our Triton kernels (interpret mode), decode and
  prefill, with windows and softcap; and stays close to the unquantized original;
- the Triton kernels with scales lower for cuda;
- the memory plan: a quantized cache fits about twice the tokens of a bfloat16 one;
- bad values are refused naming the field; fp8 on CPU is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_memory import planned
from test_pallas import export_cuda

from xlaserve.pallas_kernels import paged_attention as pk
from xlaserve.runtime.attention import (
    KV_FORMATS,
    KVCache,
    dequantize_kv,
    paged_attention,
    quantize_kv,
    token_slots,
    write_kv,
)
from xlaserve.runtime.config import EngineConfig
from xlaserve.runtime.kv_smoothing import FLOOR, pair_divisors
from xlaserve.runtime.models.presets import PRESETS

L, N, P, H, G, D = 2, 24, 8, 2, 3, 32
W = 8  # pages per sequence
FORMATS = ["int8", "fp8"]


def quantized(cache: KVCache, kind: str, smooth=None) -> KVCache:
    """The cache as write_kv would store it: keys divided by `smooth` [L, H, D] (when given)."""
    dtype = KV_FORMATS[kind][0]
    keys = cache.k if smooth is None else cache.k / smooth[:, None, None]
    (k, ks), (v, vs) = quantize_kv(keys, dtype), quantize_kv(cache.v, dtype)
    return KVCache(k, v, ks, vs, smooth)


def random_cache(rng, lengths):
    """Random K/V (outliers in one channel, as real keys have) and non-contiguous page tables."""
    k = rng.standard_normal((L, N, P, H, D)).astype(np.float32)
    k[..., 3] *= 4.0
    v = rng.standard_normal((L, N, P, H, D)).astype(np.float32)
    table = np.stack([rng.permutation(N)[:W] for _ in lengths]).astype(np.int32)
    return KVCache(jnp.asarray(k), jnp.asarray(v)), jnp.asarray(table), jnp.asarray(lengths, jnp.int32)


@pytest.mark.parametrize("kind", FORMATS)
def test_round_trip_error_is_within_the_formats_step(kind):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 7, 64)) * rng.uniform(0.01, 100, (5, 7, 1)), jnp.float32)
    x = x.at[0, 0].set(0.0)  # an all-zero head: scale 0, no NaN
    stored, scale = quantize_kv(x, KV_FORMATS[kind][0])
    assert stored.dtype == KV_FORMATS[kind][0] and scale.shape == (5, 7) and scale.dtype == jnp.float32
    back = np.asarray(stored.astype(jnp.float32) * scale[..., None])
    err, x, scale = np.abs(back - np.asarray(x)), np.asarray(x), np.asarray(scale)
    assert np.isfinite(back).all() and (back[0, 0] == 0).all()
    if kind == "int8":
        assert (err <= scale[..., None] / 2 * (1 + 1e-5)).all()  # rounding: half a step
    else:
        # e4m3: 3 mantissa bits, relative error ≤ 2**-4 above its normal range's bottom
        normal = np.abs(x) / scale[..., None].clip(1e-30) >= 2**-6
        assert (err[normal] <= np.abs(x[normal]) * 2**-4 * (1 + 1e-5)).all()
    assert np.abs(np.asarray(stored, np.float32)).max() <= KV_FORMATS[kind][1]


@pytest.mark.parametrize("kind", FORMATS)
def test_write_kv_quantizes_with_scales_and_drops_padding(kind):
    rng = np.random.default_rng(1)
    shape = (L, N, P, H, D)
    cache = KVCache.abstract(shape, "float32", kind)
    cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cache)
    smooth = jnp.asarray(rng.uniform(0.5, 4.0, (L, H, D)), jnp.float32)
    cache = KVCache(cache.k, cache.v, cache.k_scale, cache.v_scale, smooth)
    table = jnp.asarray([[5, 9] + [0] * (W - 2)], jnp.int32)
    pos = jnp.asarray([[6, 7, 8, 9]])
    valid = jnp.asarray([[True, True, True, False]])
    pages, offs = token_slots(table, pos, valid, P, N)
    k = jnp.asarray(rng.standard_normal((1, 4, H, D)), jnp.float32)
    out = write_kv(cache, 1, k, 2 * k, pages, offs)
    full = dequantize_kv(out)
    # a step is max|k / s| / 127 (or e4m3's) in stored units, times s (≤ 4) back in k's
    np.testing.assert_allclose(full.k[1, 5, 6:8], k[0, :2], rtol=0.07, atol=0.15)
    np.testing.assert_allclose(full.v[1, 9, 0], 2 * k[0, 2], rtol=0.07, atol=0.04)
    assert np.count_nonzero(np.asarray(out.k_scale)) == 3 * H  # three tokens written, padding dropped
    stored = np.asarray(out.k[1, 5, 6], np.float32) * np.asarray(out.k_scale[1, 5, 6])[:, None]
    np.testing.assert_allclose(stored, k[0, 0] / smooth[1], rtol=0.07, atol=0.02)  # divided, then quantized


CASES = [  # (window, softcap, scale)
    (None, None, None),
    (P + 3, 20.0, 0.3),
]


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("window, softcap, scale", CASES)
def test_xla_attention_over_a_quantized_cache(kind, window, softcap, scale):
    """Decode rows and a prefill chunk, keys smoothed: equal to the dequantized cache's attention
    (the same numbers, computed another way) and close to the original's."""
    rng = np.random.default_rng()
    lengths = [0, 1, P + 1, W * P - 3]
    cache, table, kv_len = random_cache(rng, lengths)
    smooth = np.ones((L, H, D), np.float32)
    smooth[..., [3, 3 + D // 2]] = 4.0  # the outlier channel's rotary pair
    qc = quantized(cache, kind, jnp.asarray(smooth))
    run = jax.jit(paged_attention, static_argnames=("block", "scale", "softcap"))
    opts = dict(window=window, scale=scale, softcap=softcap)
    for t, q_pos in ((1, jnp.maximum(kv_len - 1, 0)[:, None]), (16, jnp.asarray(lengths)[:, None] - 16)):
        q_pos = jnp.maximum(q_pos, 0) + jnp.arange(t)[None]
        q = jnp.asarray(rng.standard_normal((len(lengths), t, H, G, D)), jnp.float32)
        for block in (W * P, 2 * P):
            out = run(q, qc, 1, table, q_pos, kv_len, block=block, **opts)
            same = run(q, dequantize_kv(qc), 1, table, q_pos, kv_len, block=block, **opts)
            orig = run(q, cache, 1, table, q_pos, kv_len, block=block, **opts)
            np.testing.assert_allclose(out, same, atol=2e-5, rtol=2e-5)
            rel = np.linalg.norm(np.asarray(out) - orig) / np.linalg.norm(orig)
            assert rel < (0.015 if kind == "int8" else 0.05), rel  # measured: ~0.007, ~0.03
            assert np.asarray(out)[0].max() == 0 == np.asarray(out)[0].min() or t > 1


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("window, softcap, scale", CASES)
def test_triton_kernels_over_a_quantized_cache(kind, window, softcap, scale):
    """Our Pallas kernels (interpret mode) read the stored K/V and scales: equal to their
    references over the dequantized cache."""
    rng = np.random.default_rng()
    lengths = [1, P + 1, W * P - 3]
    cache, table, kv_len = random_cache(rng, lengths)
    qc, win = quantized(cache, kind), window or 2**30
    full = dequantize_kv(qc)
    opts = dict(scale=scale, softcap=softcap)
    q = jnp.asarray(rng.standard_normal((len(lengths), H, G, D)), jnp.float32)
    out = pk.decode_attention(
        q, qc.k, qc.v, 1, win, kv_len, table, qc.k_scale, qc.v_scale, pages_per_tile=2, splits=2, **opts
    )
    ref = pk.decode_attention_reference(q, full.k, full.v, 1, win, kv_len, table, **opts)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    qp = jnp.asarray(rng.standard_normal((16, H, G, D)), jnp.float32)
    start, n = 13, 16
    out = pk.prefill_attention(
        qp, qc.k, qc.v, 0, win, start, start + n, table[2], qc.k_scale, qc.v_scale, pages_per_tile=2, **opts
    )
    ref = pk.prefill_attention_reference(qp, full.k, full.v, 0, win, start, start + n, table[2], **opts)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_pair_divisors_flatten_the_large_rotary_pairs():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 64, 3, 16)).astype(np.float32)
    keys[1, :, 2, 5] += 100.0  # a bias-like channel: large in every token
    s = pair_divisors(keys)
    assert s.shape == (2, 3, 16) and s.dtype == np.float32
    np.testing.assert_array_equal(s[..., :8], s[..., 8:])  # one divisor per rotary pair
    assert s[1, 2, 5] > 50 and s[1, 2, 13] == s[1, 2, 5]
    assert np.median(s, axis=-1) == pytest.approx(1.0) and (s >= FLOOR).all()
    flat = keys / s[:, None]
    assert np.abs(flat[1, :, 2]).max(axis=0).max() < 10  # the pair no longer dominates its head


@pytest.mark.parametrize("kind", FORMATS)
def test_triton_kernels_with_scales_lower_for_cuda(kind):
    s, i32 = jax.ShapeDtypeStruct, jax.ShapeDtypeStruct((), jnp.int32)
    kv, sc = s((2, 64, 16, 8, 128), KV_FORMATS[kind][0]), s((2, 64, 16, 8), jnp.float32)
    decode = export_cuda(
        lambda q, k, v, ks, vs, lengths, table: pk.decode_attention(
            q, k, v, 0, 2**30, lengths, table, ks, vs, splits=2, interpret=False
        ),
        s((4, 8, 4, 128), jnp.bfloat16),
        kv,
        kv,
        sc,
        sc,
        s((4,), jnp.int32),
        s((4, 16), jnp.int32),
    )
    prefill = export_cuda(
        lambda q, k, v, ks, vs, start, row: pk.prefill_attention(
            q, k, v, 0, 2**30, start, start + 64, row, ks, vs, interpret=False
        ),
        s((64, 8, 4, 128), jnp.bfloat16),
        kv,
        kv,
        sc,
        sc,
        i32,
        s((16,), jnp.int32),
    )
    for text in (decode, prefill):
        assert "triton" in text


@pytest.mark.parametrize("kind", FORMATS)
def test_a_quantized_cache_fits_about_twice_the_tokens_of_bfloat16(kind):
    """Llama-3-8B on an H200 (bfloat16): K/V bytes per page nearly halve (8 bits plus a 4-byte
    scale per 128 values), so at a fixed budget the pages that fit nearly double."""
    full, quant = (planned(EngineConfig(max_slots=1, kv_cache_dtype=k)).plan for k in ("auto", kind))
    assert quant.page_bytes == 2 * 32 * 16 * 8 * (128 + 4)  # K and V, scales included
    fits = lambda p: (p.budget - p.weights - p.activations) // p.page_bytes
    assert 1.9 < fits(quant) / fits(full) < 2.0
    # slots sized to the budget: where bfloat16 fits 20, a quantized cache fits about 40
    small = [planned(EngineConfig(kv_cache_dtype=k), memory_gib=26).ecfg.max_slots for k in ("auto", kind)]
    assert small[1] >= 1.9 * small[0] >= 10, small


def test_bad_kv_cache_dtype_is_refused_naming_the_field():
    cfg = PRESETS["llama3-8b"]
    with pytest.raises(ValueError, match="kv_cache_dtype='int4' must be auto, int8 or fp8"):
        EngineConfig(kv_cache_dtype="int4").resolve(cfg, "gpu")
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8' needs a GPU or TPU.*on cpu use auto or int8"):
        EngineConfig(kv_cache_dtype="fp8").resolve(cfg, "cpu")
    assert EngineConfig(kv_cache_dtype="fp8").resolve(cfg, "tpu").kv_cache_dtype == "fp8"


def test_the_cli_flag_reaches_the_engine_config():
    import argparse

    from xlaserve.cli.common import add_engine_args, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_kwargs(p.parse_args(["--kv-cache-dtype", "int8"]))["kv_cache_dtype"] == "int8"
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-cache-dtype", "int4"])


def test_smollm2_with_an_int8_cache_scores_like_full_precision(llm, model_path):
    """The real model end to end: the engine stores int8 K/V, and its log-probs of a text stay
    within a few hundredths of the float32 cache's (the shared engine's; measured 0.034 nats a
    token on average), perplexity within 1%."""
    from helpers import SMALL_ENGINE

    from xlaserve import LLM, SamplingParams
    from xlaserve.data import TWO_CITIES

    q = LLM(str(model_path), **(SMALL_ENGINE | dict(max_model_len=128, scoring=True)), kv_cache_dtype="int8")
    assert (
        q.engine.cache.k.dtype == jnp.int8 and q.engine.cache.k_scale.shape[:-1] == q.engine.cache.k.shape[:3]
    )
    text = TWO_CITIES.read_text()[:400]
    (full,), (quant,) = llm.score_rolling([text], window=100), q.score_rolling([text], window=100)
    a, b = np.asarray(full.logprobs), np.asarray(quant.logprobs)
    assert a.shape == b.shape and len(a) > 60
    assert np.abs(a - b).mean() < 0.05 and np.abs(a - b).max() < 0.5, (
        np.abs(a - b).mean(),
        np.abs(a - b).max(),
    )
    assert abs(b.sum() / a.sum() - 1) < 0.01
    params = SamplingParams(temperature=0.0, max_tokens=6)
    (out,) = q.generate(["The capital of France is"], params)
    assert "Paris" in out.text


def test_qwen_with_an_int8_cache_stays_close_thanks_to_key_smoothing(qwen_llm, qwen_path):
    """Qwen2.5's keys have rotary pairs ~20x the median (its k bias): per-token int8 scales alone
    moved the mean log-prob by 0.38 nats a token on this text; with the keys smoothed (divisors
    measured at start-up) it moves by < 0.15."""
    from helpers import SMALL_ENGINE

    from xlaserve import LLM
    from xlaserve.data import TWO_CITIES

    q = LLM(str(qwen_path), **(SMALL_ENGINE | dict(max_model_len=128, scoring=True)), kv_cache_dtype="int8")
    smooth = np.asarray(q.engine.cache.k_smooth)
    assert smooth.shape == (24, 2, 64) and smooth.max() > 5  # its large pairs were found
    text = TWO_CITIES.read_text()[:1500]
    (full,), (quant,) = qwen_llm.score_rolling([text], window=100), q.score_rolling([text], window=100)
    a, b = np.asarray(full.logprobs), np.asarray(quant.logprobs)
    assert a.shape == b.shape and len(a) > 250
    assert np.abs(a - b).mean() < 0.15, np.abs(a - b).mean()
