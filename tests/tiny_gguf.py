"""Write small Llama GGUF files with every supported tensor type, the way llama.cpp's converter
does (q/k rows permuted for interleaved RoPE), reusing the real model's tokenizer metadata.

`gguf.quants` can quantize only some types (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1); for the
K-quants and IQ4 types `kquantize` writes valid blocks by plain round-to-nearest (not llama.cpp's
search, which only makes the weights closer: the tests compare dequantizations of the same bytes)."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

OLD = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")  # the types read before K-quants
NEW = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
TYPES = {name: T[name] for name in OLD + NEW}
QK_K = 256


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


def add_tokenizer(w: gguf.GGUFWriter, meta: dict) -> None:
    """The tokenizer of `tokenizer_meta` as llama.cpp's converter writes a gpt2 BPE (SmolLM2's
    pre-tokenizer, <|im_start|> = 1 as BOS, <|im_end|> = 2 as EOS)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(meta["template"])


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


def tiny_for(kind: str) -> Tiny:
    """The default tiny model, or one whose rows hold whole 256-element super-blocks."""
    if quants.GGML_QUANT_SIZES[TYPES[kind]][0] == QK_K:
        return Tiny(hidden=256, ffn=512)
    return Tiny()


def encode(x: np.ndarray, kind: str):
    """(data, raw_dtype) as GGUFWriter.add_tensor wants them for `kind`."""
    t = TYPES[kind]
    if t == T.F32:
        return x, None
    if t == T.F16:
        return x.astype(np.float16), None
    if kind in KQUANT:
        return kquantize(x, kind), t
    return quants.quantize(x, t), t


# -- encoders for the types gguf.quants only dequantizes -----------------------------------------


