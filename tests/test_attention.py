"""The XLA paged attention against dense masked attention over the same gathered keys.

Pages are random and non-contiguous, shared between sequences (prefix sharing), the query/kv head
ratio is 3 (SmolLM2's), lengths cover 0, 1, page-1, page, page+1 and random, and every cache slot
not holding a visible key is filled with large garbage, so any leak through the mask shows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.runtime.attention import KVCache, paged_attention, reference_attention, token_slots, write_kv

L, N, P, H, G, D = 2, 40, 8, 2, 3, 16
W = 8  # table width in pages (64 tokens)


def random_case(rng, lengths):
    b = len(lengths)
    cache = KVCache(
        jnp.asarray(rng.standard_normal((L, N, P, H, D)) * 1e4, jnp.float32),
        jnp.asarray(rng.standard_normal((L, N, P, H, D)) * 1e4, jnp.float32),
    )
    table = np.stack([rng.permutation(N)[:W] for _ in range(b)]).astype(np.int32)
    if b > 1:
        table[1, :2] = table[0, :2]  # two sequences share their first pages
    return cache, table


def fill(cache, table, lengths, rng, layer):
    """Write finite, sane keys/values at every visible position of `layer`."""
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        pos = jnp.arange(n)[None]
        pages, offs = token_slots(jnp.asarray(table[i : i + 1]), pos, jnp.ones_like(pos, bool), P, N)
        k = jnp.asarray(rng.standard_normal((1, n, H, D)), jnp.float32)
        cache = write_kv(cache, layer, k, k * 0.5 + 1.0, pages, offs)
    return cache


def gathered(cache, table, layer):
    k = cache.k[layer][table].reshape(table.shape[0], -1, H, D)
    v = cache.v[layer][table].reshape(table.shape[0], -1, H, D)
    return k, v


@pytest.mark.parametrize("block", [W * P, 2 * P])  # one dense block (decode) and the blocked loop
def test_decode_matches_dense(block):
    rng = np.random.default_rng()
    lengths = [0, 1, P - 1, P, P + 1, int(rng.integers(2, W * P))]
    cache, table = random_case(rng, lengths)
    # Shared pages must hold the same data for both sequences: give sequence 1 the length of 0's prefix.
    cache = fill(cache, table, lengths, rng, layer=1)
    kv_len = jnp.asarray(lengths, jnp.int32)
    q_pos = jnp.maximum(kv_len - 1, 0)[:, None]
    q = jnp.asarray(rng.standard_normal((len(lengths), 1, H, G, D)), jnp.float32)
    out = jax.jit(paged_attention, static_argnames="block")(
        q, cache, 1, jnp.asarray(table), q_pos, kv_len, block=block
    )
    k, v = gathered(cache, jnp.asarray(table), 1)
    ref = reference_attention(q, k, v, q_pos, kv_len)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[0], 0.0)  # an idle slot gets zeros, not NaN


@pytest.mark.parametrize("start, n_new", [(0, 11), (13, 5), (P, P), (3 * P - 1, 2 * P + 1)])
def test_prefill_chunk_attends_to_prefix_and_itself_causally(start, n_new):
    rng = np.random.default_rng()
    total = start + n_new
    cache, table = random_case(rng, [total])
    cache = fill(cache, table, [total], rng, layer=0)
    t = 32  # padded chunk; positions past n_new are padding
    q_pos = (start + jnp.arange(t))[None]
    kv_len = jnp.asarray([total], jnp.int32)
    q = jnp.asarray(rng.standard_normal((1, t, H, G, D)), jnp.float32)
    out = jax.jit(paged_attention, static_argnames="block")(
        q, cache, 0, jnp.asarray(table), q_pos, kv_len, block=2 * P
    )
    k, v = gathered(cache, jnp.asarray(table), 0)
    ref = reference_attention(q, k, v, q_pos, kv_len)
    np.testing.assert_allclose(np.asarray(out)[:, :n_new], np.asarray(ref)[:, :n_new], atol=1e-5, rtol=1e-5)


def test_writes_drop_padding_and_out_of_table_positions():
    rng = np.random.default_rng(0)
    cache, table = random_case(rng, [5])
    before = np.asarray(cache.k)
    pos = jnp.asarray([[3, 4, 5, W * P]])  # the last is past the table
    valid = jnp.asarray([[True, True, False, True]])  # the third is padding
    pages, offs = token_slots(jnp.asarray(table), pos, valid, P, N)
    assert np.asarray(pages)[0, 2] == N and np.asarray(pages)[0, 3] == N
    new = jnp.full((1, 4, H, D), 7.0)
    after = np.asarray(write_kv(cache, 0, new, new, pages, offs).k)
    changed = np.argwhere((after != before).any(axis=(-1, -2)))
    assert sorted(map(tuple, changed.tolist())) == [(0, table[0, 0], 3), (0, table[0, 0], 4)]


@pytest.mark.parametrize("block", [W * P, 2 * P])
@pytest.mark.parametrize(
    "window, softcap, scale", [(1, None, None), (P - 3, 20.0, 0.3), (2 * P + 1, 5.0, None)]
)
def test_sliding_window_softcap_and_scale_match_dense(block, window, softcap, scale):
    """Windowed layers (Mistral, Gemma, Phi-3): a key is visible iff it is causal and within the
    last `window` positions; decode rows and a prefill chunk with a cached prefix longer than the
    window; the blocked loop starts at the first block a window reaches."""
    rng = np.random.default_rng()
    lengths = [0, 1, P + 1, W * P - 5, int(rng.integers(2, W * P))]
    cache, table = random_case(rng, lengths)
    cache = fill(cache, table, lengths, rng, layer=0)
    kv_len = jnp.asarray(lengths, jnp.int32)
    q_pos = jnp.maximum(kv_len - 1, 0)[:, None]
    q = jnp.asarray(rng.standard_normal((len(lengths), 1, H, G, D)), jnp.float32)
    run = jax.jit(paged_attention, static_argnames=("block", "scale", "softcap"))
    out = run(
        q,
        cache,
        0,
        jnp.asarray(table),
        q_pos,
        kv_len,
        block=block,
        window=window,
        scale=scale,
        softcap=softcap,
    )
    k, v = gathered(cache, jnp.asarray(table), 0)
    ref = reference_attention(q, k, v, q_pos, kv_len, window=window, scale=scale, softcap=softcap)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    # a prefill chunk of 9 tokens after a cached prefix of 3 pages
    start, t = 3 * P, 16
    q_pos = (start + jnp.arange(t))[None]
    q = jnp.asarray(rng.standard_normal((1, t, H, G, D)), jnp.float32)
    one = jnp.asarray(table[3:4])
    kv = jnp.asarray([start + 9], jnp.int32)
    out = run(q, cache, 0, one, q_pos, kv, block=block, window=window, scale=scale, softcap=softcap)
    k, v = gathered(cache, one, 0)
    ref = reference_attention(q, k, v, q_pos, kv, window=window, scale=scale, softcap=softcap)
    np.testing.assert_allclose(np.asarray(out)[:, :9], np.asarray(ref)[:, :9], atol=1e-5, rtol=1e-5)
