"""Tiny random models of the families the engine is adding, each saved as an HF directory and written
as the GGUF llama.cpp's `convert_hf_to_gguf.py` writes from that directory: tensor names from gguf's
own table, the metadata keys its model class writes, and the tensor changes it makes (q/k rows
permuted for Mistral, which it converts as arch "llama"; 1 added to every Gemma norm weight; Phi-3's
fused qkv_proj and gate_up_proj kept fused, as attn_qkv and ffn_up).

Where the three readings differ (the HF directory, transformers reading the GGUF, llama.cpp reading
the GGUF) the config is chosen so that they agree, except for two sliding windows no GGUF reader
applies:
- Mistral's sliding window: the converter writes none for arch "llama" and llama.cpp runs it with
  full attention; transformers reads the file as Llama, full attention too.
- Phi-3's sliding window: written (phi3.attention.sliding_window), but llama.cpp disables Phi SWA
  and transformers' GGUF table does not read the key: both run full attention.
For both, positions before the window agree with the HF directory; all positions agree with the HF
directory read with sliding_window=None.

transformers 5.24's GGUF table ignores some keys the converter writes and llama.cpp reads
(`GGUF_GAPS`): `hf_from_gguf` reads those from the file and passes them into the config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from tiny_gguf import add_tokenizer, encode, permute

FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
WINDOW = 16  # sliding window (tokens, the query's own included): a 100-token prompt crosses it


@dataclass(frozen=True)
class Spec:
    config_class: str  # transformers class names
    model_class: str
    arch: gguf.MODEL_ARCH  # what the converter writes
    config: dict = field(default_factory=dict)


# Shared by every family: vocab_size comes from the tokenizer.
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

SPECS = {
    "qwen2": Spec("Qwen2Config", "Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, dict(rope_theta=1e6)),
    "qwen3": Spec(
        "Qwen3Config",
        "Qwen3ForCausalLM",
        gguf.MODEL_ARCH.QWEN3,
        dict(head_dim=32, rope_theta=1e6, tie_word_embeddings=True),
    ),
    "mistral": Spec(
        "MistralConfig",
        "MistralForCausalLM",
        gguf.MODEL_ARCH.LLAMA,
        dict(sliding_window=WINDOW, rope_theta=1e6),
    ),
    # llama.cpp scales Gemma's attention by 1/sqrt(head_dim) (hidden/heads for the 27B models only),
    # never by query_pre_attn_scalar: the two are equal here. The converter writes no rope base for
    # gemma2 and both readers default to 10000. Even layers slide (llama.cpp: pattern 2).
    "gemma2": Spec(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        gguf.MODEL_ARCH.GEMMA2,
        dict(
            num_hidden_layers=4,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=WINDOW,
            attn_logit_softcapping=5.0,  # the raw scores reach ~8, the raw logits ~6: both caps bite
            final_logit_softcapping=4.0,
            hidden_activation="gelu_pytorch_tanh",
            rope_theta=10000.0,
        ),
    ),
    # Layers 0-4 and 6 slide, layer 5 is global (HF's default pattern of 6; llama.cpp hard-codes 6).
    # llama.cpp also hard-codes the sliding layers' RoPE (base 10000, no scaling).
    "gemma3": Spec(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        gguf.MODEL_ARCH.GEMMA3,
        dict(
            num_hidden_layers=7,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=WINDOW,
            rope_theta=1e6,
            rope_local_base_freq=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            hidden_activation="gelu_pytorch_tanh",
        ),
    ),
    "phi3": Spec(
        "Phi3Config",
        "Phi3ForCausalLM",
        gguf.MODEL_ARCH.PHI3,
        dict(sliding_window=WINDOW, original_max_position_embeddings=512, rope_theta=10000.0),
    ),
}
ARCHITECTURES = {spec.model_class: family for family, spec in SPECS.items()}

# A Gemma model of 46 (gemma2) or 62 (gemma3) layers is a "27B" to llama.cpp: it then scales
# attention by hidden/heads instead of head_dim.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


# -- the HF directory -------------------------------------------------------------------------


def build(family: str, directory, tokenizer, **overrides):
    """Save a tiny random `family` model (config.json, model.safetensors) and the tokenizer to
    `directory`; return HF's model read back from the files in fp32 (the oracle). `overrides` change
    the config (a Gemma head_dim override carries query_pre_attn_scalar along). For write_gguf the
    tokenizer is `tiny_tokenizer(meta)`, whose vocabulary is the file's."""
    import torch
    import transformers

    spec = SPECS[family]
    settings = {**SHAPE, "vocab_size": tokenizer.vocab_size, **spec.config, **overrides}
    if family.startswith("gemma") and "query_pre_attn_scalar" not in overrides:
        settings["query_pre_attn_scalar"] = settings["head_dim"]
    config = getattr(transformers, spec.config_class)(**settings)
    model_class = getattr(transformers, spec.model_class)
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # larger weights than the default init, norms and biases off 1 and 0
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(8.0)
            else:
                p.add_(0.2 * torch.randn_like(p))
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": tokenizer.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
        )
    )
    return model_class.from_pretrained(directory, dtype=torch.float32).eval()


