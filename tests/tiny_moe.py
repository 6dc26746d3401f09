"""Tiny random mixture-of-experts models (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE) built by transformers and
saved as HF directories (one tensor per expert), and the GGUF llama.cpp's `convert_hf_to_gguf.py`
writes from each: experts stacked into `ffn_{gate,up,down}_exps` [E, out, in], the router as
`ffn_gate_inp`, Qwen2-MoE's shared expert as `ffn_{gate,up,down}_shexp` and its gate as
`ffn_gate_inp_shexp`; metadata `{arch}.expert_count`, `expert_used_count`,
`expert_feed_forward_length` (Qwen), `expert_shared_feed_forward_length` (Qwen2-MoE). Mixtral is
written as arch "llama" with its q/k rows permuted, as the converter's LlamaModel does. OLMoE's
converter (OlmoeModel) writes TextModel's keys and the expert counts, no expert ffn length (its
`feed_forward_length` is the experts'), and an rms epsilon of 1e-5 whatever the config says: the
tiny OLMoE uses 1e-5, and as many kv heads as heads (llama.cpp reads attn_k_norm as [hidden]).
transformers 5.24 cannot read an olmoe GGUF: tests compare it with the HF directory it came from.

8 experts everywhere, so that ep=2 and ep=4 split them."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import tiny_families as tf
from tiny_gguf import add_tokenizer, encode, permute

FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
EXPERTS = 8
SPECS = {
    "qwen2_moe": tf.Spec(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        gguf.MODEL_ARCH.QWEN2MOE,
        dict(
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            norm_topk_prob=False,
            rope_theta=1e6,
        ),
    ),
    "qwen3_moe": tf.Spec(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        gguf.MODEL_ARCH.QWEN3MOE,
        dict(
            num_experts=EXPERTS,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            head_dim=32,
            rope_theta=1e6,
            tie_word_embeddings=True,
        ),
    ),
    "mixtral": tf.Spec(
        "MixtralConfig",
        "MixtralForCausalLM",
        gguf.MODEL_ARCH.LLAMA,
        dict(num_local_experts=EXPERTS, num_experts_per_tok=2, intermediate_size=64, rope_theta=1e6),
    ),
    "olmoe": tf.Spec(
        "OlmoeConfig",
        "OlmoeForCausalLM",
        gguf.MODEL_ARCH.OLMOE,
        dict(
            num_experts=EXPERTS,
            num_experts_per_tok=4,
            intermediate_size=32,
            norm_topk_prob=False,
            num_key_value_heads=4,
            rms_norm_eps=1e-5,
            rope_theta=1e4,
        ),
    ),
}
ARCHITECTURES = {spec.model_class: family for family, spec in SPECS.items()}
# The per-expert HF tensors and the merged name the converter gives their stack (then mapped by
# gguf's tensor table to ffn_*_exps).
EXPERT_PARTS = {
    "qwen2_moe": ("mlp.experts.{e}.{w}_proj.weight", ("gate", "up", "down"), "mlp.experts.{w}_proj"),
    "olmoe": ("mlp.experts.{e}.{w}_proj.weight", ("gate", "up", "down"), "mlp.experts.{w}_proj"),
    "qwen3_moe": ("mlp.experts.{e}.{w}_proj.weight", ("gate", "up", "down"), "mlp.experts.{w}_proj"),
    "mixtral": (
        "block_sparse_moe.experts.{e}.{w}.weight",
        ("w1", "w2", "w3"),
        "block_sparse_moe.experts.{w}",
    ),
}


def build(family: str, directory, tokenizer, **overrides):
    """Save a tiny random `family` model and the tokenizer to `directory`; return HF's model read
    back in fp32 (the oracle): tiny_families.build with this module's specs."""
    saved = tf.SPECS.get(family)
    tf.SPECS[family] = SPECS[family]
    try:
        return tf.build(family, directory, tokenizer, **overrides)
    finally:
        if saved is None:
            del tf.SPECS[family]


def _parameters(family: str, h: dict) -> dict:
    """The converter's GGUFWriter `add_*` calls for the family."""
    if family == "mixtral":  # LlamaModel: TextModel's + vocab size and rotary dims, the expert counts
        m = tf._llama(h)
        return m | {"expert_count": h["num_local_experts"], "expert_used_count": h["num_experts_per_tok"]}
    experts = {
        "expert_count": h.get("num_experts") or h["num_local_experts"],
        "expert_used_count": h["num_experts_per_tok"],
    }
    if family == "olmoe":  # OlmoeModel: TextModel's, then add_layer_norm_rms_eps(1e-5)
        return tf._text_model(h) | experts | {"layer_norm_rms_eps": 1e-5}
    m = tf._text_model(h) | experts | {"expert_feed_forward_length": h["moe_intermediate_size"]}
    if family == "qwen2_moe":
        m["expert_shared_feed_forward_length"] = h["shared_expert_intermediate_size"]
    return m


