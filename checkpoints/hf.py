"""HF checkpoint directories: config.json, *.safetensors (one file or sharded with an index),
tokenizer.json, tokenizer_config.json, generation_config.json; bf16/fp16/fp32. The family comes
from config.json's `architectures` (else `model_type`) and names the tensors (`hf_names`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from xlaserve.checkpoints.loaded import CheckpointError, Loaded, assemble, family_of
from xlaserve.checkpoints.safetensors import read_safetensors
from xlaserve.checkpoints.tokenizer import tokenizer_from_hf_dir
from xlaserve.runtime import models
from xlaserve.runtime.config import LAYER_TYPES, ModelConfig, RopeConfig


def _json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(path, "file is missing")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"invalid JSON ({e})") from None


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def ropes_from_config(c: dict, path: Path) -> tuple[RopeConfig, RopeConfig | None]:
    """(the RoPE of global layers, that of sliding layers where it differs). transformers 5 may key
    `rope_parameters` by layer type (Gemma 3); transformers 4 wrote `rope_local_base_freq`."""
    params = c.get("rope_parameters") or {}
    if "full_attention" in params:
        rope = rope_from_config({**c, "rope_parameters": params["full_attention"]}, path)
        local = params.get("sliding_attention")
        local = rope_from_config({**c, "rope_parameters": local}, path) if local else None
    else:
        rope = rope_from_config(c, path)
        local = RopeConfig(theta=float(c["rope_local_base_freq"])) if c.get("rope_local_base_freq") else None
    return rope, (local if local != rope else None)


def rope_from_config(c: dict, path: Path) -> RopeConfig:
    """HF spells RoPE as `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters`
    (transformers 5)."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise CheckpointError(path, f"partial_rotary_factor={partial} is not supported (supported: 1.0)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise CheckpointError(path, f"unsupported RoPE scaling {kind!r} (supported: default, linear, llama3)")


def config_from_hf(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    c = _json(path, required=True)
    family = models.for_hf(c.get("architectures"), c.get("model_type"))
    if family is None:
        supported = ", ".join(models.hf_model_types())
        raise CheckpointError(
            path, f"unsupported model_type {c.get('model_type')!r} (supported: {supported})"
        )
    if c.get("clip_qkv") is not None:  # OLMo/OLMoE/DBRX clamp q, k, v to [-clip, clip]: not implemented
        raise CheckpointError(
            path, f"clip_qkv={c['clip_qkv']} is not supported (supported: null, no clamping)"
        )
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    try:
        heads = int(c["num_attention_heads"])
        gen = _json(directory / "generation_config.json", required=False)
        eos = _ids(c.get("eos_token_id")) + _ids(gen.get("eos_token_id"))
        layers = int(c["num_hidden_layers"])
        window, types = layer_windows(
            window, c.get("layer_types") or family.layer_types(layers), layers, path
        )
        rope, rope_local = ropes_from_config(c, path)
        number = lambda key: None if c.get(key) is None else float(c[key])
        cfg = ModelConfig(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            name=directory.name,
            architecture=family.name,
            hidden_act=str(c.get("hidden_act") or c.get("hidden_activation") or "silu"),
            sliding_window=window,
            attention_bias=bool(c.get("attention_bias", False)),
            mlp_bias=bool(c.get("mlp_bias", False)),
            layer_types=types,
            rope_local=rope_local if window else None,
            attn_logit_softcapping=number("attn_logit_softcapping"),
            final_logit_softcapping=number("final_logit_softcapping"),
            query_pre_attn_scalar=number("query_pre_attn_scalar"),
            **moe_fields(c, path),
        )
        return dataclasses.replace(cfg, **family.hf_config(cfg))
    except KeyError as e:
        raise CheckpointError(path, f"required key {e.args[0]!r} is missing") from None
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None


def moe_fields(c: dict, path: Path) -> dict:
    """The mixture-of-experts fields of config.json (none for a dense model). Every layer must have
    experts: dense layers among them (`decoder_sparse_step` > 1, `mlp_only_layers`) are refused."""
    experts = int(c.get("num_experts") or c.get("num_local_experts") or 0)
    if not experts:
        return {}
    step, dense = int(c.get("decoder_sparse_step") or 1), list(c.get("mlp_only_layers") or [])
    if step != 1 or dense:
        raise CheckpointError(
            path,
            f"decoder_sparse_step={step}, mlp_only_layers={dense}: layers without experts are not "
            "supported (supported: decoder_sparse_step=1 and no mlp_only_layers, every layer MoE)",
        )
    size = c.get("moe_intermediate_size")
    return dict(
        num_experts=experts,
        num_experts_per_tok=int(c.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(size) if size else None,
        shared_expert_intermediate_size=int(c.get("shared_expert_intermediate_size") or 0),
        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
    )


def layer_windows(window, types, layers: int, path) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) in their plainest form: no window when no layer slides, no
    layer_types when every layer is alike."""
    if types is not None:
        types = tuple(types)
        if len(types) != layers or not set(types) <= set(LAYER_TYPES):
            raise CheckpointError(
                path, f"layer_types must give one of {LAYER_TYPES} for each of the {layers} layers"
            )
        if "sliding_attention" not in types:
            return None, None
        if set(types) == {"sliding_attention"}:
            types = None
    if window is not None and int(window) < 1:
        raise CheckpointError(path, f"sliding_window={window} must be ≥ 1")
    return (int(window) if window else None), (types if window else None)


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_json(index, required=True).get("weight_map", {}).values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(
                directory / missing[0], "shard listed in model.safetensors.index.json is missing"
            )
        paths = [directory / f for f in files]
    else:
        paths = sorted(directory.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(directory, "no *.safetensors weights found")
    tensors = {}
    for p in paths:
        tensors.update(read_safetensors(p))
    return tensors


def load_hf_dir(directory, *, dtype) -> Loaded:
    directory = Path(directory)
    cfg = config_from_hf(directory)
    family = family_of(cfg, directory / "config.json")
    tokenizer = tokenizer_from_hf_dir(directory)
    tensors = _tensors(directory)
    if not cfg.tie_word_embeddings and family.hf_names["lm_head"] not in tensors:
        raise CheckpointError(directory, "tensor lm_head.weight is missing and tie_word_embeddings is false")

    def one(tensor: str):
        if tensor not in tensors:
            raise CheckpointError(directory, f"tensor {tensor} is missing from the safetensors files")
        return np.asarray(tensors[tensor])

    def read(name: str, layer: int | None):
        template = family.hf_names[name]
        if "{e}" in template:  # one tensor per expert, stacked [E, ...]
            return np.stack([one(template.format(i=layer, e=e)) for e in range(cfg.num_experts)])
        return one(template.format(i=layer))

    weights = assemble(cfg, read, dequant=True, dtype=dtype, path=directory)
    return Loaded(config=cfg, weights=weights, tokenizer=tokenizer, source=str(directory))