def tiny_tokenizer(meta: dict, source: str = "tiny"):
    """Our Tokenizer for `tokenizer_meta`'s cut vocabulary: the one whose metadata write_gguf writes."""
    from xlaserve.checkpoints.tokenizer import tokenizer_from_gguf

    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": meta["tokens"],
        "tokenizer.ggml.token_type": meta["types"],
        "tokenizer.ggml.merges": meta["merges"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": meta["template"],
    }
    return tokenizer_from_gguf(fields, source)


# -- the converter ------------------------------------------------------------------------------


def hparams(directory) -> dict:
    """What the converter reads: `AutoConfig.from_pretrained(dir).to_dict()` (ModelBase.load_hparams)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory).to_dict()


def _rope(h: dict) -> tuple[dict, dict]:
    """(full-attention, all) RoPE parameters as TextModel.__init__ gathers them."""
    rope = dict(h.get("rope_parameters") or h.get("rope_scaling") or {})
    return rope.get("full_attention", rope), rope


def _text_model(h: dict) -> dict:
    """TextModel.set_gguf_parameters: GGUFWriter `add_*` method -> value."""
    full, rope = _rope(h)
    m = {
        "block_count": h["num_hidden_layers"],
        "context_length": h["max_position_embeddings"],
        "embedding_length": h["hidden_size"],
        "feed_forward_length": h["intermediate_size"],
        "head_count": h["num_attention_heads"],
        "head_count_kv": h["num_key_value_heads"],
    }
    kind = full.get("rope_type")
    if kind == "linear" and full.get("factor") is not None:
        m |= {"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": full["factor"]}
    elif kind not in (None, "default"):
        raise NotImplementedError(f"rope_type {kind!r}: the tiny families write only default and linear")
    if full.get("rope_theta") is not None:
        m["rope_freq_base"] = full["rope_theta"]
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        m["rope_freq_base_swa"] = local
    m["layer_norm_rms_eps"] = h["rms_norm_eps"]
    if h.get("head_dim") is not None:
        m |= {"key_length": h["head_dim"], "value_length": h["head_dim"]}
    return m


def _llama(h: dict) -> dict:  # LlamaModel, which also converts MistralForCausalLM
    head_dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
    return _text_model(h) | {"vocab_size": h["vocab_size"], "rope_dimension_count": head_dim}


def _gemma2(h: dict) -> dict:  # Gemma2Model: its own list; no RoPE base
    return {
        "context_length": h["max_position_embeddings"],
        "embedding_length": h["hidden_size"],
        "block_count": h["num_hidden_layers"],
        "feed_forward_length": h["intermediate_size"],
        "head_count": h["num_attention_heads"],
        "head_count_kv": h["num_key_value_heads"],
        "layer_norm_rms_eps": h["rms_norm_eps"],
        "key_length": h["head_dim"],
        "value_length": h["head_dim"],
        "attn_logit_softcapping": h["attn_logit_softcapping"],
        "final_logit_softcapping": h["final_logit_softcapping"],
        "sliding_window": h["sliding_window"],
    }


def _gemma3(h: dict) -> dict:  # Gemma3Model: TextModel's, then its own
    assert h.get("attn_logit_softcapping") is None  # as the converter asserts
    m = _text_model(h) | {
        "context_length": h["max_position_embeddings"],
        "head_count": h["num_attention_heads"],
        "layer_norm_rms_eps": h["rms_norm_eps"],
        "key_length": h["head_dim"],
        "value_length": h["head_dim"],
        "rope_freq_base": _rope(h)[0]["rope_theta"],
    }
    if h.get("final_logit_softcapping"):
        m["final_logit_softcapping"] = h["final_logit_softcapping"]
    if h.get("sliding_window_pattern") != 1:
        m["sliding_window"] = h["sliding_window"]
    return m | {"head_count_kv": h["num_key_value_heads"]}


def _phi3(h: dict) -> dict:  # Phi3MiniModel: its own list; long-context factors not written here
    full, _ = _rope(h)
    if full.get("long_factor"):
        raise NotImplementedError("Phi-3 longrope factors")
    rotary = full.get("partial_rotary_factor", 1.0)
    return {
        "context_length": h["max_position_embeddings"],
        "rope_scaling_orig_ctx_len": full.get(
            "original_max_position_embeddings", h["original_max_position_embeddings"]
        ),
        "embedding_length": h["hidden_size"],
        "feed_forward_length": h["intermediate_size"],
        "block_count": h["num_hidden_layers"],
        "head_count": h["num_attention_heads"],
        "head_count_kv": h["num_key_value_heads"],
        "layer_norm_rms_eps": h["rms_norm_eps"],
        "rope_dimension_count": int(rotary * h["hidden_size"]) // h["num_attention_heads"],
        "rope_freq_base": full["rope_theta"],
        "sliding_window": h.get("sliding_window") or 0,  # 0 marks Phi-4
    }


PARAMETERS = {
    "qwen2": _text_model,
    "qwen3": _text_model,
    "mistral": _llama,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
}

FILE_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q2_K": "MOSTLY_Q2_K",
    "Q3_K": "MOSTLY_Q3_K_M",
    "Q4_K": "MOSTLY_Q4_K_M",
    "Q5_K": "MOSTLY_Q5_K_M",
    "Q6_K": "MOSTLY_Q6_K",
    "IQ4_NL": "MOSTLY_IQ4_NL",
    "IQ4_XS": "MOSTLY_IQ4_XS",
}


def _load(directory: Path) -> tuple[str, dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    h = hparams(directory)
    raw = {}
    for part in sorted(directory.glob("model*.safetensors")):
        raw |= load_file(part)
    return ARCHITECTURES[h["architectures"][0]], h, raw


def converted_tensors(directory) -> dict[str, np.ndarray]:
    """GGUF name -> the tensor the converter writes (float32, HF [out, in] layout), in file order."""
    directory = Path(directory)
    family, h, raw = _load(directory)
    names = gguf.get_tensor_name_map(SPECS[family].arch, h["num_hidden_layers"])
    out = {}
    for name, x in raw.items():
        x = np.asarray(x, np.float32)
        if family == "gemma2" and name == "lm_head.weight":
            continue  # Gemma2Model.filter_tensors
        if family in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            x = x + 1  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w
        if family == "gemma3" and "embed_tokens.weight" in name:
            spec = json.loads((directory / "tokenizer.json").read_text())
            x = x[: len(spec["model"]["vocab"]) + len(spec["added_tokens"])]  # OOV rows dropped
        if family == "mistral":  # LlamaModel.modify_tensors: HF rotate-half -> interleaved RoPE
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                x = permute(x, h["num_attention_heads"])
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                x = permute(x, h["num_key_value_heads"])
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"{family}: the converter cannot map {name!r}")
        out[new] = x
    return out


def write_gguf(directory, path, meta: dict, kind="F32") -> None:
    """The GGUF of the HF directory's weights, as convert_hf_to_gguf.py writes it, with
    `tokenizer_meta`'s tokenizer. `kind` is the GGUF type of the 2-D tensors (a type name, or a
    function of the GGUF tensor name giving one); 1-D tensors and norms are F32, as llama.cpp keeps
    them. K-quants need rows that hold whole 256-element blocks (build with hidden/ffn overrides)."""
    directory, path = Path(directory), Path(path)
    h = hparams(directory)
    family = ARCHITECTURES[h["architectures"][0]]
    tensors = converted_tensors(directory)
    if tensors["token_embd.weight"].shape[0] != len(meta["tokens"]):
        raise ValueError(
            f"the model has {tensors['token_embd.weight'].shape[0]} embedding rows but the tokenizer "
            f"{len(meta['tokens'])} tokens: build with tiny_tokenizer(meta)"
        )
    w = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[SPECS[family].arch])
    for name, x in tensors.items():
        if x.ndim <= 1 or name.endswith("_norm.weight"):
            w.add_tensor(name, x)
            continue
        data, qtype = encode(x, kind(name) if callable(kind) else kind)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    # ModelBase.prepare_metadata: general.* from the directory (its name: "Mistral" for mistral/),
    # then the model class's parameters, then the tokenizer.
    w.add_type(gguf.GGUFType.MODEL)
    total, shared, expert, experts = w.get_total_parameter_count()
    general = gguf.Metadata.load(None, directory, None, total)
    general.name = general.name or directory.name
    general.size_label = general.size_label or gguf.size_label(total, shared, expert, experts)
    general.set_gguf_meta_model(w)
    for method, value in PARAMETERS[family](h).items():
        getattr(w, f"add_{method}")(value)
    file_type = FILE_TYPES.get(kind) if isinstance(kind, str) else None
    w.add_file_type(gguf.LlamaFileType[file_type] if file_type else gguf.LlamaFileType.GUESSED)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, meta)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_weights_from_gguf(directory, path) -> dict[str, np.ndarray]:
    """HF name -> the GGUF's tensor dequantized with gguf.quants and the converter's changes undone
    (q/k rows permuted back, Gemma's 1 taken off): the weights an exact reader of the file holds.
    `directory` is the HF directory the file was written from (for the names)."""
    directory = Path(directory)
    family, h, raw = _load(directory)
    names = gguf.get_tensor_name_map(SPECS[family].arch, h["num_hidden_layers"])
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    out = {}
    for name, x in raw.items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new not in stored:
            continue  # a head tied to the embedding, which the file holds once
        t = stored[new]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(x.shape).astype(np.float32)
        if family in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            w = w - 1
        if family == "mistral" and name.endswith(
            ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
        ):
            heads = h["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            rows = permute(np.arange(len(w)), heads)  # the file's row i is HF's row rows[i]
            w[rows] = w.copy()
        out[name] = w
    return out


# -- transformers reading the GGUF --------------------------------------------------------------


def read_fields(path) -> dict:
    """GGUF key -> value (arrays as lists), the vocabulary's arrays left out."""
    big = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if k not in big}


