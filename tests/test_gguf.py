"""GGUF reading: every supported tensor type dequantizes bit-identically to gguf.quants.dequantize
(at load and inside a jitted program), a tiny model of each type matches HF transformers' logits,
and every kind of bad file gets an error naming the file and the problem."""

from __future__ import annotations

import shutil

import gguf
import jax
import numpy as np
import pytest
from gguf import quants
from tiny_gguf import TYPES, Tiny, tokenizer_meta, write_tiny_gguf

from xlaserve.checkpoints.gguf import unpermute_rows
from xlaserve.checkpoints.load import load_model
from xlaserve.checkpoints.loaded import CheckpointError
from xlaserve.runtime.quant import QuantArray, dequantize

TINY = Tiny()


@pytest.fixture(scope="module")
def meta(model_path):
    return tokenizer_meta(model_path)


def bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def gguf_reference(path) -> dict[str, np.ndarray]:
    """gguf's own dequantization of every tensor, un-permuted like our loader."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        x = quants.dequantize(t.data, t.tensor_type)
        if ".attn_q." in t.name:
            x = unpermute_rows(x, TINY.heads)
        elif ".attn_k." in t.name:
            x = unpermute_rows(x, TINY.kv_heads)
        out[t.name] = x
    return out


LAYER_NAMES = {
    "wq": "attn_q",
    "wk": "attn_k",
    "wv": "attn_v",
    "wo": "attn_output",
    "w_gate": "ffn_gate",
    "w_up": "ffn_up",
    "w_down": "ffn_down",
}


@pytest.mark.parametrize("kind", list(TYPES))
def test_every_type_dequantizes_bit_exactly(tmp_path, meta, kind):
    path = tmp_path / f"tiny-{kind}.gguf"
    write_tiny_gguf(path, meta, kind)
    ref = gguf_reference(path)

    dense = load_model(path, dequantize=True, dtype="float32").weights
    np.testing.assert_array_equal(bits(dense.embed), bits(ref["token_embd.weight"]))
    for field, name in LAYER_NAMES.items():
        stacked = np.stack([ref[f"blk.{i}.{name}.weight"] for i in range(TINY.layers)])
        np.testing.assert_array_equal(bits(getattr(dense.layers, field)), bits(stacked), err_msg=field)

    kept = load_model(path, dequantize=False, dtype="float32").weights
    w_up = kept.layers.w_up
    stacked = np.stack([ref[f"blk.{i}.ffn_up.weight"] for i in range(TINY.layers)])
    if kind.startswith("Q"):
        assert isinstance(w_up, QuantArray) and w_up.kind == kind.lower()
        np.testing.assert_array_equal(bits(dequantize(w_up)), bits(stacked))
        on_device = jax.jit(dequantize)(jax.device_put(w_up))
        np.testing.assert_array_equal(bits(on_device), bits(stacked))
    else:
        np.testing.assert_array_equal(bits(w_up), bits(stacked))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(TYPES))
def test_tiny_model_of_each_type_matches_hf(tmp_path, meta, kind):
    import torch
    from helpers import LOGIT_ATOL, hf_logits
    from transformers import AutoModelForCausalLM

    from xlaserve import LLM

    path = tmp_path / f"tiny-{kind}.gguf"
    write_tiny_gguf(path, meta, kind)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM(str(path), max_slots=1, prefill_buckets=(32,), max_model_len=64, compile_cache="")
    ids = llm.encode("The tiny model reads a sentence, 123 times.")
    engine = llm.engine
    from xlaserve.runtime.sampling import SamplingState
    from xlaserve.runtime.sampling_params import SamplingParams

    row = np.arange(engine.ecfg.pages_per_seq, dtype=np.int32)
    _, ours = engine.prefill_with_logits(
        ids,
        0,
        row,
        SamplingState.of(SamplingParams(temperature=0.0), 0),
        np.zeros((llm.config.vocab_size,), bool),
    )
    np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=LOGIT_ATOL, rtol=0)


# -- errors: each names the file and the problem ---------------------------------------------------


def expect_error(path, *needles):
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    return message


def test_unsupported_architecture(tmp_path, meta):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, meta, "F32", arch="gpt2")
    expect_error(path, "unsupported architecture 'gpt2'", "llama")


def test_unsupported_tensor_type(tmp_path, meta):
    path = tmp_path / "q5.gguf"
    # Q5_0: 32-element blocks of 22 bytes; random bytes are enough, the reader must refuse the type.
    data = np.random.default_rng(0).integers(0, 255, (TINY.ffn, TINY.hidden // 32 * 22), dtype=np.uint8)
    write_tiny_gguf(path, meta, "F32", raw={"blk.0.ffn_up.weight": (data, gguf.GGMLQuantizationType.Q5_0)})
    expect_error(path, "blk.0.ffn_up.weight", "Q5_0", "not supported")


def test_truncated_file(tmp_path, meta):
    path = tmp_path / "whole.gguf"
    write_tiny_gguf(path, meta, "Q4_1")
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    expect_error(cut, "truncated or corrupt")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip")
    expect_error(path, "not a GGUF file")


def test_missing_tensor(tmp_path, meta):
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path, meta, "F16", skip=("blk.1.ffn_down.weight",))
    expect_error(path, "tensor blk.1.ffn_down.weight is missing")


def test_missing_tokenizer(tmp_path, meta):
    path = tmp_path / "notok.gguf"
    write_tiny_gguf(path, meta, "F16", tokenizer=False)
    expect_error(path, "no tokenizer")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.gguf", "file not found")


@pytest.mark.slow
def test_llm_reports_the_bad_file(tmp_path, model_path):
    from xlaserve import LLM

    cut = tmp_path / "cut.gguf"
    with open(model_path, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        LLM(str(cut))
    shutil.rmtree(tmp_path)