def pack_bits(q: np.ndarray, width: int, bits: int) -> np.ndarray:
    """Fields [n, m] in gguf's element order -> bytes: the inverse of its unpacking, which takes
    for each run of `width` bytes the lowest `bits` of every byte, then the next, and so on."""
    f = q.reshape(q.shape[0], -1, 8 // bits, width).astype(np.uint8)
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(1, 1, -1, 1)
    return np.bitwise_or.reduce(f << shifts, axis=2).reshape(q.shape[0], -1)


def f16_bytes(a) -> np.ndarray:
    return np.asarray(a, np.float16).reshape(-1, 1).view(np.uint8)


def _ratio(a, b):
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def _symmetric(sub, qmax: int, smax: int, smin: int):
    """Sub-blocks [n, s, g] -> super scale d (f16 [n, 1]), sub scales sc and effective scales."""
    s = np.abs(sub).max(-1) / qmax
    d = np.asarray(s.max(-1, keepdims=True) / smax, np.float16)
    sc = np.clip(np.rint(_ratio(s, d.astype(np.float32))), smin, smax)
    return d, sc.astype(np.int8), d.astype(np.float32) * sc


def _affine(sub, qmax: int, smax: int):
    """Sub-blocks [n, s, g] -> (d, dmin, sc, m, q) with w ~ d*sc*q - dmin*m, q in [0, qmax]."""
    lo = np.minimum(sub.min(-1), 0)
    s, mn = (sub.max(-1) - lo) / qmax, -lo
    d = np.asarray(s.max(-1, keepdims=True) / smax, np.float16)
    dmin = np.asarray(mn.max(-1, keepdims=True) / smax, np.float16)
    sc = np.clip(np.rint(_ratio(s, d.astype(np.float32))), 0, smax).astype(np.uint8)
    m = np.clip(np.rint(_ratio(mn, dmin.astype(np.float32))), 0, smax).astype(np.uint8)
    eff_d, eff_m = d.astype(np.float32) * sc, dmin.astype(np.float32) * m
    q = np.clip(
        np.rint(_ratio(sub + eff_m[..., None], np.broadcast_to(eff_d[..., None], sub.shape))), 0, qmax
    )
    return d, dmin, sc, m, q.astype(np.uint8).reshape(sub.shape[0], -1)


def _k_scale_bytes(sc, m):
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins."""
    hi = lambda a: (a[:, 4:] >> 4) << 6
    return np.concatenate(
        [sc[:, :4] | hi(sc), m[:, :4] | hi(m), (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], -1
    )


def _nearest_level(x, eff):
    levels = np.array(quants.IQ4_NL.kvalues, np.float32)
    return np.abs(x[..., None] - eff[..., None] * levels).argmin(-1).astype(np.uint8)


def _q2_k(b):
    d, dmin, sc, m, q = _affine(b.reshape(-1, 16, 16), 3, 15)
    return [sc | (m << 4), pack_bits(q, 32, 2), f16_bytes(d), f16_bytes(dmin)]


def _q3_k(b):
    sub = b.reshape(-1, 16, 16)
    d, sc, eff = _symmetric(sub, 4, 31, -32)
    q = np.clip(np.rint(_ratio(sub, np.broadcast_to(eff[..., None], sub.shape))), -4, 3).reshape(len(b), -1)
    high = (q >= 0).astype(np.uint8)  # gguf subtracts 4 where the high bit is 0
    u = (sc.astype(np.int16) + 32).astype(np.uint8)
    scales = [pack_bits(u & 0xF, 8, 4), pack_bits(u >> 4, 4, 2)]
    return [
        pack_bits(high, 32, 1),
        pack_bits((q + 4 * (1 - high)).astype(np.uint8), 32, 2),
        *scales,
        f16_bytes(d),
    ]


def _q4_k(b):
    d, dmin, sc, m, q = _affine(b.reshape(-1, 8, 32), 15, 63)
    return [f16_bytes(d), f16_bytes(dmin), _k_scale_bytes(sc, m), pack_bits(q, 32, 4)]


def _q5_k(b):
    d, dmin, sc, m, q = _affine(b.reshape(-1, 8, 32), 31, 63)
    scales = _k_scale_bytes(sc, m)
    return [f16_bytes(d), f16_bytes(dmin), scales, pack_bits(q >> 4, 32, 1), pack_bits(q & 0xF, 32, 4)]


def _q6_k(b):
    sub = b.reshape(-1, 16, 16)
    d, sc, eff = _symmetric(sub, 31, 127, -128)
    q = np.clip(np.rint(_ratio(sub, np.broadcast_to(eff[..., None], sub.shape))), -32, 31)
    q = (q + 32).astype(np.uint8).reshape(len(b), -1)
    return [pack_bits(q & 0xF, 64, 4), pack_bits(q >> 4, 32, 2), sc.view(np.uint8), f16_bytes(d)]


def _iq4_nl(b):
    d = np.asarray(np.abs(b).max(-1, keepdims=True) / 127, np.float16)
    return [f16_bytes(d), pack_bits(_nearest_level(b, d.astype(np.float32)), 16, 4)]


def _iq4_xs(b):
    sub = b.reshape(-1, 8, 32)
    d, sc, eff = _symmetric(sub, 127, 31, -32)
    u = (sc.astype(np.int16) + 32).astype(np.uint8)
    idx = _nearest_level(sub, np.broadcast_to(eff[..., None], sub.shape)).reshape(len(b), -1)
    return [f16_bytes(d), pack_bits(u >> 4, 1, 2), pack_bits(u & 0xF, 1, 4), pack_bits(idx, 16, 4)]


KQUANT = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
KQUANT |= {"IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs}


def kquantize(x: np.ndarray, kind: str) -> np.ndarray:
    """float [..., K] -> the GGUF bytes [..., K / block * bytes] of `kind`."""
    block, nbytes = quants.GGML_QUANT_SIZES[TYPES[kind]]
    blocks = np.asarray(x, np.float32).reshape(-1, block)
    out = np.concatenate(KQUANT[kind](blocks), axis=-1)
    assert out.shape == (len(blocks), nbytes), (kind, out.shape)
    return out.reshape(*x.shape[:-1], -1)


# Where each type keeps its float16 super-block scales (d, dmin): random blocks get sane ones there.
F16_FIELDS = {"Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2)}
F16_FIELDS |= {"Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}
F16_FIELDS |= {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2)}


def random_blocks(rng, kind: str, rows: int, k: int) -> np.ndarray:
    """Random bytes [rows, K / block * bytes] of `kind` (every bit pattern of the values and
    sub-block scales), with finite float16 scales of either sign, some of them zero."""
    block, nbytes = quants.GGML_QUANT_SIZES[TYPES[kind]]
    b = rng.integers(0, 256, (rows * (k // block), nbytes), dtype=np.uint8)
    for at in F16_FIELDS[kind]:
        d = (rng.standard_normal(len(b)) * 0.01).astype(np.float16)
        d[::7], d[3::11] = 0.0, -0.0
        b[:, at : at + 2] = f16_bytes(d)
    return b.reshape(rows, -1)


def write_tiny_gguf(
    path,
    meta: dict,
    kind="Q4_1",
    *,
    tiny: Tiny = Tiny(),
    arch: str = "llama",
    skip: tuple[str, ...] = (),
    raw: dict | None = None,
    tokenizer: bool = True,
    seed: int = 0,
):
    """Write the model; matrices as `kind` (a type name, or a function of the tensor name giving
    one: a mixed file), norms as F32. `raw` maps tensor names to (bytes, GGMLQuantizationType) or
    (array, type, shape in elements) written verbatim (a header shape that need not match the
    data). Returns the HF-layout weights."""
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
        add_tokenizer(w, meta)
    for name, x in weights.items():
        if name in skip:
            continue
        if raw and name in raw:
            data, qtype, *shape = raw[name]
            w.add_tensor(name, data, raw_shape=shape[0] if shape else data.shape, raw_dtype=qtype)
            continue
        if ".attn_q." in name:
            x = permute(x, tiny.heads)
        elif ".attn_k." in name:
            x = permute(x, tiny.kv_heads)
        data, qtype = (x, None) if x.ndim == 1 else encode(x, kind(name) if callable(kind) else kind)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights
