"""GGUF checkpoints (llama.cpp's format), read with the `gguf` package's reader.

Supported: the architectures of the registered families (`runtime/models`, by
`general.architecture`), with tensors of type F32, F16, BF16 and the quantized types of
`ggml_types.QUANT_TYPES` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS), mixed per tensor
as llama.cpp's "_M"/"_S" files mix them. Quantized matrices become `QuantArray`s, repacked exactly
(or are dequantized, bit-exactly). A weight whose layers come in different layouts (Q4_K_M stores
some layers' ffn_down as Q6_K, the others as Q4_K) is re-expressed exactly as int8 for all its
layers (`runtime.quant.to_int8`) so the layers stack. Tensor names come from the family's
`gguf_names`.

llama.cpp stores some projections (a family's `gguf_permute`: Llama's q and k) with rows permuted
for its interleaved RoPE; we undo the permutation (whole rows, so quantized blocks move intact)
and use the rotate-half RoPE of HF.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections import Counter
from pathlib import Path

import numpy as np

from xlaserve.checkpoints.ggml_types import QUANT_TYPES, to_quant
from xlaserve.checkpoints.loaded import CheckpointError, Loaded, assemble, family_of
from xlaserve.checkpoints.tokenizer import tokenizer_from_gguf
from xlaserve.runtime import models
from xlaserve.runtime.config import ModelConfig, RopeConfig
from xlaserve.runtime.models.params import declared
from xlaserve.runtime.quant import QuantArray, map_quant, to_int8

DENSE_TYPES = {"F32": 4, "F16": 2, "BF16": 2}  # bytes per element
SUPPORTED_TYPES = (*DENSE_TYPES, *QUANT_TYPES)


class _BadTensor(Exception):
    """A tensor's header entry that no data can satisfy (raised while the reader builds it)."""


