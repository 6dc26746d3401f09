"""The decoder stack the families share: pre-norm attention + gated feed-forward layers, each
family choosing its variant by the weights it declares and a few static switches (`Style`):

- q/k/v biases (Qwen2) when `bq`/`bk`/`bv` are declared;
- RMSNorm of q and k before RoPE when `q_norm`/`k_norm` are: per head (Qwen3, Gemma 3; [K]) or
  over the whole projection (OLMoE; [Hq*K] and [H*K]), as their declared shape says;
- "sandwich" norms after attention and after the feed-forward (Gemma 2/3) when
  `post_attn_norm`/`post_mlp_norm` are;
- a mixture-of-experts feed-forward (`moe.py`) in place of the dense one when the config has
  experts (`moe` is declared, `w_gate`/`w_up`/`w_down` are not);
- from the config: the activation, per-layer sliding windows and RoPE, the attention scale and
  attention-logit soft-capping, final-logit soft-capping.

Weights are a pytree of typed dataclasses; every per-layer array is stacked on a leading layer
axis and the forward pass scans over it (per-layer windows and which RoPE table are scanned with
the weights; the tables are computed once per pass), so compile time does not grow with depth.
Matrices are stored [out, in] (GGUF's and torch's layout). Any matrix may be a `QuantArray`.

Dimension letters: B batch, T tokens, D hidden, F ffn, V vocab, L layers, H kv heads, G query heads
per kv head, K head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime.attention import NO_WINDOW, KVCache, paged_attention, token_slots, write_kv
from xlaserve.runtime.config import XLA_KERNELS, Kernels, ModelConfig
from xlaserve.runtime.models import moe as moe_ffn
from xlaserve.runtime.models.layers import head, matmul, matmuls, rms_norm, rope_angles, rotate
from xlaserve.runtime.models.params import declare, declare_stacked
from xlaserve.runtime.quant import LayerOf, QuantArray, reads_in_place, take_rows

Matrix = jax.Array | QuantArray
MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # the Layer fields `mm` takes

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Layer:
    attn_norm: jax.Array  # [L, D]
    wq: Matrix  # [L, Hq*K, D]
    wk: Matrix  # [L, H*K, D]
    wv: Matrix  # [L, H*K, D]
    wo: Matrix  # [L, D, Hq*K]
    mlp_norm: jax.Array  # [L, D]
    w_gate: Matrix | None = None  # [L, F, D]; None with experts
    w_up: Matrix | None = None  # [L, F, D]
    w_down: Matrix | None = None  # [L, D, F]
    bq: jax.Array | None = None  # [L, Hq*K]
    bk: jax.Array | None = None  # [L, H*K]
    bv: jax.Array | None = None  # [L, H*K]
    q_norm: jax.Array | None = None  # [L, K], or [L, Hq*K] over the whole projection
    k_norm: jax.Array | None = None  # [L, K], or [L, H*K]
    post_attn_norm: jax.Array | None = None  # [L, D]
    post_mlp_norm: jax.Array | None = None  # [L, D]
    moe: moe_ffn.Experts | None = None  # the experts that replace w_gate/w_up/w_down


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Weights:
    embed: Matrix  # [V, D]
    layers: Layer
    final_norm: jax.Array  # [D]
    lm_head: Matrix | None  # [V, D]; None when tied to `embed`


@dataclass(frozen=True)
class Style:
    """What a family fixes about the arithmetic (static)."""

    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + w): Gemma stores w - 1
    embed_scale: bool = False  # embeddings are multiplied by sqrt(hidden) (Gemma)


def param_info(
    cfg: ModelConfig,
    *,
    qkv_bias: bool = False,
    qk_norm: bool = False,
    qk_norm_whole: bool = False,
    sandwich: bool = False,
) -> Weights:
    """A `Weights` whose leaves are `ParamInfo`s, with the optional weights the family has
    (`qk_norm`: per head; `qk_norm_whole`: over the whole q and k projections)."""
    n, d, f, k = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * k, cfg.num_kv_heads * k
    dense = not cfg.num_experts
    mat = lambda *dims: declare_stacked(range(n), *dims, matrix=True)
    vec = lambda *dims: declare_stacked(range(n), *dims, matrix=False)
    layers = Layer(
        attn_norm=vec((d, None)),
        wq=mat((q, "q_heads"), (d, "embed")),
        wk=mat((kv, "kv_heads"), (d, "embed")),
        wv=mat((kv, "kv_heads"), (d, "embed")),
        wo=mat((d, "embed"), (q, "q_heads")),
        mlp_norm=vec((d, None)),
        w_gate=mat((f, "ffw"), (d, "embed")) if dense else None,
        w_up=mat((f, "ffw"), (d, "embed")) if dense else None,
        w_down=mat((d, "embed"), (f, "ffw")) if dense else None,
        bq=vec((q, "q_heads")) if qkv_bias else None,
        bk=vec((kv, "kv_heads")) if qkv_bias else None,
        bv=vec((kv, "kv_heads")) if qkv_bias else None,
        q_norm=vec((q, "q_heads")) if qk_norm_whole else vec((k, None)) if qk_norm else None,
        k_norm=vec((kv, "kv_heads")) if qk_norm_whole else vec((k, None)) if qk_norm else None,
        post_attn_norm=vec((d, None)) if sandwich else None,
        post_mlp_norm=vec((d, None)) if sandwich else None,
        moe=None if dense else moe_ffn.declare(cfg),
    )
    vocab = lambda: declare((cfg.vocab_size, "vocab"), (d, "embed"), matrix=True)
    return Weights(
        embed=vocab(),
        layers=layers,
        final_norm=declare((d, None), matrix=False),
        lm_head=None if cfg.tie_word_embeddings else vocab(),
    )


def per_layer(cfg: ModelConfig):
    """(windows int32 [L], inverse RoPE frequencies float32 [L, K/2]) of each layer."""
    windows = np.array([w or NO_WINDOW for w in cfg.windows()], np.int32)
    inv_freq = np.stack([r.inv_freq(cfg.head_dim) for r in cfg.ropes()]).astype(np.float32)
    return windows, inv_freq


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
    style: Style = Style(),
    routed: bool = False,
    features: bool = False,
):
    """Run the decoder over tokens [B, T] at `positions` [B, T], writing their K/V into the cache.

    `valid` [B, T] marks real tokens (padding and idle slots write nothing); `kv_len` [B] is each
    sequence's length including these tokens. Returns (hidden states [B, T, D] after the final
    norm, updated cache), then, with `routed`, the valid tokens each layer routed to each expert
    int32 [L, E] (E = num_experts: [L, 0] for a dense model), then, with `features`, the last
    layer's output before the final norm [B, T, D] (what an EAGLE-style draft head reads:
    runtime/draft_features.py; the final norm divides by each state's RMS, so it cannot be undone).
    """
    b, t = tokens.shape
    h, g, k = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    act = ACTIVATIONS[cfg.hidden_act]
    scale = None if cfg.query_pre_attn_scalar is None else float(cfg.query_pre_attn_scalar) ** -0.5
    norm = lambda x, w: rms_norm(x, w, cfg.rms_norm_eps, style.norm_offset)
    windows, inv_freqs = per_layer(cfg)
    tables, rope_of = np.unique(inv_freqs, axis=0, return_inverse=True)
    cos, sin = rope_angles(positions, tables)  # [R, B, T, K/2] for the R distinct RoPEs, once
    pages, offsets = token_slots(page_table, positions, valid, cache.page_size, cache.num_pages)
    x = take_rows(weights.embed, tokens, dtype)
    if style.embed_scale:  # in the activations' dtype, as HF does
        x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)
    mm, mms = matmul(kernels, "layers."), matmuls(kernels, "layers.")

    def proj(out, bias, shape):
        return (out if bias is None else out + bias.astype(out.dtype)).reshape(shape)

    # Quantized matrices the native CPU kernel reads in place stay out of the scanned xs: the
    # body gets LayerOf(stack, i) for them instead of a slice.
    stacks = {}
    if reads_in_place(kernels):
        stacks = {f: getattr(weights.layers, f) for f in MATRICES}
        stacks = {f: m for f, m in stacks.items() if isinstance(m, QuantArray)}

    def layer(carry, xs):
        x, cache = carry
        w, i, window, r = xs
        w = dataclasses.replace(w, **{f: LayerOf(m, i) for f, m in stacks.items()})
        with jax.named_scope("attention"):
            y = norm(x, w.attn_norm)
            q, kk, v = mms(y, (w.wq, w.wk, w.wv), ("wq", "wk", "wv"))
            q = proj(q, w.bq, (b, t, h * g * k))
            kk = proj(kk, w.bk, (b, t, h * k))
            v = proj(v, w.bv, (b, t, h, k))
            # q_norm [Hq*K]: over the whole projection (OLMoE); [K]: per head (the same if Hq = 1)
            whole = w.q_norm is not None and w.q_norm.shape[-1] != k
            if whole:
                q, kk = norm(q, w.q_norm), norm(kk, w.k_norm)
            q, kk = q.reshape(b, t, h, g, k), kk.reshape(b, t, h, k)
            if w.q_norm is not None and not whole:
                q, kk = norm(q, w.q_norm), norm(kk, w.k_norm)
            q, kk = rotate(q, cos[r], sin[r]), rotate(kk, cos[r], sin[r])
            cache = write_kv(cache, i, kk, v, pages, offsets)
            o = paged_attention(
                q,
                cache,
                i,
                page_table,
                positions,
                kv_len,
                block=block,
                kernels=kernels,
                window=window,
                scale=scale,
                softcap=cfg.attn_logit_softcapping,
            )
            o = mm(o.reshape(b, t, h * g * k), w.wo, "wo")
            x = x + (o if w.post_attn_norm is None else norm(o, w.post_attn_norm))
        with jax.named_scope("mlp"):
            y = norm(x, w.mlp_norm)
            if w.moe is not None:
                y, counts = moe_ffn.block(y, w.moe, cfg=cfg, kernels=kernels, act=act, mm=mm, valid=valid)
            else:
                gate, up = mms(y, (w.w_gate, w.w_up), ("w_gate", "w_up"))
                y = mm(act(gate) * up, w.w_down, "w_down")
                counts = jnp.zeros((cfg.num_experts,), jnp.int32)
            x = x + (y if w.post_mlp_norm is None else norm(y, w.post_mlp_norm))
        return (x, cache), counts

    scanned = dataclasses.replace(weights.layers, **{f: None for f in stacks})
    xs = (
        scanned,
        jnp.arange(cfg.num_layers),
        jnp.asarray(windows),
        jnp.asarray(rope_of.reshape(-1), jnp.int32),
    )
    (x, cache), counts = jax.lax.scan(layer, (x, cache), xs)  # counts [L, E]
    return (norm(x, weights.final_norm), cache) + ((counts,) if routed else ()) + ((x,) if features else ())


def logits(weights: Weights, hidden, kernels: Kernels = XLA_KERNELS, cfg: ModelConfig | None = None):
    """hidden [..., D] -> float32 logits [..., V] (soft-capped where the config says)."""
    out = head(weights, hidden, kernels)
    cap = cfg.final_logit_softcapping if cfg is not None else None
    return out if cap is None else cap * jnp.tanh(out / cap)


# HF / GGUF tensor names of the shared weights ("{i}": the layer index).
LAYER_NAMES = {  # weight: (HF, GGUF)
    "attn_norm": ("input_layernorm.weight", "attn_norm.weight"),
    "wq": ("self_attn.q_proj.weight", "attn_q.weight"),
    "wk": ("self_attn.k_proj.weight", "attn_k.weight"),
    "wv": ("self_attn.v_proj.weight", "attn_v.weight"),
    "wo": ("self_attn.o_proj.weight", "attn_output.weight"),
    "mlp_norm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "w_gate": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "w_up": ("mlp.up_proj.weight", "ffn_up.weight"),
    "w_down": ("mlp.down_proj.weight", "ffn_down.weight"),
    "bq": ("self_attn.q_proj.bias", "attn_q.bias"),
    "bk": ("self_attn.k_proj.bias", "attn_k.bias"),
    "bv": ("self_attn.v_proj.bias", "attn_v.bias"),
    "q_norm": ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    "k_norm": ("self_attn.k_norm.weight", "attn_k_norm.weight"),
}


def names(layer_names: dict[str, tuple[str, str]] = LAYER_NAMES) -> tuple[dict, dict]:
    """(HF names, GGUF names) of every weight, from per-layer (HF, GGUF) suffixes."""
    hf = {
        "embed": "model.embed_tokens.weight",
        "final_norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
        **{f"layers.{w}": f"model.layers.{{i}}.{n}" for w, (n, _) in layer_names.items()},
    }
    gguf = {
        "embed": "token_embd.weight",
        "final_norm": "output_norm.weight",
        "lm_head": "output.weight",
        **{f"layers.{w}": f"blk.{{i}}.{n}" for w, (_, n) in layer_names.items()},
    }
    return hf, gguf
