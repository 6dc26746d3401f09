"""The Mixtral family (Mixtral 8x7B, 8x22B): Llama/Mistral attention with a mixture of experts
in every layer, the top 2 of 8 by softmax probability, renormalised to sum to 1 (always: Mixtral
has no `norm_topk_prob` switch). The shared decoder with `moe.py`.

HF stores one tensor per expert (`block_sparse_moe.experts.{e}.w1` gate, `w3` up, `w2` down);
llama.cpp writes Mixtral as architecture "llama" with `llama.expert_count` and stacked
`ffn_{gate,up,down}_exps`, its q/k rows permuted as for Llama (undone at load).
"""

from __future__ import annotations

from xlaserve.runtime.config import MOE_FEATURES
from xlaserve.runtime.models import decoder
from xlaserve.runtime.models.family import Family

_BASE = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm")
EXPERTS = {  # weight: (HF, GGUF)
    "moe.router": ("block_sparse_moe.gate.weight", "ffn_gate_inp.weight"),
    "moe.gate": ("block_sparse_moe.experts.{e}.w1.weight", "ffn_gate_exps.weight"),
    "moe.up": ("block_sparse_moe.experts.{e}.w3.weight", "ffn_up_exps.weight"),
    "moe.down": ("block_sparse_moe.experts.{e}.w2.weight", "ffn_down_exps.weight"),
}
HF_NAMES, GGUF_NAMES = decoder.names({**{w: decoder.LAYER_NAMES[w] for w in _BASE}, **EXPERTS})


def _renormalised(cfg) -> dict:
    return {"norm_topk_prob": True}


FAMILY = Family(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    hf_model_types=("mixtral",),
    gguf_architectures=("llama",),
    param_info=decoder.param_info,
    forward=decoder.forward,
    logits=decoder.logits,
    hf_names=HF_NAMES,
    gguf_names=GGUF_NAMES,
    gguf_permute={"layers.wq": "num_heads", "layers.wk": "num_kv_heads"},
    features=MOE_FEATURES | {"sliding_window"},
    gguf_config=_renormalised,
    hf_config=_renormalised,
    moe=True,
)