def _scale_dim(fields: dict, arch: str, family: str) -> int:
    """The dimension llama.cpp takes the attention scale 1/sqrt(d) from."""
    if fields[f"{arch}.block_count"] == GEMMA_27B_LAYERS[family]:
        return fields[f"{arch}.embedding_length"] // fields[f"{arch}.attention.head_count"]
    return fields[f"{arch}.attention.key_length"]


def _qwen3_gaps(f: dict) -> dict:
    return {"head_dim": f["qwen3.attention.key_length"]}


def _gemma2_gaps(f: dict) -> dict:
    return {
        "attn_logit_softcapping": f["gemma2.attn_logit_softcapping"],
        "final_logit_softcapping": f["gemma2.final_logit_softcapping"],
        "query_pre_attn_scalar": _scale_dim(f, "gemma2", "gemma2"),
    }


def _gemma3_gaps(f: dict) -> dict:
    full = {"rope_type": "default", "rope_theta": f["gemma3.rope.freq_base"]}
    if f.get("gemma3.rope.scaling.type") == "linear":
        full = {**full, "rope_type": "linear", "factor": f["gemma3.rope.scaling.factor"]}
    # llama.cpp hard-codes the sliding layers' RoPE: base 10000, no scaling (the converter writes
    # rope.freq_base_swa, which the loader does not read).
    local = {"rope_type": "default", "rope_theta": 10000.0}
    return {
        "rope_parameters": {"full_attention": full, "sliding_attention": local},
        "query_pre_attn_scalar": _scale_dim(f, "gemma3", "gemma3"),
        "final_logit_softcapping": f.get("gemma3.final_logit_softcapping"),
    }


def _phi3_gaps(f: dict) -> dict:
    # Phi3Config's default pad_token_id 32000 is outside a small vocabulary; llama.cpp has no pad
    # unless the file names one.
    return {"pad_token_id": f.get("tokenizer.ggml.padding_token_id")}


# The keys transformers 5.24's GGUF table drops (integrations/ggml.py), as the config values that
# llama.cpp derives from the file. Not listed, because the readers already agree: Gemma's sliding
# window patterns (HF's defaults 2 and 6 = llama.cpp's hard-coded ones), gemma2's RoPE base.
GGUF_GAPS = {"qwen3": _qwen3_gaps, "gemma2": _gemma2_gaps, "gemma3": _gemma3_gaps, "phi3": _phi3_gaps}


def hf_from_gguf(path):
    """transformers reading the GGUF (fp32, eval), with `GGUF_GAPS` filled from the file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    gaps = GGUF_GAPS.get(config.model_type.removesuffix("_text"))
    if gaps:
        config = type(config).from_dict({**config.to_dict(), **gaps(read_fields(path))})
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=torch.float32
    )
    return model.eval()
