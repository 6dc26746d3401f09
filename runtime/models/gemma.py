"""The Gemma 2 and Gemma 3 (text) families: the shared decoder with (1 + w) RMSNorms, embeddings
scaled by sqrt(hidden), norms before and after attention and the feed-forward, GELU (tanh),
alternating sliding-window and global layers, `query_pre_attn_scalar`; Gemma 2 soft-caps attention
and final logits; Gemma 3 norms q and k per head and gives its sliding layers their own RoPE base.

From GGUF: llama.cpp's converter stored every norm as 1 + w (undone at load, `gguf_transforms`),
did not permute q/k, and fixes per architecture what the file does not carry: the activation, the
sliding pattern (Gemma 2: even layers; Gemma 3: five of every six), Gemma 3's local RoPE base
(10000, unless the file has `rope.freq_base_swa`) and the attention scale (1/sqrt(head_dim), or
1/sqrt(hidden/heads) for the 27B models).
"""

from __future__ import annotations

import functools

from xlaserve.runtime.config import RopeConfig
from xlaserve.runtime.models import decoder
from xlaserve.runtime.models.family import Family

STYLE = decoder.Style(norm_offset=1.0, embed_scale=True)
_BASE = ("attn_norm", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_SANDWICH = {  # weight: (HF, GGUF)
    "post_attn_norm": ("post_attention_layernorm.weight", "post_attention_norm.weight"),
    "mlp_norm": ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    "post_mlp_norm": ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
}
FEATURES = frozenset(
    {
        "hidden_act",
        "sliding_window",
        "layer_types",
        "rope_local",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
    }
)


def _names(*extra: str):
    return decoder.names({**{w: decoder.LAYER_NAMES[w] for w in _BASE + extra}, **_SANDWICH})


def _pattern(every: int):
    """Layer types where every `every`-th layer (1-based) is global, the others sliding."""
    kind = lambda i: "full_attention" if (i + 1) % every == 0 else "sliding_attention"
    return lambda n: tuple(kind(i) for i in range(n))


def _gguf_config(cfg, big_layers: int, pattern, local_rope: RopeConfig | None) -> dict:
    # llama.cpp: kq_scale = 1/sqrt(n_embd / n_head) for the 27B model, else 1/sqrt(head_dim)
    scalar = cfg.hidden_size / cfg.num_heads if cfg.num_layers == big_layers else cfg.head_dim
    return dict(
        hidden_act="gelu_pytorch_tanh",
        layer_types=pattern(cfg.num_layers),
        query_pre_attn_scalar=float(scalar),
        rope_local=cfg.rope_local or local_rope,
    )


def _minus_one(x):
    return x - 1.0


def _family(name: str, hf, gguf_names, *, qk_norm: bool, pattern, big_layers: int, local_rope):
    norms = [w for w in gguf_names if w.endswith("norm")]
    return Family(
        name=name,
        hf_architectures=hf[0],
        hf_model_types=hf[1],
        gguf_architectures=(name,),
        param_info=functools.partial(decoder.param_info, qk_norm=qk_norm, sandwich=True),
        forward=functools.partial(decoder.forward, style=STYLE),
        logits=decoder.logits,
        hf_names=_names(*(("q_norm", "k_norm") if qk_norm else ()))[0],
        gguf_names=gguf_names,
        features=FEATURES,
        gguf_transforms=dict.fromkeys(norms, _minus_one),
        gguf_config=functools.partial(
            _gguf_config, big_layers=big_layers, pattern=pattern, local_rope=local_rope
        ),
        layer_types=pattern,
    )


GEMMA2 = _family(
    "gemma2",
    (("Gemma2ForCausalLM",), ("gemma2",)),
    _names()[1],
    qk_norm=False,
    pattern=_pattern(2),
    big_layers=46,
    local_rope=None,
)
GEMMA3 = _family(
    "gemma3",
    (("Gemma3ForCausalLM",), ("gemma3_text",)),
    _names("q_norm", "k_norm")[1],
    qk_norm=True,
    pattern=_pattern(6),
    big_layers=62,
    local_rope=RopeConfig(theta=10000.0),
)
