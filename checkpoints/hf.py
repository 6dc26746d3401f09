"""HF checkpoint directories: config.json, *.safetensors (one file or sharded with an index),
tokenizer.json, tokenizer_config.json, generation_config.json. Llama family, bf16/fp16/fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xlaserve.checkpoints.base import CheckpointError, Loaded, stack_layers
from xlaserve.checkpoints.safetensors import read_safetensors
from xlaserve.checkpoints.tokenizer import tokenizer_from_hf_dir
from xlaserve.runtime.config import ModelConfig, RopeConfig
from xlaserve.runtime.llama import Weights, check_shapes

MODEL_TYPES = ("llama",)
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}


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


def rope_from_config(c: dict, path: Path) -> RopeConfig:
    """HF spells RoPE as `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters`
    (transformers 5)."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
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
    if c.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(
            path, f"unsupported model_type {c.get('model_type')!r} (supported: {', '.join(MODEL_TYPES)})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            raise CheckpointError(path, f"{flag}=true is not supported")
    try:
        heads = int(c["num_attention_heads"])
        gen = _json(directory / "generation_config.json", required=False)
        eos = _ids(c.get("eos_token_id")) + _ids(gen.get("eos_token_id"))
        return ModelConfig(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope=rope_from_config(c, path),
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            name=directory.name,
        )
    except KeyError as e:
        raise CheckpointError(path, f"required key {e.args[0]!r} is missing") from None


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
    tokenizer = tokenizer_from_hf_dir(directory)
    tensors = _tensors(directory)

    def get(name: str):
        if name not in tensors:
            raise CheckpointError(directory, f"tensor {name} is missing from the safetensors files")
        return np.asarray(tensors[name])

    per_layer = [
        {field: get(f"model.layers.{i}.{hf}.weight") for field, hf in LAYER_TENSORS.items()}
        for i in range(cfg.num_layers)
    ]
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in tensors
    if tied and not cfg.tie_word_embeddings:
        raise CheckpointError(directory, "tensor lm_head.weight is missing and tie_word_embeddings is false")
    weights = Weights(
        embed=get("model.embed_tokens.weight").astype(dtype),
        layers=stack_layers(per_layer, True, dtype),
        final_norm=get("model.norm.weight").astype(dtype),
        lm_head=None if tied else get("lm_head.weight").astype(dtype),
    )
    try:
        check_shapes(cfg, weights, str(directory))
    except ValueError as e:
        raise CheckpointError(directory, str(e).split(": ", 1)[-1]) from None
    return Loaded(config=cfg, weights=weights, tokenizer=tokenizer, source=str(directory))
