"""The draft head's view of its target (runtime/draft_features.py): the features before the final
norm, put through the final norm and lm_head, give the model's own logits: those of
`decoder.forward` for several families (biases, q/k norms, Gemma's norms, windows and soft-caps,
experts) and those of the engine's prefill program on the tiny Llama."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.runtime import draft_features, models
from xlaserve.runtime.attention import KVCache
from xlaserve.runtime.config import EngineConfig
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.models import params
from xlaserve.runtime.models.presets import PRESETS
from xlaserve.runtime.sampling import SamplingState
from xlaserve.runtime.sampling_params import SamplingParams

TINY = PRESETS["tiny"]
CONFIGS = {
    "llama": TINY,
    "qwen2": dataclasses.replace(TINY, architecture="qwen2"),
    "qwen3": dataclasses.replace(TINY, architecture="qwen3"),
    "gemma2": dataclasses.replace(
        TINY,
        architecture="gemma2",
        hidden_act="gelu_pytorch_tanh",
        sliding_window=4,
        layer_types=("sliding_attention", "full_attention"),
        attn_logit_softcapping=5.0,
        final_logit_softcapping=4.0,
        query_pre_attn_scalar=16.0,
    ),
    "qwen3_moe": dataclasses.replace(
        TINY, architecture="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    ),
}


def weights_of(cfg, seed=1):
    return params.random_weights(models.declare(cfg), seed=seed, dtype=jnp.float32)


def tokens_and_lengths(vocab: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (2, 12)).astype(np.int32)
    return tokens, np.array([12, 7], np.int32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_features_through_the_final_norm_give_the_forwards_logits(name):
    cfg = CONFIGS[name]
    w = weights_of(cfg)
    tokens, lengths = tokens_and_lengths(cfg.vocab_size)
    b, t = tokens.shape
    feats = draft_features.features(w, tokens, lengths, cfg=cfg)
    assert feats.shape == (b, t, cfg.hidden_size)
    spec = models.kv_spec(cfg)
    zeros = jnp.zeros((spec.num_layers, b, t, spec.num_kv_heads, spec.head_dim), jnp.float32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    hidden, _ = models.of(cfg).forward(
        w,
        KVCache(zeros, zeros),
        tokens,
        pos,
        pos < lengths[:, None],
        np.arange(b, dtype=np.int32)[:, None],
        lengths,
        cfg=cfg,
        block=t,
        dtype="float32",
    )
    want = np.asarray(models.of(cfg).logits(w, hidden, cfg=cfg))
    got = np.asarray(draft_features.final_logits(w, feats, cfg))
    for row, n in enumerate(lengths):  # padding positions are not compared
        np.testing.assert_allclose(got[row, :n], want[row, :n], atol=2e-4, rtol=1e-5)


def test_features_give_the_engines_prefill_logits():
    cfg = TINY
    w = jax.tree.map(np.asarray, weights_of(cfg))
    ecfg = EngineConfig(max_slots=1, page_size=4, max_model_len=32, prefill_buckets=(16,), scoring=False)
    engine = Engine(cfg, w, ecfg)
    ids = [5, 9, 100, 7, 300, 21, 9, 44, 1]
    presence = np.zeros((cfg.vocab_size,), bool)
    row = np.arange(engine.ecfg.pages_per_seq, dtype=np.int32)
    sampling = SamplingState.of(SamplingParams(temperature=0.0), seed=0)
    _, want = engine.prefill_with_logits(ids, 0, row, sampling, presence)
    feats = draft_features.features(w, np.array([ids], np.int32), np.array([len(ids)], np.int32), cfg=cfg)
    got = np.asarray(draft_features.final_logits(w, feats[0], cfg))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)


def test_a_family_with_its_own_forward_is_refused():
    family = dataclasses.replace(models.get("llama"), name="own_forward", forward=lambda *a, **k: None)
    models.register(family)
    try:
        cfg = dataclasses.replace(TINY, architecture="own_forward")
        with pytest.raises(ValueError, match=r"architecture='own_forward'.*forward of its own"):
            draft_features.style_of(cfg)
    finally:
        del models.FAMILIES["own_forward"]
