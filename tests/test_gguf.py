"""GGUF reading: every supported tensor type dequantizes bit-identically to gguf.quants.dequantize
(at load, from random blocks, inside a jitted program, in the CPU layout and in the kernel's
reference), stays quantized in the layout ggml_types lists (and goes through the Pallas kernel), a
tiny model of each type and a mixed Q4_K_M-like one match HF transformers' logits and greedy
tokens, and every kind of bad file gets an error naming the file and the problem."""

from __future__ import annotations

import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import quants
from tiny_gguf import NEW, TYPES, Tiny, random_blocks, tiny_for, tokenizer_meta, write_tiny_gguf

from xlaserve.checkpoints.ggml_types import QUANT_TYPES, to_quant
from xlaserve.checkpoints.gguf import unpermute_rows
from xlaserve.checkpoints.load import load_model
from xlaserve.checkpoints.loaded import CheckpointError
from xlaserve.pallas_kernels.quantized_matmul import (
    dequantize_reference,
    quantized_matmul,
    quantized_matmul_reference,
)
from xlaserve.runtime.config import Kernels
from xlaserve.runtime.quant import QuantArray, dequantize, linear, to_int8
from xlaserve.runtime.quant_layouts import unpack

TINY = Tiny()


@pytest.fixture(scope="module")
def meta(model_path):
    return tokenizer_meta(model_path)


def bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def gguf_reference(path, tiny: Tiny = TINY) -> dict[str, np.ndarray]:
    """gguf's own dequantization of every tensor, un-permuted like our loader."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        x = quants.dequantize(t.data, t.tensor_type)
        if ".attn_q." in t.name:
            x = unpermute_rows(x, tiny.heads)
        elif ".attn_k." in t.name:
            x = unpermute_rows(x, tiny.kv_heads)
        out[t.name] = x
    return out


def q4_k_m(name: str) -> str:
    """A Q4_K_M-like recipe: Q4_K, with attn_v/ffn_down in Q6_K for some layers (as llama.cpp
    does), Q5_0/Q8_0/Q5_1 elsewhere (its fallbacks), so that four weights mix layouts over layers."""
    layer0 = name.startswith("blk.0.")
    if "attn_v" in name:
        return "Q6_K" if layer0 else "Q5_0"  # q8_0/16 + q8_0/32 -> q8_0/16
    if "ffn_down" in name:
        return "Q6_K" if layer0 else "Q4_K"  # q8_0/16 + q4_1/32 -> q8_0/16 with mins
    if "attn_output" in name:
        return "Q8_0" if layer0 else "Q5_1"  # q8_0/32 + q8_0/32 with mins -> q8_0/32 with mins
    if "ffn_gate" in name:
        return "Q4_K" if layer0 else "Q4_1"  # q4_1/32 with float32 and float16 scales: stacks
    return {"attn_q": "Q8_0", "attn_k": "Q5_0"}.get(name.split(".")[-2], "Q4_K")


# weight -> the layout (kind, block, has a min) of the mixed file
MIXED = {
    "wq": ("q8_0", 32, False),
    "wk": ("q8_0", 32, False),
    "wv": ("q8_0", 16, False),
    "wo": ("q8_0", 32, True),
    "w_gate": ("q4_1", 32, True),
    "w_up": ("q4_1", 32, True),
    "w_down": ("q8_0", 16, True),
}
KINDS = [*TYPES, "mixed"]
DENSE = ("F32", "F16", "BF16")


def write(path, meta, kind: str) -> Tiny:
    tiny = tiny_for("Q4_K" if kind == "mixed" else kind)
    write_tiny_gguf(path, meta, q4_k_m if kind == "mixed" else kind, tiny=tiny)
    return tiny


LAYER_NAMES = {
    "wq": "attn_q",
    "wk": "attn_k",
    "wv": "attn_v",
    "wo": "attn_output",
    "w_gate": "ffn_gate",
    "w_up": "ffn_up",
    "w_down": "ffn_down",
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_type_dequantizes_bit_exactly(tmp_path, meta, kind):
    path = tmp_path / f"tiny-{kind}.gguf"
    tiny = write(path, meta, kind)
    ref = gguf_reference(path, tiny)

    dense = load_model(path, dequantize=True, dtype="float32").weights
    np.testing.assert_array_equal(bits(dense.embed), bits(ref["token_embd.weight"]))
    for field, name in LAYER_NAMES.items():
        stacked = np.stack([ref[f"blk.{i}.{name}.weight"] for i in range(tiny.layers)])
        np.testing.assert_array_equal(bits(getattr(dense.layers, field)), bits(stacked), err_msg=field)

    kept = load_model(path, dequantize=False, dtype="float32").weights
    embed = dequantize(kept.embed) if isinstance(kept.embed, QuantArray) else kept.embed
    np.testing.assert_array_equal(bits(embed), bits(ref["token_embd.weight"]))
    for field, name in LAYER_NAMES.items() if kind in NEW or kind == "mixed" else [("w_up", "ffn_up")]:
        w = getattr(kept.layers, field)
        stacked = np.stack([ref[f"blk.{i}.{name}.weight"] for i in range(tiny.layers)])
        if kind in DENSE:
            np.testing.assert_array_equal(bits(w), bits(stacked))
            continue
        t = QUANT_TYPES.get(kind)
        want = MIXED[field] if kind == "mixed" else t.layout
        assert isinstance(w, QuantArray) and (w.kind, w.block, w.min is not None) == want, field
        np.testing.assert_array_equal(bits(dequantize(w)), bits(stacked), err_msg=field)
        on_device = jax.jit(dequantize)(jax.device_put(w))
        np.testing.assert_array_equal(bits(on_device), bits(stacked), err_msg=field)


@pytest.mark.parametrize("kind", list(QUANT_TYPES))
def test_random_blocks_decode_bit_exactly(kind):
    """Random bytes (every bit pattern of values and sub-block scales): our layout dequantizes to
    gguf's bits with numpy, in a jitted program, in the CPU layout and in the kernel's reference."""
    rng = np.random.default_rng()
    raw = random_blocks(rng, kind, 24, 512)
    ref = bits(quants.dequantize(raw, TYPES[kind]))
    w = to_quant(raw, kind, (24, 512))
    assert (w.kind, w.block, w.min is not None) == QUANT_TYPES[kind].layout
    np.testing.assert_array_equal(bits(dequantize(w)), ref)
    np.testing.assert_array_equal(bits(jax.jit(dequantize)(jax.device_put(w))), ref)
    np.testing.assert_array_equal(bits(dequantize(unpack(w))), ref)
    np.testing.assert_array_equal(bits(dequantize_reference(*w.arrays, **w.layout)), ref)


def test_our_reader_reads_every_field_and_tensor_as_ggufs_own(model_path):
    """Our reader slices the file through a plain view instead of gguf's memmap (3x faster on a
    151k-token vocabulary): each metadata field's parts and each tensor's bytes are gguf's."""
    from xlaserve.checkpoints.gguf import open_reader

    ours, theirs = open_reader(model_path), gguf.GGUFReader(model_path, "r")
    assert list(ours.fields) == list(theirs.fields)
    for name, a in theirs.fields.items():
        b = ours.fields[name]
        assert (b.offset, b.types, b.data, len(b.parts)) == (a.offset, a.types, a.data, len(a.parts)), name
        pairs = zip(a.parts, b.parts, strict=True)
        assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in pairs), name
    assert len(ours.tensors) == len(theirs.tensors) > 0
    for a, b in zip(theirs.tensors, ours.tensors, strict=True):
        assert (b.name, b.tensor_type, b.data_offset) == (a.name, a.tensor_type, a.data_offset)
        assert b.data.dtype == a.data.dtype and np.array_equal(b.data, a.data), a.name


def test_real_tensors_of_every_type_in_the_qwen_file_decode_bit_exactly(qwen_path):
    """Qwen2.5-Coder-0.5B Q4_K_M mixes Q4_K, Q6_K, Q5_0, Q8_0 and F32: the smallest tensor of each
    quantized type, read by our loader, dequantizes to gguf's bits, and so does the int8 form the
    loader gives a weight whose layers mix Q4_K and Q6_K."""
    from xlaserve.checkpoints.gguf import open_reader, read_tensor

    reader = open_reader(qwen_path)
    by_type = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in QUANT_TYPES and (kind not in by_type or t.n_bytes < by_type[kind].n_bytes):
            by_type[kind] = t
    assert set(by_type) == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    for kind, t in by_type.items():
        ref = bits(quants.dequantize(t.data, t.tensor_type))
        w = read_tensor(t, qwen_path)
        assert isinstance(w, QuantArray) and (w.kind, w.block, w.min is not None) == QUANT_TYPES[kind].layout
        np.testing.assert_array_equal(bits(dequantize(w)), ref, err_msg=t.name)
        np.testing.assert_array_equal(bits(dequantize(to_int8(w, 16, True))), ref, err_msg=t.name)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q6_K", "Q2_K"])
def test_to_int8_is_exact(kind):
    """Re-expressing a layout as int8 with a finer block and a min (as for layers of mixed
    layouts) leaves every dequantized bit, -0.0 included, unchanged."""
    w = to_quant(random_blocks(np.random.default_rng(), kind, 8, 256), kind, (8, 256))
    ref = bits(dequantize(w))
    for block, asym in [(16, True), (w.block, True), (16, w.min is not None)]:
        wide = to_int8(w, block, asym)
        assert (wide.kind, wide.block, wide.min is not None) == ("q8_0", block, asym or w.min is not None)
        np.testing.assert_array_equal(bits(dequantize(wide)), ref)


