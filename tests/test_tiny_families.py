"""The tiny family models of tiny_families.py: each family's GGUF, written as llama.cpp's converter
writes it, is read by transformers into the model of the HF directory it came from (same logits on
100 tokens that cross the sliding windows), carries the metadata llama.cpp reads, and a K-quant
GGUF of it is read by transformers exactly as its dequantized tensors say."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import tiny_families as tf
from helpers import hf_logits
from tiny_gguf import permute, tokenizer_meta

pytestmark = pytest.mark.slow  # ~1 s a model on 2 cores: transformers builds, saves and reads each

EXACT = 1e-4  # fp32 logits of the same weights through the same code
# Families whose sliding window the GGUF does not carry (see tiny_families' docstring): the HF
# directory agrees with the file only before the window, and everywhere once read without it.
WINDOW_DROPPED = ("mistral", "phi3")
TEXT = (
    "Tiny models of six families read the same hundred tokens: the sliding windows are sixteen "
    "tokens wide, so most of these positions see only part of the prompt, 1234 times over."
)


@pytest.fixture(scope="module")
def meta(model_path):
    return tokenizer_meta(model_path)


@pytest.fixture(scope="module")
def tokenizer(meta):
    return tf.tiny_tokenizer(meta)


@pytest.fixture(scope="module")
def ids(tokenizer):
    ids = tokenizer.encode(TEXT * 2)[:100]
    assert len(ids) == 100
    return ids


@pytest.fixture(scope="module")
def f32(tmp_path_factory, tokenizer, meta):
    """family -> (HF directory, HF's model of it, its F32 GGUF), built once for the module."""
    made = {}

    def get(family):
        if family not in made:
            directory = tmp_path_factory.mktemp(family)
            hf = tf.build(family, directory, tokenizer)
            tf.write_gguf(directory, directory / f"{family}-F32.gguf", meta)
            made[family] = (directory, hf, directory / f"{family}-F32.gguf")
        return made[family]

    return get


def without_window(directory):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, sliding_window=None, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", tf.FAMILIES)
def test_transformers_reads_the_f32_gguf_as_the_hf_directory(family, f32, ids):
    directory, hf, path = f32(family)
    from_gguf = tf.hf_from_gguf(path)
    for name, w in hf.state_dict().items():
        np.testing.assert_allclose(from_gguf.state_dict()[name], w, atol=1e-6, rtol=0, err_msg=name)
    got, want = hf_logits(from_gguf, ids), hf_logits(hf, ids)
    if family not in WINDOW_DROPPED:
        np.testing.assert_allclose(got, want, atol=EXACT, rtol=0)
        return
    w = tf.WINDOW
    np.testing.assert_allclose(got[:w], want[:w], atol=EXACT, rtol=0)
    assert np.abs(got[w:] - want[w:]).max() > 0.1  # the window mattered and the file dropped it
    np.testing.assert_allclose(got, hf_logits(without_window(directory), ids), atol=EXACT, rtol=0)


# What llama.cpp reads from each file (keys as written by the converter), and keys it must not hold.
METADATA = {
    "qwen2": (
        {"qwen2.rope.freq_base": 1e6, "qwen2.attention.head_count_kv": 2},
        ["qwen2.attention.key_length"],
    ),
    "qwen3": ({"qwen3.attention.key_length": 32, "qwen3.attention.value_length": 32}, []),
    "mistral": (
        {"general.architecture": "llama", "llama.rope.dimension_count": 16, "llama.vocab_size": 2048},
        ["llama.attention.sliding_window"],
    ),
    "gemma2": (
        {
            "gemma2.attention.key_length": 32,
            "gemma2.attention.sliding_window": tf.WINDOW,
            "gemma2.attn_logit_softcapping": 5.0,
            "gemma2.final_logit_softcapping": 4.0,
        },
        ["gemma2.rope.freq_base", "gemma2.attention.sliding_window_pattern"],
    ),
    "gemma3": (
        {
            "gemma3.attention.key_length": 32,
            "gemma3.attention.sliding_window": tf.WINDOW,
            "gemma3.rope.freq_base": 1e6,
            "gemma3.rope.freq_base_swa": 1e4,
            "gemma3.rope.scaling.type": "linear",
            "gemma3.rope.scaling.factor": 8.0,
        },
        ["gemma3.attention.sliding_window_pattern", "gemma3.attn_logit_softcapping"],
    ),
    "phi3": (
        {
            "phi3.attention.sliding_window": tf.WINDOW,
            "phi3.rope.dimension_count": 16,
            "phi3.rope.scaling.original_context_length": 512,
        },
        [],
    ),
}


@pytest.mark.parametrize("family", tf.FAMILIES)
def test_the_gguf_holds_the_converters_metadata_and_tensors(family, f32):
    _, hf, path = f32(family)
    fields = tf.read_fields(path)
    present, absent = METADATA[family]
    for key, value in present.items():
        assert fields[key] == pytest.approx(value) if isinstance(value, float) else fields[key] == value, key
    assert not set(absent) & set(fields)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    stored = lambda name: np.asarray(tensors[name].data, np.float32)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert ("output.weight" in tensors) == (not hf.config.tie_word_embeddings)
    if family == "qwen2":
        np.testing.assert_array_equal(stored("blk.0.attn_k.bias"), sd["model.layers.0.self_attn.k_proj.bias"])
    if family == "qwen3":
        assert tensors["blk.0.attn_q.weight"].shape.tolist() == [64, 4 * 32]  # ggml order: [in, out]
        np.testing.assert_array_equal(
            stored("blk.1.attn_k_norm.weight"), sd["model.layers.1.self_attn.k_norm.weight"]
        )
    if family == "mistral":  # rows permuted per head for llama.cpp's interleaved RoPE
        np.testing.assert_array_equal(
            stored("blk.0.attn_k.weight"), permute(sd["model.layers.0.self_attn.k_proj.weight"], 2)
        )
    if family.startswith("gemma"):  # every norm weight + 1, q/k norms and the sandwich norms included
        norms = [n for n in sd if n.endswith("norm.weight")]
        assert len(norms) == 1 + hf.config.num_hidden_layers * (6 if family == "gemma3" else 4)
        np.testing.assert_allclose(
            stored("blk.1.post_ffw_norm.weight"), sd["model.layers.1.post_feedforward_layernorm.weight"] + 1
        )
    if family == "phi3":  # fused tensors kept fused: q|k|v rows, gate|up rows
        np.testing.assert_array_equal(
            stored("blk.0.attn_qkv.weight"), sd["model.layers.0.self_attn.qkv_proj.weight"]
        )
        np.testing.assert_array_equal(
            stored("blk.0.ffn_up.weight"), sd["model.layers.0.mlp.gate_up_proj.weight"]
        )


# Rows must hold whole 256-element K-quant blocks: hidden, ffn and heads * head_dim.
KQUANT_SHAPE = dict(hidden_size=256, intermediate_size=512)


@pytest.mark.parametrize("family", tf.FAMILIES)
def test_a_k_quant_gguf_reads_as_its_dequantized_weights(family, tmp_path, tokenizer, meta, ids):
    """Q4_K matrices (norms and biases F32): transformers' reading equals the HF directory's model
    holding the file's tensors dequantized by gguf.quants (the converter's changes undone), and those
    tensors are the directory's within Q4_K's rounding."""
    import torch
    from transformers import AutoModelForCausalLM

    overrides = dict(KQUANT_SHAPE)
    if "head_dim" in tf.SPECS[family].config:
        overrides["head_dim"] = 128  # not hidden / heads, and 4 * 128 whole blocks
    hf = tf.build(family, tmp_path, tokenizer, **overrides)
    path = tmp_path / f"{family}-Q4_K.gguf"
    tf.write_gguf(tmp_path, path, meta, "Q4_K")
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} == {"F32", "Q4_K"}

    weights = tf.hf_weights_from_gguf(tmp_path, path)
    for name, w in hf.state_dict().items():
        if name in weights:
            err = np.abs(weights[name] - w.numpy()).max()
            assert err <= 0.07 * np.abs(w.numpy()).max(), (name, err)
    window = {"sliding_window": None} if family in WINDOW_DROPPED else {}
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, **window).eval()
    missing, unexpected = ref.load_state_dict(
        {k: torch.from_numpy(v) for k, v in weights.items()}, strict=False
    )
    assert not unexpected and all(ref.config.tie_word_embeddings and "lm_head" in k for k in missing)

    got = hf_logits(tf.hf_from_gguf(path), ids)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, hf_logits(ref, ids), atol=EXACT, rtol=0)
