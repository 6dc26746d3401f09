"""Our C++ attention over the paged KV cache for XLA:CPU (cpu_kernels/paged_attention.cc): the XLA
path's values (decode, prefill chunks, batched rows, sliding windows, softcap, idle rows) within
float32 rounding, batch-invariant, and what the engine's programs run on CPU (a quantized cache
keeps XLA's path). These machines must build it: a host that cannot is a failure, not a skip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.cpu_kernels import build
from xlaserve.runtime.attention import NO_WINDOW, KVCache, paged_attention, quantize_kv
from xlaserve.runtime.config import Kernels

L, N, P, H, G, D = 2, 48, 16, 3, 3, 64
NATIVE, XLA = Kernels(attention="native"), Kernels(attention="xla")


def _cache(seed=0, d=D) -> KVCache:
    rng = np.random.default_rng(seed)
    kv = lambda: jnp.asarray(rng.standard_normal((L, N, P, H, d)), jnp.float32)
    return KVCache(kv(), kv())


def _case(b, t, width, seed=1, idle=False, d=D):
    """q [b, t, H, G, D], a page table of distinct pages, consecutive positions starting anywhere
    in the table, kv_len just past the chunk (row 0 idle: kv_len 0)."""
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.permutation(N)[: b * width].reshape(b, width), jnp.int32)
    start = rng.integers(0, width * P - t, b)
    q_pos = jnp.asarray(start[:, None] + np.arange(t), jnp.int32)
    kv_len = jnp.asarray(start + t, jnp.int32)
    if idle:
        kv_len = kv_len.at[0].set(0)
    q = jnp.asarray(rng.standard_normal((b, t, H, G, d)), jnp.float32)
    return q, table, q_pos, kv_len


def _attend(kernels, q, cache, table, q_pos, kv_len, window=None, softcap=None, block=64):
    fn = lambda q, c, t, p, n: paged_attention(
        q, c, 1, t, p, n, block=block, kernels=kernels, window=window, softcap=softcap
    )
    return jax.jit(fn)(q, cache, table, q_pos, kv_len)


@pytest.mark.parametrize(
    "b,t,window,softcap,idle",
    [
        (4, 1, None, None, True),  # decode, an idle slot
        (1, 48, None, None, False),  # a prefill chunk
        (3, 5, None, None, False),  # verify / scoring rows
        (2, 1, 40, None, False),  # a sliding-window layer
        (3, 7, 24, 30.0, True),  # window and softcap (Gemma 2)
    ],
)
def test_the_kernel_gives_the_xla_paths_values(b, t, window, softcap, idle):
    cache = _cache()
    args = (*_case(b, t, width=8, idle=idle),)
    q, table, q_pos, kv_len = args
    win = None if window is None else jnp.int32(window)
    got = _attend(NATIVE, q, cache, table, q_pos, kv_len, win, softcap)
    ref = _attend(XLA, q, cache, table, q_pos, kv_len, win, softcap)
    assert got.shape == ref.shape == q.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
    if idle:
        assert not np.asarray(got[0]).any()  # an idle row attends to nothing: zeros, not NaN


@pytest.mark.parametrize("d", [12, 16, 80, 128])
def test_the_kernel_gives_the_xla_paths_values_at_other_head_sizes(d):
    """The weighted values run 64 elements at a time in registers, the rest (80: 16, 16: all) as
    before, and the scores 8 floats at a time plus a tail (12: 4): head sizes around those splits
    against XLA's path."""
    cache = _cache(d=d)
    q, table, q_pos, kv_len = _case(3, 5, width=8, d=d)
    got = _attend(NATIVE, q, cache, table, q_pos, kv_len)
    np.testing.assert_allclose(got, _attend(XLA, q, cache, table, q_pos, kv_len), rtol=0, atol=2e-6)


def test_a_rows_result_does_not_depend_on_the_batch_around_it():
    cache = _cache()
    q, table, q_pos, kv_len = _case(6, 1, width=8)
    whole = _attend(NATIVE, q, cache, table, q_pos, kv_len)
    alone = _attend(NATIVE, q[2:3], cache, table[2:3], q_pos[2:3], kv_len[2:3])
    np.testing.assert_array_equal(whole[2:3], alone)


def _hlo(kernels, cache):
    q, table, q_pos, kv_len = _case(2, 1, width=8)
    fn = lambda q, c: paged_attention(q, c, 1, table, q_pos, kv_len, block=64, kernels=kernels)
    return jax.jit(fn).lower(q, cache).as_text()


def test_a_float32_cache_takes_the_kernel_a_quantized_one_xlas_path():
    cache = _cache()
    assert build.ATTENTION_TARGET in _hlo(NATIVE, cache)
    assert build.ATTENTION_TARGET not in _hlo(XLA, cache)
    (k, ks), (v, vs) = quantize_kv(cache.k, jnp.int8), quantize_kv(cache.v, jnp.int8)
    assert build.ATTENTION_TARGET not in _hlo(NATIVE, KVCache(k, v, ks, vs))


def test_the_engine_attends_with_the_kernel_on_cpu(llm):
    """SmolLM2 on CPU with the defaults: attention_impl resolves to native, and its decode and
    prefill programs call the kernel once a layer (inside the scan over layers)."""
    engine = llm.engine
    assert engine.ecfg.attention_impl == "native" and engine.ecfg.max_model_len < NO_WINDOW
    for programs in (engine._decode, engine._prefill):
        text = next(iter(programs.values())).as_text()
        calls = [x for x in text.splitlines() if build.ATTENTION_TARGET in x and "custom-call(" in x]
        assert len(calls) == 1, calls
