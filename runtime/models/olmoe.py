"""The OLMoE family (OLMoE-1B-7B): Llama-style attention whose q and k are RMSNorm'd over the whole
projection (q_norm [Hq*K], k_norm [H*K], where Qwen3's norm each head), and a mixture of experts in
every layer: softmax over all experts, the top k, renormalised only if `norm_topk_prob` (off by
default), no shared expert. The shared decoder with `moe.py`.

The tensors are named as Qwen3-MoE's: HF stores one per expert (`mlp.experts.{e}.gate_proj`),
llama.cpp's converter (arch "olmoe") stacks them into `ffn_{gate,up,down}_exps` and permutes no q/k
rows (its NEOX RoPE is HF's rotate-half); llama.cpp never renormalises OLMoE's top-k weights. HF's
`clip_qkv` (q/k/v clamping, off in the released models) is refused by the HF reader.
"""

from __future__ import annotations

import functools

from xlaserve.runtime.config import MOE_FEATURES
from xlaserve.runtime.models import decoder
from xlaserve.runtime.models.family import Family
from xlaserve.runtime.models.qwen_moe import QWEN3_MOE_GGUF, QWEN3_MOE_HF

FAMILY = Family(
    name="olmoe",
    hf_architectures=("OlmoeForCausalLM",),
    hf_model_types=("olmoe",),
    gguf_architectures=("olmoe",),
    param_info=functools.partial(decoder.param_info, qk_norm_whole=True),
    forward=decoder.forward,
    logits=decoder.logits,
    hf_names=QWEN3_MOE_HF,
    gguf_names=QWEN3_MOE_GGUF,
    features=MOE_FEATURES,
    gguf_config=lambda cfg: {"norm_topk_prob": False},
    moe=True,
)