def converted_tensors(directory) -> tuple[str, dict, dict[str, np.ndarray]]:
    """(family, hparams, GGUF name -> the tensor the converter writes, float32 [.., out, in])."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    h = tf.hparams(directory)
    family = ARCHITECTURES[h["architectures"][0]]
    raw = {}
    for part in sorted(directory.glob("model*.safetensors")):
        raw |= load_file(part)
    names = gguf.get_tensor_name_map(SPECS[family].arch, h["num_hidden_layers"])
    per_expert, parts, merged = EXPERT_PARTS[family]
    out = {}
    for i in range(h["num_hidden_layers"]):  # experts stacked per layer, as the converter merges them
        for w in parts:
            stack = [raw.pop(f"model.layers.{i}." + per_expert.format(e=e, w=w)) for e in range(EXPERTS)]
            merged_name = names.get_name(f"model.layers.{i}." + merged.format(w=w)) + ".weight"
            out[merged_name] = np.stack(stack).astype(np.float32)
    for name, x in raw.items():
        x = np.asarray(x, np.float32)
        if family == "mixtral" and name.endswith("q_proj.weight"):
            x = permute(x, h["num_attention_heads"])
        elif family == "mixtral" and name.endswith("k_proj.weight"):
            x = permute(x, h["num_key_value_heads"])
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"{family}: the converter cannot map {name!r}")
        out[new] = x
    return family, h, out


def write_gguf(directory, path, meta: dict, kind="F32") -> None:
    """The GGUF of the HF directory, as convert_hf_to_gguf.py writes it; `kind` the type of the
    2-D and 3-D tensors other than the routers (llama.cpp keeps `ffn_gate_inp` unquantized)."""
    family, h, tensors = converted_tensors(directory)
    w = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[SPECS[family].arch])
    for name, x in tensors.items():
        if x.ndim <= 1 or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
            w.add_tensor(name, x)
            continue
        data, qtype = encode(x, kind)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(Path(directory).name)
    for method, value in _parameters(family, h).items():
        getattr(w, f"add_{method}")(value)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if kind == "F32" else gguf.LlamaFileType.GUESSED)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, meta)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- our model over a token sequence, without an engine --------------------------------------------


def run_logits(
    cfg, host_weights, ids, *, mesh=None, prefill: int | None = None, matmul: str = "xla", hlo=None
) -> np.ndarray:
    """float32 logits [len(ids), V] of the family's forward over `ids` (one sequence, teacher
    forced): the first `prefill` tokens in one pass (T = prefill: sorted, ragged_dot experts), the
    others one per pass (T = 1: the decode shape, gathered experts). On `mesh` (an ("ep", "tp") or
    ("tp",) mesh) the weights and cache are placed as the engine places them. Two compiles, no
    engine: a tenth of an engine's start-up on 2 cores. matmul "pallas": the prefill pass's experts
    run the grouped matmul kernel (interpreted). `hlo`: a list that receives the compiled HLO text of
    the decode-shaped program."""
    import jax
    import jax.numpy as jnp

    from xlaserve.runtime import models, placement
    from xlaserve.runtime.attention import KVCache
    from xlaserve.runtime.config import Kernels

    family, kv = models.of(cfg), models.kv_spec(cfg)
    page, n = 16, len(ids)
    prefill = n if prefill is None else prefill
    pages = -(-n // page)
    specs = placement.matrix_specs(cfg, host_weights, mesh)
    kernels = Kernels(mesh=mesh, matrix_specs=specs, interpret=True, matmul=matmul)
    shape = (kv.num_layers, pages, page, kv.num_kv_heads, kv.head_dim)
    if mesh is None:
        weights, cache = jax.device_put(host_weights), KVCache(jnp.zeros(shape), jnp.zeros(shape))
    else:
        weights = placement.place(cfg, host_weights, mesh)
        zeros = jax.jit(lambda: jnp.zeros(shape), out_shardings=placement.cache_sharding(cfg, mesh))
        cache = KVCache(zeros(), zeros())
    table = jnp.arange(pages, dtype=jnp.int32)[None]

    @jax.jit
    def step(weights, cache, tokens, start):
        positions = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
        valid = jnp.ones_like(positions, bool)
        hidden, cache = family.forward(
            weights, cache, tokens[None], positions[None], valid[None], table,
            (start + tokens.shape[0])[None], cfg=cfg, block=pages * page, dtype=jnp.float32, kernels=kernels,
        )  # fmt: skip
        return family.logits(weights, hidden[0], kernels, cfg), cache

    ids = np.asarray(ids, np.int32)
    out, cache = step(weights, cache, jnp.asarray(ids[:prefill]), jnp.int32(0))
    rows = [np.asarray(out)]
    for i in range(prefill, n):
        if hlo is not None and i == prefill:
            hlo.append(
                step.lower(weights, cache, jnp.asarray(ids[i : i + 1]), jnp.int32(i)).compile().as_text()
            )
        out, cache = step(weights, cache, jnp.asarray(ids[i : i + 1]), jnp.int32(i))
        rows.append(np.asarray(out))
    return np.concatenate(rows)
