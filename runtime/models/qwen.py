"""The Qwen families: Qwen2/2.5 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm, a head_dim of its
own). The shared decoder with those optional weights; llama.cpp converts them without permuting
q/k (its NEOX RoPE is HF's rotate-half)."""

from __future__ import annotations

import functools

from xlaserve.runtime.models import decoder
from xlaserve.runtime.models.family import Family

_BASE = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def _names(*extra: str):
    return decoder.names({w: decoder.LAYER_NAMES[w] for w in _BASE + extra})


QWEN2_HF, QWEN2_GGUF = _names("bq", "bk", "bv")
QWEN3_HF, QWEN3_GGUF = _names("q_norm", "k_norm")

QWEN2 = Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_types=("qwen2",),
    gguf_architectures=("qwen2",),
    param_info=functools.partial(decoder.param_info, qkv_bias=True),
    forward=decoder.forward,
    logits=decoder.logits,
    hf_names=QWEN2_HF,
    gguf_names=QWEN2_GGUF,
    features=frozenset({"sliding_window", "layer_types"}),
)

QWEN3 = Family(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    hf_model_types=("qwen3",),
    gguf_architectures=("qwen3",),
    param_info=functools.partial(decoder.param_info, qk_norm=True),
    forward=decoder.forward,
    logits=decoder.logits,
    hf_names=QWEN3_HF,
    gguf_names=QWEN3_GGUF,
    features=frozenset({"sliding_window", "layer_types"}),
)
