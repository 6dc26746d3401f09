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
import numpy as np

from xlaserve.runtime.attention import KVCache, paged_attention, token_slots, write_kv
from xlaserve.runtime.config import XLA_KERNELS, Kernels, ModelConfig
from xlaserve.runtime.quant import QuantArray, linear, take_rows

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


@dataclass(frozen=True)
class ParamInfo:
    """One declaration per array: its shape, its logical axes (for sharding) and whether it is a
    matrix that may be quantized. Loaders check against it; random init and shardings derive from it."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    matrix: bool


def param_info(cfg: ModelConfig) -> Weights:
    """A `Weights` whose leaves are `ParamInfo`s."""
    n, d, f, k = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * k, cfg.num_kv_heads * k
    mat = lambda *shape_axes: ParamInfo(
        tuple(s for s, _ in shape_axes), tuple(a for _, a in shape_axes), True
    )
    vec = lambda *shape_axes: ParamInfo(
        tuple(s for s, _ in shape_axes), tuple(a for _, a in shape_axes), False
    )
    lay = (n, "layers")
    layers = Layer(
        attn_norm=vec(lay, (d, None)),
        wq=mat(lay, (q, "q_heads"), (d, "embed")),
        wk=mat(lay, (kv, "kv_heads"), (d, "embed")),
        wv=mat(lay, (kv, "kv_heads"), (d, "embed")),
        wo=mat(lay, (d, "embed"), (q, "q_heads")),
        mlp_norm=vec(lay, (d, None)),
        w_gate=mat(lay, (f, "ffw"), (d, "embed")),
        w_up=mat(lay, (f, "ffw"), (d, "embed")),
        w_down=mat(lay, (d, "embed"), (f, "ffw")),
    )
    head = None if cfg.tie_word_embeddings else mat((cfg.vocab_size, "vocab"), (d, "embed"))
    return Weights(
        embed=mat((cfg.vocab_size, "vocab"), (d, "embed")),
        layers=layers,
        final_norm=vec((d, None)),
        lm_head=head,
    )


def is_info(x) -> bool:
    return isinstance(x, ParamInfo)


def random_weights(cfg: ModelConfig, seed: int = 0, dtype=jnp.bfloat16) -> Weights:
    """Random weights with the real shapes (benchmark presets); norms are ones."""
    leaves, treedef = jax.tree.flatten(param_info(cfg), is_leaf=is_info)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def init(info: ParamInfo, key):
        if not info.matrix:
            return jnp.ones(info.shape, dtype)
        return (jax.random.normal(key, info.shape, jnp.float32) * info.shape[-1] ** -0.5).astype(dtype)

    return jax.tree.unflatten(treedef, [init(i, k) for i, k in zip(leaves, keys, strict=True)])


def check_shapes(cfg: ModelConfig, weights: Weights, source: str) -> None:
    """Raise ValueError naming the first array whose shape differs from the declaration."""
    infos = jax.tree_util.tree_flatten_with_path(param_info(cfg), is_leaf=is_info)[0]
    arrays = jax.tree.leaves(weights, is_leaf=lambda x: isinstance(x, QuantArray))
    if len(infos) != len(arrays):
        raise ValueError(f"{source}: expected {len(infos)} weight arrays, found {len(arrays)}")
    for (path, info), arr in zip(infos, arrays, strict=True):
        if tuple(arr.shape) != info.shape:
            name = jax.tree_util.keystr(path)
            raise ValueError(f"{source}: weight {name} has shape {tuple(arr.shape)}, expected {info.shape}")


def rms_norm(x, weight, eps: float):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope(x, positions, inv_freq: np.ndarray):
    """Rotate-half RoPE. x [B, T, ..., K]; positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, K/2]
    freqs = freqs.reshape(*freqs.shape[:2], *(1,) * (x.ndim - 3), freqs.shape[-1])
    cos, sin = jnp.cos(freqs).astype(x.dtype), jnp.sin(freqs).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


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
):
    """Run the decoder over tokens [B, T] at `positions` [B, T], writing their K/V into the cache.

    `valid` [B, T] marks real tokens (padding and idle slots write nothing); `kv_len` [B] is each
    sequence's length including these tokens. Returns (hidden states [B, T, D] after the final
    norm, updated cache).
    """
    b, t = tokens.shape
    h, g, k = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    inv_freq = cfg.rope.inv_freq(k)
    pages, offsets = token_slots(page_table, positions, valid, cache.page_size, cache.num_pages)
    x = take_rows(weights.embed, tokens, dtype)
    specs = matrix_specs(cfg, weights, kernels)
    mm = lambda x, w, name: linear(x, w, kernels=kernels, spec=specs[name])

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
            x = x + mm(jax.nn.silu(mm(y, w.w_gate, "w_gate")) * mm(y, w.w_up, "w_up"), w.w_down, "w_down")
        return (x, cache), None

    (x, cache), _ = jax.lax.scan(layer, (x, cache), (weights.layers, jnp.arange(cfg.num_layers)))
    return rms_norm(x, weights.final_norm, cfg.rms_norm_eps), cache


def logits(
    weights: Weights, hidden, kernels: Kernels = XLA_KERNELS, cfg: ModelConfig | None = None
) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., V]."""
    head = weights.lm_head if weights.lm_head is not None else weights.embed
    spec = matrix_specs(cfg, weights, kernels)["head"] if cfg is not None else (None, None)
    return linear(hidden, head, out_dtype=jnp.float32, kernels=kernels, spec=spec)


def matrix_specs(cfg: ModelConfig, weights: Weights, kernels: Kernels) -> dict:
    """(output, input) mesh axes of every matrix (all (None, None) without a mesh)."""
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    if kernels.mesh is None:
        return dict.fromkeys((*names, "head"), (None, None))
    from xlaserve.sharding.rules import matrix_spec  # (sharding imports this module)

    info = param_info(cfg)
    block = lambda w: w.block if isinstance(w, QuantArray) else 1
    specs = {
        n: matrix_spec(cfg, getattr(info.layers, n), kernels.mesh, block(getattr(weights.layers, n)))
        for n in names
    }
    head = weights.lm_head if weights.lm_head is not None else weights.embed
    specs["head"] = matrix_spec(cfg, info.lm_head or info.embed, kernels.mesh, block(head))
    return specs


def cast_weights(weights: Weights, dtype) -> Weights:
    """Dense arrays to `dtype`; quantized arrays are left as they are."""
    return jax.tree.map(
        lambda a: a if isinstance(a, QuantArray) else a.astype(dtype),
        weights,
        is_leaf=lambda a: isinstance(a, QuantArray),
    )


def weight_bytes(weights: Weights) -> int:
    leaves = jax.tree.leaves(weights, is_leaf=lambda a: isinstance(a, QuantArray))
    return sum(a.nbytes if isinstance(a, QuantArray) else a.size * a.dtype.itemsize for a in leaves)
