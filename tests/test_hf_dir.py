"""HF checkpoint directories: a tiny random LlamaForCausalLM saved by transformers (llama3 RoPE
scaling, GQA) loads and matches HF's logits and greedy tokens, in fp32 (one file) and bf16
(sharded, with an index); broken directories get errors naming the file and the problem."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import LOGIT_ATOL, TINY_ENGINE, hf_greedy, hf_logits, save_tiny

from xlaserve import LLM
from xlaserve.checkpoints.load import load_model
from xlaserve.checkpoints.loaded import CheckpointError
from xlaserve.runtime.sampling import SamplingState
from xlaserve.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, llm):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, dtype, shard in [("fp32", torch.float32, None), ("bf16", torch.bfloat16, "2MB")]:
        d = root / name
        d.mkdir()
        out[name] = (d, save_tiny(d, llm.tokenizer, dtype, shard))
    return out


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_tiny_llama3_matches_hf(tiny_dirs, name):
    directory, hf = tiny_dirs[name]
    if name == "bf16":
        assert (directory / "model.safetensors.index.json").is_file()
        assert len(list(directory.glob("*.safetensors"))) > 1
    llm = LLM(str(directory), **{**TINY_ENGINE, "max_model_len": 256})
    assert llm.config.rope.kind == "llama3"
    ids = llm.encode("A sentence long enough to cross a prefill chunk boundary: " * 3)
    assert len(ids) > 32
    engine = llm.engine
    row = np.arange(engine.ecfg.pages_per_seq, dtype=np.int32)
    sampling = SamplingState.of(SamplingParams(temperature=0.0), 0)
    presence = np.zeros((llm.config.vocab_size,), bool)
    ours = np.concatenate(
        [
            engine.prefill_with_logits(ids[s : s + 32], s, row, sampling, presence)[1]
            for s in range(0, len(ids), 32)
        ]
    )
    np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=LOGIT_ATOL, rtol=0)
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, ids, 24)
    assert llm.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<|im_start|>")


@pytest.fixture
def broken(tiny_dirs, tmp_path):
    src, _ = tiny_dirs["bf16"]
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def expect(path_fragment, *needles, directory):
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    message = str(info.value)
    assert path_fragment in message, message
    for needle in needles:
        assert needle in message, message


def test_missing_tokenizer(broken):
    (broken / "tokenizer.json").unlink()
    expect("tokenizer.json", "tokenizer file is missing", directory=broken)


def test_missing_config_key(broken):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["hidden_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    expect("config.json", "required key 'hidden_size' is missing", directory=broken)


def test_unsupported_model_type(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (broken / "config.json").write_text(json.dumps(cfg))
    expect("config.json", "unsupported model_type 'gpt_neox'", directory=broken)


def test_corrupt_config(broken):
    (broken / "config.json").write_text("{not json")
    expect("config.json", "invalid JSON", directory=broken)


def test_truncated_shard(broken):
    shard = sorted(broken.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    expect(shard.name, "truncated", directory=broken)


def test_shard_missing_from_index(broken):
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.unlink()
    expect(shard.name, "missing", directory=broken)


def test_missing_tensor(broken, tiny_dirs):
    from safetensors.numpy import load_file, save_file

    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = broken / index["weight_map"]["model.norm.weight"]
    tensors = {k: v for k, v in load_file(shard).items() if k != "model.norm.weight"}
    save_file(tensors, shard)
    expect(str(broken), "tensor model.norm.weight is missing", directory=broken)


def test_not_a_checkpoint_directory(tmp_path):
    expect(str(tmp_path), "no config.json", directory=tmp_path)


def test_convert_an_hf_directory(tiny_dirs, tmp_path):
    """A sharded bf16 HF directory converted to an xlaserve checkpoint: the same config (llama3
    RoPE), tokenizer and bf16 weights, bit for bit; int8 conversion quantizes every matrix."""
    from xlaserve.checkpoints import convert
    from xlaserve.runtime.quant import QuantArray

    directory, _ = tiny_dirs["bf16"]
    source = load_model(directory, dtype="bfloat16")
    meta = convert.convert(directory, tmp_path / "keep", dtype="bf16")
    assert (
        meta["source"]["sha256"] == convert.source_digest(directory) and meta["quantization"]["kinds"] == []
    )
    restored = load_model(tmp_path / "keep", dtype=None)
    assert restored.config == source.config and restored.config.rope.kind == "llama3"
    assert restored.tokenizer.encode("A sentence, 42 tokens?") == source.tokenizer.encode(
        "A sentence, 42 tokens?"
    )
    for a, b in zip(jax.tree.leaves(source.weights), jax.tree.leaves(restored.weights), strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16 and np.array_equal(np.asarray(a), np.asarray(b))
    convert.convert(directory, tmp_path / "int8", quant="int8")
    int8 = load_model(tmp_path / "int8", dequantize=False, dtype=None).weights
    assert all(
        isinstance(getattr(int8.layers, n), QuantArray) and getattr(int8.layers, n).kind == "q8_0"
        for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    )
