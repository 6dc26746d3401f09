"""The Llama family (Llama 2/3/3.x, SmolLM2; GQA, tied embeddings, RoPE scaling) as pure functions.

Weights are a flat pytree of typed dataclasses; every per-layer array is stacked on a leading layer
axis and the forward pass scans over it, so compile time does not grow with depth. Matrices are
stored [out, in] (the layout of GGUF and of torch checkpoints). Any matrix may be a `QuantArray`.

Dimension letters: B batch, T tokens, D hidden, F ffn, V vocab, L layers, H kv heads, G query heads
per kv head, K head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from xlaserve.runtime.attention import KVCache, paged_attention, token_slots, write_kv
from xlaserve.runtime.config import XLA_KERNELS, Kernels, ModelConfig
from xlaserve.runtime.models.family import Family
from xlaserve.runtime.models.layers import head, matmul, rms_norm, rope
from xlaserve.runtime.models.params import declare, declare_stacked
from xlaserve.runtime.quant import QuantArray, take_rows

Matrix = jax.Array | QuantArray


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Layer:
    attn_norm: jax.Array  # [L, D]
    wq: Matrix  # [L, Hq*K, D]
    wk: Matrix  # [L, H*K, D]
    wv: Matrix  # [L, H*K, D]
    wo: Matrix  # [L, D, Hq*K]
    mlp_norm: jax.Array  # [L, D]
    w_gate: Matrix  # [L, F, D]
    w_up: Matrix  # [L, F, D]
    w_down: Matrix  # [L, D, F]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Weights:
    embed: Matrix  # [V, D]
    layers: Layer
    final_norm: jax.Array  # [D]
    lm_head: Matrix | None  # [V, D]; None when tied to `embed`


def param_info(cfg: ModelConfig) -> Weights:
    """A `Weights` whose leaves are `ParamInfo`s."""
    n, d, f, k = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * k, cfg.num_kv_heads * k
    mat = lambda *dims: declare_stacked(range(n), *dims, matrix=True)
    vec = lambda *dims: declare_stacked(range(n), *dims, matrix=False)
    layers = Layer(
        attn_norm=vec((d, None)),
        wq=mat((q, "q_heads"), (d, "embed")),
        wk=mat((kv, "kv_heads"), (d, "embed")),
        wv=mat((kv, "kv_heads"), (d, "embed")),
        wo=mat((d, "embed"), (q, "q_heads")),
        mlp_norm=vec((d, None)),
        w_gate=mat((f, "ffw"), (d, "embed")),
        w_up=mat((f, "ffw"), (d, "embed")),
        w_down=mat((d, "embed"), (f, "ffw")),
    )
    vocab = lambda: declare((cfg.vocab_size, "vocab"), (d, "embed"), matrix=True)
    return Weights(
        embed=vocab(),
        layers=layers,
        final_norm=declare((d, None), matrix=False),
        lm_head=None if cfg.tie_word_embeddings else vocab(),
    )


def forward(
    weights: Weights,
    cache: KVCache,
    tokens,
    positions,
    valid,
    page_table,
    kv_len,
    *,
    cfg: ModelConfig,
    block: int,
    dtype,
    kernels: Kernels = XLA_KERNELS,
    act=jax.nn.silu,
):
    """Run the decoder over tokens [B, T] at `positions` [B, T], writing their K/V into the cache.

    `valid` [B, T] marks real tokens (padding and idle slots write nothing); `kv_len` [B] is each
    sequence's length including these tokens. `act`: the gated feed-forward's activation. Returns
    (hidden states [B, T, D] after the final norm, updated cache).
    """
    b, t = tokens.shape
    h, g, k = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    inv_freq = cfg.rope.inv_freq(k)
    pages, offsets = token_slots(page_table, positions, valid, cache.page_size, cache.num_pages)
    x = take_rows(weights.embed, tokens, dtype)
    mm = matmul(kernels, "layers.")

    def layer(carry, xs):
        x, cache = carry
        w, i = xs
        with jax.named_scope("attention"):
            y = rms_norm(x, w.attn_norm, cfg.rms_norm_eps)
            q = rope(mm(y, w.wq, "wq").reshape(b, t, h, g, k), positions, inv_freq)
            kk = rope(mm(y, w.wk, "wk").reshape(b, t, h, k), positions, inv_freq)
            v = mm(y, w.wv, "wv").reshape(b, t, h, k)
            cache = write_kv(cache, i, kk, v, pages, offsets)
            o = paged_attention(q, cache, i, page_table, positions, kv_len, block=block, kernels=kernels)
            x = x + mm(o.reshape(b, t, h * g * k), w.wo, "wo")
        with jax.named_scope("mlp"):
            y = rms_norm(x, w.mlp_norm, cfg.rms_norm_eps)
            x = x + mm(act(mm(y, w.w_gate, "w_gate")) * mm(y, w.w_up, "w_up"), w.w_down, "w_down")
        return (x, cache), None

    (x, cache), _ = jax.lax.scan(layer, (x, cache), (weights.layers, jnp.arange(cfg.num_layers)))
    return rms_norm(x, weights.final_norm, cfg.rms_norm_eps), cache


def logits(weights: Weights, hidden, kernels: Kernels = XLA_KERNELS) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., V]."""
    return head(weights, hidden, kernels)


# Weight name -> tensor name in each format ("{i}": the layer index).
_LAYER_NAMES = {  # weight: (HF, GGUF)
    "attn_norm": ("input_layernorm", "attn_norm"),
    "wq": ("self_attn.q_proj", "attn_q"),
    "wk": ("self_attn.k_proj", "attn_k"),
    "wv": ("self_attn.v_proj", "attn_v"),
    "wo": ("self_attn.o_proj", "attn_output"),
    "mlp_norm": ("post_attention_layernorm", "ffn_norm"),
    "w_gate": ("mlp.gate_proj", "ffn_gate"),
    "w_up": ("mlp.up_proj", "ffn_up"),
    "w_down": ("mlp.down_proj", "ffn_down"),
}
HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    **{f"layers.{w}": f"model.layers.{{i}}.{hf}.weight" for w, (hf, _) in _LAYER_NAMES.items()},
}
GGUF_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    **{f"layers.{w}": f"blk.{{i}}.{gg}.weight" for w, (_, gg) in _LAYER_NAMES.items()},
}

FAMILY = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_model_types=("llama",),
    gguf_architectures=("llama",),
    param_info=param_info,
    forward=forward,
    logits=logits,
    hf_names=HF_NAMES,
    gguf_names=GGUF_NAMES,
    gguf_permute={"layers.wq": "num_heads", "layers.wk": "num_kv_heads"},
)