@functools.cache
def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """gguf's reader, checking each tensor's type, shape and extent before building it, so that
        an error names the tensor instead of surfacing from inside numpy."""

        def _get(self, offset, dtype, count=1, override_order=None):
            # The reader slices its np.memmap once per metadata value: ~760k slices for a 151k-token
            # vocabulary (Qwen2), each paying memmap's __array_finalize__ (9.5 s of 10 to open
            # Qwen2.5-1.5B). The same bytes through a plain ndarray view of the map: 2.8 s.
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            dt = np.dtype(dtype)
            order = self.byte_order if override_order is None else override_order
            if order != "I":  # "I": native order, the view's dtype as it is
                dt = dt.newbyteorder(order)
            return plain[offset : offset + dt.itemsize * int(count)].view(dt)

        def _build_tensors(self, start_offs, fields):
            for field in fields:
                try:
                    _, name, _, dims, raw_type, offset = field.parts
                except ValueError:  # another gguf version's layout: the reader checks what it can
                    break
                name = bytes(name).decode("utf-8", "replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                except ValueError:
                    raise _BadTensor(f"tensor {name} has unknown type id {int(raw_type[0])}") from None
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                shape = [int(d) for d in reversed(dims.tolist())]
                if shape and shape[-1] % block:
                    raise _BadTensor(
                        f"tensor {name} has type {qtype.name} and shape {shape}: its rows of "
                        f"{shape[-1]} are not a whole number of {block}-element blocks"
                    )
                end = start_offs + int(offset[0]) + int(np.prod(shape)) // block * size
                if end > len(self.data):
                    raise _BadTensor(
                        f"truncated or corrupt GGUF file: tensor {name} ({qtype.name}, shape {shape}) "
                        f"ends at byte {end}, past the end of the file ({len(self.data)} bytes)"
                    )
            super()._build_tensors(start_offs, fields)

    return Reader


def open_reader(path: Path):
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = _reader_class()(path, "r")
    except _BadTensor as e:
        raise CheckpointError(path, str(e)) from None
    except Exception as e:  # the reader fails deep inside numpy on truncated or corrupt files
        size = os.path.getsize(path)
        raise CheckpointError(
            path, f"truncated or corrupt GGUF file ({size} bytes; reader said: {type(e).__name__}: {e})"
        ) from None
    check_extents(reader, path)
    return reader


def check_extents(reader, path: Path) -> None:
    """Each tensor's data (its size implied by type and shape) must end before the next one begins:
    a header whose shapes and the data written disagree would otherwise read another tensor's bytes."""
    spans = sorted(reader.tensors, key=lambda t: int(t.data_offset))
    for t, after in itertools.pairwise(spans):
        start, size, nxt = int(t.data_offset), int(t.n_bytes), int(after.data_offset)
        if start + size > nxt:
            shape = [int(d) for d in reversed(t.shape.tolist())]
            raise CheckpointError(
                path,
                f"tensor {t.name} ({t.tensor_type.name}, shape {shape}) needs {size} bytes but the "
                f"next tensor's data starts {nxt - start} bytes after its own",
            )


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
    family = models.for_gguf(arch, experts=bool(meta.get(f"{arch}.expert_count")))
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
    # biases the family does not declare (llama's attention_bias) are refused by Family.check
    declares = lambda name: name in family.gguf_names
    bias = lambda kind: any(name.startswith("blk.0.") and name.endswith(f"{kind}.bias") for name in tensors)
    head_dim = get("attention.key_length", hidden // heads)
    rotary = get("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise CheckpointError(
            path,
            f"{arch}.rope.dimension_count={rotary}: partial rotary embeddings are not supported "
            f"(supported: the whole head, {head_dim})",
        )
    swa_base = meta.get(f"{arch}.rope.freq_base_swa") is not None and window
    optional = lambda key: None if meta.get(f"{arch}.{key}") is None else get(key, kind=float)
    try:
        cfg = ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv", heads),
            head_dim=head_dim,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
            rope=rope,
            max_position_embeddings=get("context_length", 4096),
            tie_word_embeddings=family.gguf_names["lm_head"] not in tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            name=str(meta.get("general.name", family.name)),
            architecture=family.name,
            sliding_window=int(window) if window else None,
            attention_bias=bias("attn_q") and not declares("layers.bq"),
            mlp_bias=bias("ffn_up"),
            rope_local=RopeConfig(theta=get("rope.freq_base_swa", kind=float)) if swa_base else None,
            attn_logit_softcapping=optional("attn_logit_softcapping"),
            final_logit_softcapping=optional("final_logit_softcapping"),
            **moe_fields(meta, arch, get),
        )
    except CheckpointError:
        raise
    except ValueError as e:  # a value ModelConfig refuses (top-k above the expert count, ...)
        raise CheckpointError(path, str(e)) from None
    fixed = family.gguf_config(cfg)
    if "layer_types" in fixed and cfg.sliding_window is None:
        fixed = {**fixed, "layer_types": None, "rope_local": None}
    try:
        return dataclasses.replace(cfg, **fixed)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None


def moe_fields(meta: dict, arch: str, get) -> dict:
    """The mixture-of-experts fields of the metadata (none without `{arch}.expert_count`); the
    top-k renormalisation is the family's (`gguf_config`), as llama.cpp fixes it per architecture."""
    if not meta.get(f"{arch}.expert_count"):
        return {}
    size = meta.get(f"{arch}.expert_feed_forward_length")
    return dict(
        num_experts=get("expert_count"),
        num_experts_per_tok=get("expert_used_count"),
        moe_intermediate_size=get("expert_feed_forward_length") if size else None,
        shared_expert_intermediate_size=get("expert_shared_feed_forward_length", 0),
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
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy order: [N, K]
    block, size = (1, DENSE_TYPES[kind]) if kind in DENSE_TYPES else _sizes(kind)
    if shape[-1] % block or data.nbytes != int(np.prod(shape)) // block * size:
        raise CheckpointError(
            path, f"tensor {t.name}: {data.nbytes} bytes do not hold a {kind} tensor of shape {list(shape)}"
        )
    if kind == "F32":
        return np.asarray(data, np.float32)
    if kind == "F16":
        return data.astype(np.float32)
    if kind == "BF16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return to_quant(data, kind, shape)


def _sizes(kind: str) -> tuple[int, int]:
    return QUANT_TYPES[kind].block, QUANT_TYPES[kind].nbytes


def unpermute_rows(x, n_head: int):
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE) on axis 0.

    llama.cpp applied reshape(n_head, 2, half).swapaxes(1, 2); the inverse swaps back from
    reshape(n_head, half, 2)."""

    def inverse(a):
        return a.reshape(n_head, a.shape[0] // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    return map_quant(inverse, x) if isinstance(x, QuantArray) else inverse(x)


def common_layouts(cfg: ModelConfig, family, tensors: dict) -> dict[str, tuple[int, bool]]:
    """Stacked weights whose layers are all quantized but not in one layout (kind, group, min) ->
    the int8 (block, asym) that `to_int8` re-expresses every layer in, exactly. (Layers that
    disagree only in scale dtype, float16 against float32, stack as float32: also exact.)"""
    out = {}
    for name, info in declared(models.declare(cfg)).items():
        if info.layers is None or name not in family.gguf_names:
            continue
        names = (family.gguf_names[name].format(i=i) for i in info.layers)
        types = {tensors[n].tensor_type.name for n in names if n in tensors}
        if not types <= QUANT_TYPES.keys():  # a dense (or unsupported) layer: assemble's business
            continue
        layouts = {QUANT_TYPES[t].layout for t in types}
        if len(layouts) > 1:
            out[name] = (min(g for _, g, _ in layouts), any(asym for *_, asym in layouts))
    return out


def load_gguf(path, *, dequantize: bool, dtype) -> Loaded:
    path = Path(path)
    reader = open_reader(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    freq = tensors.get("rope_freqs.weight")
    freq_factors = tuple(float(f) for f in read_tensor(freq, path)) if freq is not None else None
    cfg = config_from_metadata(meta, tensors, path, freq_factors)
    family = family_of(cfg, path)
    common = {} if dequantize else common_layouts(cfg, family, tensors)

    def read(name: str, layer: int | None):
        tensor = family.gguf_names[name].format(i=layer)
        if tensor not in tensors:
            raise CheckpointError(path, f"tensor {tensor} is missing")
        x = read_tensor(tensors[tensor], path)
        if layer is not None and name in common and isinstance(x, QuantArray):
            x = to_int8(x, *common[name])
        heads = family.gguf_permute.get(name)
        x = unpermute_rows(x, getattr(cfg, heads)) if heads else x
        undo = family.gguf_transforms.get(name)
        return undo(x) if undo else x

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