def test_large_matrices_multiply_in_row_chunks_with_the_same_values(monkeypatch):
    """The CPU layout multiplies a matrix above CHUNK_WEIGHTS a chunk of rows at a time (each chunk
    dequantized in cache): the chunks are equal, near the target, and the product is the whole
    matrix's."""
    from xlaserve.runtime import quant

    assert quant.chunk_count(4096, 4096) == 16  # 256 rows of 4096
    assert quant.chunk_count(1536, 576) == 1  # SmolLM2's feed-forward: whole
    assert quant.chunk_count(151936, 896) == 128  # 2^7 x 1187: 1187-row chunks, not 1187 of 128
    monkeypatch.setattr(quant, "CHUNK_WEIGHTS", 64 * 96)
    rng = np.random.default_rng(0)
    w = unpack(to_quant(random_blocks(rng, "Q4_1", 96, 256), "Q4_1", (96, 256)))
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    assert quant.chunk_count(96, 256) == 4
    want = np.asarray(x) @ np.asarray(dequantize(w)).T.astype(np.float64)
    w = jax.tree.map(jnp.asarray, w)
    assert "while" in jax.jit(linear).lower(x, w).as_text()  # the chunks' scan
    np.testing.assert_allclose(np.asarray(linear(x, w)), want, rtol=1e-5, atol=1e-5)


# one type per new layout: q4_1 f32 scales, q8_0/16, q8_0/16 with mins, q8_0/32 with f16 mins
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q2_K", "Q5_1", "Q5_K"])
def test_repacked_layouts_run_through_the_kernel(kind):
    rng = np.random.default_rng()
    w = jax.tree.map(jnp.asarray, to_quant(random_blocks(rng, kind, 64, 512), kind, (64, 512)))
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)
    ref = np.asarray(quantized_matmul_reference(x, *w.arrays, **w.layout))
    out = np.asarray(quantized_matmul(x, *w.arrays, **w.layout, interpret=True))
    tol = 1e-5 * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(out, ref, atol=tol, rtol=1e-5)
    pallas = Kernels(matmul="pallas", interpret=True)
    np.testing.assert_allclose(np.asarray(linear(x, w, kernels=pallas)), ref, atol=tol, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(linear(x, w)), ref, atol=tol, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_of_each_type_matches_hf(tmp_path, meta, kind):
    import torch
    from helpers import LOGIT_ATOL, TINY_ENGINE, hf_greedy, hf_logits
    from transformers import AutoModelForCausalLM

    from xlaserve import LLM

    path = tmp_path / f"tiny-{kind}.gguf"
    write(path, meta, kind)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM(str(path), **TINY_ENGINE)
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
    if kind in NEW or kind == "mixed":
        out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
        assert out.token_ids == hf_greedy(hf, ids, 8)


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
    path = tmp_path / "mxfp4.gguf"
    # MXFP4: 32-element blocks of 17 bytes; random bytes are enough, the reader must refuse the type.
    data = np.random.default_rng(0).integers(0, 255, (TINY.ffn, TINY.hidden // 32 * 17), dtype=np.uint8)
    write_tiny_gguf(path, meta, "F32", raw={"blk.0.ffn_up.weight": (data, gguf.GGMLQuantizationType.MXFP4)})
    message = expect_error(path, "blk.0.ffn_up.weight", "MXFP4", "not supported")
    assert "Q4_K" in message and "Q6_K" in message  # the supported list


def test_rows_not_whole_blocks(tmp_path, meta):
    """A Q4_K tensor whose rows (64) are not whole 256-element super-blocks: named, not a numpy
    traceback from inside the reader."""
    path = tmp_path / "rows.gguf"
    data = np.zeros((TINY.ffn, 36), np.int8)  # a non-uint8 array: raw_shape is taken as elements
    raw = {"blk.0.ffn_up.weight": (data, gguf.GGMLQuantizationType.Q4_K, (TINY.ffn, TINY.hidden))}
    write_tiny_gguf(path, meta, "F32", raw=raw)
    expect_error(path, "tensor blk.0.ffn_up.weight", "Q4_K", "not a whole number of 256-element blocks")


def test_bytes_contradict_the_shape(tmp_path, meta):
    """The header says Q5_0 [128 x 64] (5632 bytes) but 4400 were written: the tensor would read
    the next tensor's bytes."""
    path = tmp_path / "short.gguf"
    data = np.zeros((100, 44), np.int8)
    raw = {"blk.0.ffn_up.weight": (data, gguf.GGMLQuantizationType.Q5_0, (TINY.ffn, TINY.hidden))}
    write_tiny_gguf(path, meta, "F32", raw=raw)
    expect_error(path, "tensor blk.0.ffn_up.weight (Q5_0, shape [128, 64]) needs 5632 bytes")


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
