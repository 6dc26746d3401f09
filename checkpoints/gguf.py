"""GGUF checkpoints (llama.cpp's format), read with the `gguf` package's reader.

Supported: the architectures of the registered families (`runtime/models`, by
`general.architecture`), with tensors of type F32, F16, BF16, Q8_0, Q4_0 and Q4_1. Quantized
matrices become `QuantArray`s (or are dequantized, bit-exactly). Tensor names come from the
family's `gguf_names`.

llama.cpp stores some projections (a family's `gguf_permute`: Llama's q and k) with rows permuted
for its interleaved RoPE; we undo the permutation (whole rows, so quantized blocks move intact)
and use the rotate-half RoPE of HF.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from xlaserve.checkpoints.loaded import CheckpointError, Loaded, assemble, family_of
from xlaserve.checkpoints.tokenizer import tokenizer_from_gguf
from xlaserve.runtime import models
from xlaserve.runtime.config import ModelConfig, RopeConfig
from xlaserve.runtime.quant import QuantArray, map_quant

# type name -> (block elements, bytes per block, bytes of scales/mins before the values)
QUANT_LAYOUT = {"Q8_0": (32, 34, 2), "Q4_0": (32, 18, 2), "Q4_1": (32, 20, 4)}
DENSE_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = DENSE_TYPES + tuple(QUANT_LAYOUT)


def open_reader(path: Path):
    import gguf

    if not path.is_file():
        raise CheckpointError(path, "file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader fails deep inside numpy on truncated or corrupt files
        size = os.path.getsize(path)
        raise CheckpointError(
            path, f"truncated or corrupt GGUF file ({size} bytes; reader said: {type(e).__name__}: {e})"
        ) from None


def read_metadata(reader) -> dict:
    meta = {}
    for key, fld in reader.fields.items():
        try:
            meta[key] = fld.contents()
        except Exception:  # an unreadable value we do not need stays out
            continue
    return meta


def config_from_metadata(meta: dict, tensors: dict, path: Path, freq_factors=None) -> ModelConfig:
    arch = meta.get("general.architecture")
    family = models.for_gguf(arch)
    if family is None:
        supported = ", ".join(models.gguf_architectures())
        raise CheckpointError(path, f"unsupported architecture {arch!r} (supported: {supported})")

    def get(key: str, default=None, kind=int):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(path, f"metadata key {arch}.{key} is missing")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise CheckpointError(path, f"metadata key {arch}.{key} = {value!r} is not a single number")
        return kind(value)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    embed = tensors.get(family.gguf_names["embed"])
    rows = int(embed.shape[-1]) if embed is not None else None  # GGUF shapes are [in, out]
    vocab = len(tokens) if tokens else get("vocab_size", rows)
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(path, f"unsupported RoPE scaling {scaling!r} (supported: none, linear)")
    rope = RopeConfig(
        theta=get("rope.freq_base", 10000.0, float),
        kind="linear" if scaling == "linear" else "default",
        factor=get("rope.scaling.factor", 1.0, float),
        freq_factors=freq_factors,
    )
    eos = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    window = meta.get(f"{arch}.attention.sliding_window")
    bias = lambda kind: any(name.startswith("blk.0.") and name.endswith(f"{kind}.bias") for name in tensors)
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
        rope=rope,
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings=family.gguf_names["lm_head"] not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        name=str(meta.get("general.name", family.name)),
        architecture=family.name,
        sliding_window=int(window) if window else None,
        attention_bias=bias("attn_q"),
        mlp_bias=bias("ffn_up"),
    )


def read_tensor(t, path: Path):
    """A GGUF tensor as float32 numpy ([N, K] or [K]) or, for quantized types, a `QuantArray`."""
    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(
            path,
            f"tensor {t.name} has type {kind}, which is not supported "
            f"(supported: {', '.join(SUPPORTED_TYPES)})",
        )
    data = t.data
    if kind == "F32":
        return np.asarray(data, np.float32)
    if kind == "F16":
        return data.astype(np.float32)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy order: [N, K]
    if kind == "BF16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    block, block_bytes, head = QUANT_LAYOUT[kind]
    rows, k = int(np.prod(shape[:-1])), shape[-1]
    blocks = data.reshape(rows, k // block, block_bytes)
    half = lambda a, b: np.ascontiguousarray(blocks[..., a:b]).view(np.float16).reshape(rows, k // block)
    values = np.ascontiguousarray(blocks[..., head:]).reshape(rows, -1)
    return QuantArray(
        data=values.view(np.int8) if kind == "Q8_0" else values,
        scale=half(0, 2),
        min=half(2, 4) if kind == "Q4_1" else None,
        kind=kind.lower(),
        block=block,
    )


def unpermute_rows(x, n_head: int):
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE) on axis 0.

    llama.cpp applied reshape(n_head, 2, half).swapaxes(1, 2); the inverse swaps back from
    reshape(n_head, half, 2)."""

    def inverse(a):
        return a.reshape(n_head, a.shape[0] // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    return map_quant(inverse, x) if isinstance(x, QuantArray) else inverse(x)


def load_gguf(path, *, dequantize: bool, dtype) -> Loaded:
    path = Path(path)
    reader = open_reader(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    freq = tensors.get("rope_freqs.weight")
    freq_factors = tuple(float(f) for f in read_tensor(freq, path)) if freq is not None else None
    cfg = config_from_metadata(meta, tensors, path, freq_factors)
    family = family_of(cfg, path)

    def read(name: str, layer: int | None):
        tensor = family.gguf_names[name].format(i=layer)
        if tensor not in tensors:
            raise CheckpointError(path, f"tensor {tensor} is missing")
        x = read_tensor(tensors[tensor], path)
        heads = family.gguf_permute.get(name)
        return unpermute_rows(x, getattr(cfg, heads)) if heads else x

    weights = assemble(cfg, read, dequant=dequantize, dtype=dtype, path=path)
    kinds = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    return Loaded(
        config=cfg,
        weights=weights,
        tokenizer=tokenizer_from_gguf(meta, path),
        source=str(path),
        quantization=kinds.most_common(1)[0][0].lower() if kinds else "none",
        info={"tensor_types": dict(kinds)},
    )
