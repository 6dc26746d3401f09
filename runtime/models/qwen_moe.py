"""The Qwen mixture-of-experts families: Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B: q/k/v biases, a
shared expert gated by sigmoid(x . w) beside the routed ones, top-k probabilities not renormalised)
and Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B: per-head q/k RMSNorm, top-k renormalised). The shared
decoder with `moe.py` in place of the dense feed-forward; every layer has experts (a config with
dense layers, `decoder_sparse_step` > 1 or `mlp_only_layers`, is refused by the HF reader).

HF stores one tensor per expert (`mlp.experts.{e}.gate_proj`); GGUF stacks them
(`ffn_gate_exps` [E, F, D]). llama.cpp fixes the renormalisation per architecture (qwen2moe: off,
qwen3moe: on) and stores the shared expert's gate as `ffn_gate_inp_shexp` [D] (reshaped to [1, D]).
"""

from __future__ import annotations

import functools

from xlaserve.runtime.config import MOE_FEATURES
from xlaserve.runtime.models import decoder
from xlaserve.runtime.models.family import Family

_BASE = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm")
EXPERTS = {  # weight: (HF, GGUF)
    "moe.router": ("mlp.gate.weight", "ffn_gate_inp.weight"),
    "moe.gate": ("mlp.experts.{e}.gate_proj.weight", "ffn_gate_exps.weight"),
    "moe.up": ("mlp.experts.{e}.up_proj.weight", "ffn_up_exps.weight"),
    "moe.down": ("mlp.experts.{e}.down_proj.weight", "ffn_down_exps.weight"),
}
SHARED = {
    "moe.shared_gate": ("mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight"),
    "moe.shared_up": ("mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight"),
    "moe.shared_down": ("mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight"),
    "moe.shared_router": ("mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight"),
}


def _names(*extra: str, shared: bool = False):
    layer = {w: decoder.LAYER_NAMES[w] for w in _BASE + extra}
    return decoder.names({**layer, **EXPERTS, **(SHARED if shared else {})})


def _row(x):
    """The shared expert's gate as [1, D] (llama.cpp's files may hold it as [D])."""
    return x.reshape(1, -1)


QWEN2_MOE_HF, QWEN2_MOE_GGUF = _names("bq", "bk", "bv", shared=True)
QWEN3_MOE_HF, QWEN3_MOE_GGUF = _names("q_norm", "k_norm")
FEATURES = MOE_FEATURES | {"sliding_window", "layer_types"}

QWEN2_MOE = Family(
    name="qwen2_moe",
    hf_architectures=("Qwen2MoeForCausalLM",),
    hf_model_types=("qwen2_moe",),
    gguf_architectures=("qwen2moe",),
    param_info=functools.partial(decoder.param_info, qkv_bias=True),
    forward=decoder.forward,
    logits=decoder.logits,
    hf_names=QWEN2_MOE_HF,
    gguf_names=QWEN2_MOE_GGUF,
    features=FEATURES,
    gguf_transforms={"layers.moe.shared_router": _row},
    gguf_config=lambda cfg: {"norm_topk_prob": False},
    moe=True,
)

QWEN3_MOE = Family(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    hf_model_types=("qwen3_moe",),
    gguf_architectures=("qwen3moe",),
    param_info=functools.partial(decoder.param_info, qk_norm=True),
    forward=decoder.forward,
    logits=decoder.logits,
    hf_names=QWEN3_MOE_HF,
    gguf_names=QWEN3_MOE_GGUF,
    features=FEATURES,
    gguf_config=lambda cfg: {"norm_topk_prob": True},
    moe=True,
)
