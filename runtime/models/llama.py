"""The Llama family: Llama 2/3/3.x, SmolLM2, Mistral (sliding-window attention); GQA, tied
embeddings, RoPE scaling. The shared decoder (`decoder.py`) with no optional weights.

llama.cpp's converter permuted the q/k rows of this family for its interleaved RoPE; the loader
undoes it (`gguf_permute`).
"""

from __future__ import annotations

from xlaserve.runtime.models import decoder
from xlaserve.runtime.models.family import Family

Layer, Weights = decoder.Layer, decoder.Weights
param_info = decoder.param_info
forward = decoder.forward
logits = decoder.logits

_BASE = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
HF_NAMES, GGUF_NAMES = decoder.names({w: decoder.LAYER_NAMES[w] for w in _BASE})

FAMILY = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    hf_model_types=("llama", "mistral"),
    gguf_architectures=("llama",),
    param_info=param_info,
    forward=forward,
    logits=logits,
    hf_names=HF_NAMES,
    gguf_names=GGUF_NAMES,
    gguf_permute={"layers.wq": "num_heads", "layers.wk": "num_kv_heads"},
    features=frozenset({"sliding_window"}),
)
