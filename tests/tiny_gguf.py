"""Write small Llama GGUF files with every supported tensor type, the way llama.cpp's converter
does (q/k rows permuted for interleaved RoPE), reusing the real model's tokenizer metadata."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

TYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16, "Q8_0": T.Q8_0, "Q4_0": T.Q4_0, "Q4_1": T.Q4_1}


@dataclass(frozen=True)
class Tiny:
    layers: int = 2
    hidden: int = 64
    ffn: int = 128
    heads: int = 4
    kv_heads: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def tokenizer_meta(real_gguf, vocab: int = 2048) -> dict:
    """The real model's tokenizer cut to its first `vocab` tokens (specials, the byte alphabet and
    the earliest merges) with the merges that stay inside it: small files that parse fast."""
    r = gguf.GGUFReader(real_gguf)
    get = lambda k: r.fields[k].contents()
    tokens = get("tokenizer.ggml.tokens")[:vocab]
    known = set(tokens)
    merges = [
        m
        for m in get("tokenizer.ggml.merges")
        if "".join(m.split(" ")) in known and set(m.split(" ")) <= known
    ]
    return {
        "tokens": tokens,
        "types": get("tokenizer.ggml.token_type")[:vocab],
        "merges": merges,
        "template": get("tokenizer.chat_template"),
    }


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion of HF q/k rows (rotate-half) to its interleaved RoPE order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(tiny: Tiny, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-layout ([out, in]) weights for the tiny model."""
    rng = np.random.default_rng(seed)
    d, f, q, kv = tiny.hidden, tiny.ffn, tiny.heads * tiny.head_dim, tiny.kv_heads * tiny.head_dim
    mat = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
    w = {"token_embd.weight": mat(vocab, d), "output_norm.weight": 1 + mat(d)}
    for i in range(tiny.layers):
        w |= {
            f"blk.{i}.attn_norm.weight": 1 + mat(d),
            f"blk.{i}.attn_q.weight": mat(q, d),
            f"blk.{i}.attn_k.weight": mat(kv, d),
            f"blk.{i}.attn_v.weight": mat(kv, d),
            f"blk.{i}.attn_output.weight": mat(d, q),
            f"blk.{i}.ffn_norm.weight": 1 + mat(d),
            f"blk.{i}.ffn_gate.weight": mat(f, d),
            f"blk.{i}.ffn_up.weight": mat(f, d),
            f"blk.{i}.ffn_down.weight": mat(d, f),
        }
    return w


def encode(x: np.ndarray, kind: str):
    """(data, raw_dtype) as GGUFWriter.add_tensor wants them for `kind`."""
    t = TYPES[kind]
    if t == T.F32:
        return x, None
    if t == T.F16:
        return x.astype(np.float16), None
    return quants.quantize(x, t), t


def write_tiny_gguf(
    path,
    meta: dict,
    kind: str = "Q4_1",
    *,
    tiny: Tiny = Tiny(),
    arch: str = "llama",
    skip: tuple[str, ...] = (),
    raw: dict | None = None,
    tokenizer: bool = True,
    seed: int = 0,
):
    """Write the model; matrices as `kind`, norms as F32. `raw` maps tensor names to
    (bytes uint8 array, GGMLQuantizationType) written verbatim. Returns the HF-layout weights."""
    vocab = len(meta["tokens"])
    weights = hf_weights(tiny, vocab, seed)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(tiny.layers)
    w.add_context_length(1024)
    w.add_embedding_length(tiny.hidden)
    w.add_feed_forward_length(tiny.ffn)
    w.add_head_count(tiny.heads)
    w.add_head_count_kv(tiny.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(tiny.head_dim)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(meta["tokens"])
        w.add_token_types(meta["types"])
        w.add_token_merges(meta["merges"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_chat_template(meta["template"])
    for name, x in weights.items():
        if name in skip:
            continue
        if raw and name in raw:
            data, qtype = raw[name]
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
            continue
        if ".attn_q." in name:
            x = permute(x, tiny.heads)
        elif ".attn_k." in name:
            x = permute(x, tiny.kv_heads)
        data, qtype = (x, None) if x.ndim == 1 else encode(x, kind)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights
