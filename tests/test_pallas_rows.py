"""Several rows of several queries each (verify's current token + K guesses, scoring rows) through
our Pallas attention kernels: the one-sequence prefill kernel batched over rows by vmap, Triton's
and Mosaic's, in interpret mode against the XLA path (rows of different lengths, an idle row with
kv_len 0, a sliding window, softcap, a quantized cache, T that is not a power of two); the verify
program of a tiny engine on the kernels emits what it emits on XLA; and it lowers for cuda and tpu
with the kernels inside."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kv_quant import quantized
from test_pallas import export_cuda
from test_speculative_engine import CFG
from test_speculative_engine import ENGINE as SPEC_ENGINE

from xlaserve.runtime import models
from xlaserve.runtime.attention import NO_WINDOW, KVCache, paged_attention
from xlaserve.runtime.config import Kernels
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.models import params
from xlaserve.runtime.sampling import SamplingState
from xlaserve.runtime.sampling_params import SamplingParams

L, POOL, PAGE, H, G, D, W = 2, 40, 8, 2, 3, 64, 8


def rows_case(rng, t: int):
    """3 rows of t queries: one starting mid-page, one idle (kv_len 0), one near the table's end."""
    k, v = (jnp.asarray(rng.standard_normal((L, POOL, PAGE, H, D)), jnp.float32) for _ in "kv")
    table = jnp.asarray(np.stack([rng.permutation(POOL)[:W] for _ in range(3)]), jnp.int32)
    starts = np.array([13, 0, W * PAGE - t - 2])
    kv_len = jnp.asarray(starts + t - np.array([1, starts[1] + t, 0]), jnp.int32)  # row 0: one padding query
    q = jnp.asarray(rng.standard_normal((3, t, H, G, D)), jnp.float32)
    q_pos = jnp.asarray(starts[:, None] + np.arange(t)[None], jnp.int32)
    return KVCache(k, v), table, q, q_pos, kv_len


def valid(out, q_pos, kv_len):
    """The outputs of queries inside their row's kv_len (the rest are padding)."""
    return np.asarray(out)[np.asarray(q_pos < kv_len[:, None])]


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("t, window, softcap", [(5, None, None), (16, 9, 30.0), (3, None, 5.0)])
def test_rows_of_queries_on_the_kernels_equal_the_xla_path(platform, t, window, softcap):
    rng = np.random.default_rng()
    cache, table, q, q_pos, kv_len = rows_case(rng, t)
    kernels = Kernels(attention="pallas", interpret=True, platform=platform)
    opts = dict(block=2 * PAGE, window=None if window is None else jnp.int32(window), softcap=softcap)
    args = (q, cache, jnp.int32(1), table, q_pos, kv_len)
    want = paged_attention(*args, **opts)
    got = paged_attention(*args, **opts, kernels=kernels)
    jaxpr = str(jax.make_jaxpr(lambda *a: paged_attention(*a, **opts, kernels=kernels))(*args))
    assert "pallas_call" in jaxpr  # not the XLA path
    assert got.shape == q.shape
    np.testing.assert_allclose(valid(got, q_pos, kv_len), valid(want, q_pos, kv_len), atol=2e-5, rtol=2e-5)
    assert not np.asarray(got)[1].any()  # the idle row: zeros, not NaN


@pytest.mark.parametrize("kind", ["int8"])
def test_rows_of_queries_over_a_quantized_cache_on_the_triton_kernel(kind):
    rng = np.random.default_rng()
    cache, table, q, q_pos, kv_len = rows_case(rng, 5)
    qc = quantized(cache, kind)
    kernels = Kernels(attention="pallas", interpret=True, platform="gpu")
    args = (q, qc, jnp.int32(0), table, q_pos, kv_len)
    want = paged_attention(*args, block=2 * PAGE)
    got = paged_attention(*args, block=2 * PAGE, kernels=kernels)
    np.testing.assert_allclose(valid(got, q_pos, kv_len), valid(want, q_pos, kv_len), atol=2e-5, rtol=2e-5)


# test_speculative_engine's tiny engine (4-token pages, slot 1 idle), K = 4, every slot in one row bucket
ENGINE = dataclasses.replace(SPEC_ENGINE, slot_buckets=(3,), speculative_k=(4,), speculative_schedule=None)


def verify_run(attention: str) -> list:
    """Prefill two prompts into slots 0 and 2 (slot 1 idle), then three verify steps with guesses
    that are partly right: [(emitted, tokens, logprobs)] per step."""
    weights = jax.tree.map(np.asarray, params.random_weights(models.declare(CFG), seed=3, dtype=np.float32))
    engine = Engine(CFG, weights, dataclasses.replace(ENGINE, attention_impl=attention))
    table = (
        np.random.default_rng(0).permutation(3 * engine.ecfg.pages_per_seq).reshape(3, -1).astype(np.int32)
    )
    engine.free(1)
    greedy = SamplingParams(temperature=0.0)
    for slot, prompt in {0: [5, 9, 100, 7, 300, 21, 9], 2: [42, 17, 17, 400, 3, 250, 88, 12, 5, 61]}.items():
        row, presence = SamplingState.of(greedy, seed=0), np.zeros((CFG.vocab_size,), bool)
        engine.insert(slot, engine.prefill(prompt, 0, table[slot], row, presence), len(prompt), row, presence)
    out, rng = [], np.random.default_rng(1)
    for _ in range(3):
        proposed = rng.integers(0, CFG.vocab_size, (3, 4)).astype(np.int32)
        got = engine.verify(table, 64, proposed, np.array([4, 0, 2], np.int32))
        out.append([(int(got.emitted[s]), got.tokens(s), got.logprobs(s)) for s in (0, 2)])
    return out


def test_verify_on_the_kernels_emits_what_it_emits_on_xla():
    want, got = verify_run("xla"), verify_run("pallas")
    for step_want, step_got in zip(want, got, strict=True):
        for (e0, t0, lp0), (e1, t1, lp1) in zip(step_want, step_got, strict=True):
            assert (e0, t0) == (e1, t1)
            np.testing.assert_allclose(lp1, lp0, atol=1e-4, rtol=1e-4)


def test_rows_of_queries_lower_with_the_kernels_for_cuda_and_tpu():
    s = jax.ShapeDtypeStruct
    kv = s((2, 64, 16, 8, 128), jnp.bfloat16)
    specs = (
        s((4, 5, 8, 4, 128), jnp.bfloat16),
        kv,
        kv,
        s((4, 16), jnp.int32),
        s((4, 5), jnp.int32),
        s((4,), jnp.int32),
    )

    def attend(platform):
        kernels = Kernels(attention="pallas", interpret=False, platform=platform)
        return lambda q, k, v, table, q_pos, kv_len: paged_attention(
            q, KVCache(k, v), 0, table, q_pos, kv_len, block=64, window=jnp.int32(NO_WINDOW), kernels=kernels
        )

    assert "triton" in export_cuda(attend("gpu"), *specs)
    tpu = jax.export.export(jax.jit(attend("tpu")), platforms=["tpu"])(*specs).mlir_module()
    assert "xlaserve_prefill_attention" in tpu
