"""xlaserve checkpoints (orbax): convert, quantize, restore; integrity errors; the CLI.
Restoring onto tp=2 and tp=3 meshes is checked in tests/sharding_worker.py (8 simulated devices)."""

from __future__ import annotations

import json
import shutil

import gguf
import jax
import numpy as np
import pytest
from helpers import SMALL_ENGINE, TEST_ENGINE

from xlaserve.checkpoints import convert, orbax
from xlaserve.checkpoints.load import load_model
from xlaserve.checkpoints.loaded import CheckpointError
from xlaserve.cli import main as cli
from xlaserve.runtime.quant import QuantArray, dequantize, quantize

GREEDY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Le chat est"]


def leaves_with_names(weights):
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(weights)[0]]


def assert_same_weights(a, b):
    la, lb = leaves_with_names(a), leaves_with_names(b)
    assert [n for n, _ in la] == [n for n, _ in lb]
    for (name, x), (_, y) in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{name} differs"


def test_round_trip_is_bit_exact(model_path, keep_ckpt):
    source = load_model(model_path, dequantize=False, dtype="float32")
    restored = load_model(keep_ckpt, dequantize=False, dtype=None)
    assert isinstance(restored.weights.layers.w_up, QuantArray)
    assert_same_weights(source.weights, restored.weights)
    assert restored.config == source.config
    for text in ["Hello, world!", "  def f(x):\n\treturn 12345", "café 東京"]:
        assert restored.tokenizer.encode(text) == source.tokenizer.encode(text)
    chat = [{"role": "user", "content": "Name three rivers."}]
    assert restored.tokenizer.apply_chat_template(chat) == source.tokenizer.apply_chat_template(chat)


def test_restored_model_generates_what_the_gguf_does(llm, keep_ckpt):
    from xlaserve import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    restored = LLM(str(keep_ckpt), **TEST_ENGINE)
    assert restored.load_seconds > 0 and "q4_1" in restored.quantization
    ours = [o.token_ids for o in restored.generate(GREEDY_PROMPTS, params)]
    assert ours == [o.token_ids for o in llm.generate(GREEDY_PROMPTS, params)]
    # quantized=False: the restored blocks dequantized on device at load (the same engine shapes
    # as test_llm's dequantized run)
    dense = LLM(str(keep_ckpt), **SMALL_ENGINE, quantized=False, decode_steps=3)
    assert dense.engine.weights.layers.w_up.dtype == np.float32 and dense.quantization == "none"
    assert [o.token_ids for o in dense.generate(GREEDY_PROMPTS, params)] == ours


@pytest.mark.slow
def test_quantized_round_trip_and_deterministic_convert(model_path, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    meta = convert.convert(model_path, a, quant="int4", scheme="asym", group_size=64, dtype="bf16")
    convert.convert(model_path, b, quant="int4", scheme="asym", group_size=64, dtype="bf16")
    for name in ("xlaserve.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert meta["quantization"] == {
        "method": "int4",
        "scheme": "asym",
        "group_size": 64,
        "kinds": ["q4_1"],
        "group_sizes_used": [64],
    }
    assert meta["source"]["sha256"] == convert.source_digest(model_path)
    # what was saved is exactly what the quantizer produced from the dequantized source
    loaded = load_model(model_path, dequantize=True, dtype="float32")
    source = loaded.weights
    expected = convert.quantize_weights(loaded.config, source, "int4", "asym", 64, np.dtype("bfloat16"))
    ra, rb = (load_model(p, dequantize=False, dtype=None).weights for p in (a, b))
    assert ra.layers.wq.block == 64 and ra.final_norm.dtype == np.dtype("bfloat16")
    assert_same_weights(ra, rb)
    assert_same_weights(jax.tree.map(np.asarray, ra), expected)


def test_quantize_rounds_to_nearest():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)).astype(np.float32) * rng.uniform(0.01, 3.0, (48, 1)).astype(np.float32)
    blocks = lambda a, block: a.reshape(48, -1, block)
    absmax = lambda b: np.abs(b).max(-1, keepdims=True)
    steps = {  # the quantization step each scheme implies for a block b
        "q8_0": lambda b: absmax(b) / 127,
        "q8_1": lambda b: np.ptp(b, -1, keepdims=True) / 255,
        "q4_0": lambda b: absmax(b) / 8,
        "q4_1": lambda b: np.ptp(b, -1, keepdims=True) / 15,
    }
    for kind, block in [("q8_0", 256), ("q8_1", 256), ("q4_0", 32), ("q4_1", 128)]:
        q = quantize(w, kind, block, np.float32)
        err = blocks(np.abs(dequantize(q) - w), block)
        b = blocks(w, block)
        # round-to-nearest: every weight within half a step (+ float slack) of its value; q4_0's
        # levels are -8..7 steps with the extreme at -8, so the far side ends at 7 steps: values
        # beyond it clip, up to one step off (llama.cpp's format)
        half = np.where((kind == "q4_0") & (np.abs(b) > absmax(b) * 7 / 8), 1.0, 0.5)
        assert (err <= steps[kind](b) * half * (1 + 1e-4) + 1e-6).all(), kind
    # q8_0 and q4_0 at block 32 are llama.cpp's formats: the bytes agree with gguf's quantizer
    # except where a value sits on a rounding boundary (llama.cpp uses exact, not f16, scales)
    for kind, ggml, width in [
        ("q8_0", gguf.GGMLQuantizationType.Q8_0, 32),
        ("q4_0", gguf.GGMLQuantizationType.Q4_0, 16),
    ]:
        ref = gguf.quants.quantize(w, ggml).reshape(48, -1, 2 + width)
        q = quantize(w, kind, 32)
        assert np.array_equal(ref[..., :2].view(np.float16)[..., 0], q.scale)
        assert (ref[..., 2:] == q.data.reshape(48, -1, width).view(np.uint8)).mean() > 0.99


