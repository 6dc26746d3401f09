"""The Phi-3 family (Phi-3/3.5 mini and medium, Phi-4-mini without partial rotary): the shared
decoder; checkpoints store q/k/v fused as one `qkv_proj` and gate/up as one `gate_up_proj` (GGUF:
`attn_qkv`, `ffn_up`), which the loader splits by rows (`rows`: exact, whole quantized rows), so
the weights and the forward pass are Llama's."""

from __future__ import annotations

from xlaserve.runtime.models import decoder
from xlaserve.runtime.models.family import Family

_FUSED = {  # weight: (HF, GGUF) of the fused tensor it is cut from
    "wq": ("self_attn.qkv_proj.weight", "attn_qkv.weight"),
    "wk": ("self_attn.qkv_proj.weight", "attn_qkv.weight"),
    "wv": ("self_attn.qkv_proj.weight", "attn_qkv.weight"),
    "w_gate": ("mlp.gate_up_proj.weight", "ffn_up.weight"),
    "w_up": ("mlp.gate_up_proj.weight", "ffn_up.weight"),
}
_OTHERS = ("attn_norm", "wo", "mlp_norm", "w_down")
HF_NAMES, GGUF_NAMES = decoder.names({**{w: decoder.LAYER_NAMES[w] for w in _OTHERS}, **_FUSED})


def _q(cfg):
    return 0, cfg.num_heads * cfg.head_dim


def _k(cfg):
    q, kv = _q(cfg)[1], cfg.num_kv_heads * cfg.head_dim
    return q, q + kv


def _v(cfg):
    start = _k(cfg)[1]
    return start, start + cfg.num_kv_heads * cfg.head_dim


FAMILY = Family(
    name="phi3",
    hf_architectures=("Phi3ForCausalLM",),
    hf_model_types=("phi3",),
    gguf_architectures=("phi3",),
    param_info=decoder.param_info,
    forward=decoder.forward,
    logits=decoder.logits,
    hf_names=HF_NAMES,
    gguf_names=GGUF_NAMES,
    features=frozenset({"sliding_window"}),
    rows={
        "layers.wq": _q,
        "layers.wk": _k,
        "layers.wv": _v,
        "layers.w_gate": lambda cfg: (0, cfg.intermediate_size),
        "layers.w_up": lambda cfg: (cfg.intermediate_size, 2 * cfg.intermediate_size),
    },
)