def test_group_size_falls_back_where_it_does_not_divide():
    assert convert.group_block("w", 1536, 128) == 128
    assert convert.group_block("w", 576, 128) == 64  # SmolLM2's hidden size: 4.5 groups of 128
    assert convert.group_block("w", 96, 128) == 32
    with pytest.raises(ValueError, match="w: input size 48 is not a multiple of any group size <= 128"):
        convert.group_block("w", 48, 128)


def test_asymmetric_int8_takes_the_xla_path_under_pallas():
    """The kernel's int8 path has no min; asymmetric int8 must not silently drop it."""
    from xlaserve.runtime.config import Kernels
    from xlaserve.runtime.quant import linear

    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 128)).astype(np.float32) + 0.5
    x = rng.standard_normal((2, 128)).astype(np.float32)
    q = quantize(w, "q8_1", 128, np.float32)
    want = x @ np.asarray(dequantize(q)).T
    got = linear(jax.numpy.asarray(x), q, kernels=Kernels(matmul="pallas", interpret=True))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def largest_weights_file(path):
    return max((p for p in (path / "weights").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_corrupt_truncated_partial_and_version_mismatch(keep_ckpt, tmp_path):
    def fails(path, match):
        with pytest.raises(CheckpointError, match=match) as e:
            load_model(path)
        assert str(path) in str(e.value)

    ck = copy(keep_ckpt, tmp_path)
    data = largest_weights_file(ck)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    fails(ck, "corrupt: sha256 differs")
    data.write_bytes(bytes(raw[: len(raw) // 2]))
    fails(ck, r"truncated or altered: \d+ bytes, expected \d+")
    # without the checksum pass, orbax's own error still arrives as a CheckpointError
    meta = orbax.read_meta(ck)
    with pytest.raises(CheckpointError, match="cannot restore weights"):
        orbax.restore_weights(ck, meta, orbax.config_from_json(meta["config"], ck))
    data.unlink()
    fails(ck, "partial checkpoint: this weights file is missing")
    shutil.rmtree(ck)

    ck = copy(keep_ckpt, tmp_path)
    (ck / "xlaserve.json").unlink()
    fails(ck, "partial checkpoint: xlaserve.json is missing")
    shutil.rmtree(ck)

    ck = copy(keep_ckpt, tmp_path)
    meta = json.loads((ck / "xlaserve.json").read_text())
    meta["format_version"] = 99
    (ck / "xlaserve.json").write_text(json.dumps(meta))
    fails(ck, "checkpoint format version 99 .* reads version 1")
    (ck / "xlaserve.json").write_text("{not json")
    fails(ck, "corrupt metadata")
    shutil.rmtree(ck)

    ck = copy(keep_ckpt, tmp_path)
    (ck / "tokenizer.json").unlink()
    fails(ck, "tokenizer file is missing")


def test_convert_validates_its_arguments(model_path, keep_ckpt, tmp_path):
    for kwargs, match in [
        (dict(quant="int3"), "quant='int3' must be one of keep, none, int8, int4"),
        (dict(quant="int4", scheme="nf4"), "scheme='nf4' must be sym or asym"),
        (dict(quant="int4", group_size=48), "group_size=48 must be one of 32, 64, 128"),
        (dict(dtype="f16"), "dtype='f16' must be bf16 or f32"),
    ]:
        with pytest.raises(ValueError, match=match):
            convert.convert(model_path, tmp_path / "x", **kwargs)
    with pytest.raises(ValueError, match="already exists"):
        convert.convert(model_path, keep_ckpt)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_convert_int8_with_quality_report_then_generate(tmp_path, capsys):
    out = tmp_path / "int8"
    assert cli(["convert", "smollm2", "--out", str(out), "--quant", "int8", "--output", "json"]) == 0
    printed = capsys.readouterr()
    assert "] " in printed.err and "wrote" in printed.err  # the progress bar and the summary
    report = json.loads(printed.out.strip().splitlines()[-1])
    q = report["quality"]
    assert report["quantization"]["kinds"] == ["q8_0"]
    assert q["source"]["tokens"] == q["converted"]["tokens"] > 500
    # the source model on this text, and int8 per channel costing little
    assert 1.0 < q["source"]["perplexity"] < 100 and 0.97 < q["ratio"] < 1.1
    meta = json.loads((out / "xlaserve.json").read_text())
    assert meta["tensors"]["layers.wq"]["block"] == meta["config"]["hidden_size"]  # per channel
    args = ["generate", "--model", str(out), "--max-tokens", "8", "--temperature", "0", "--max-slots", "2"]
    assert cli([*args, "--max-model-len", "256", "--output", "json", "The capital of France is"]) == 0
    gen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "Paris" in gen["text"]
