"""Every model family against HF transformers on tiny random models that transformers builds
(tests/tiny_families.py): the HF directory and the same weights written as GGUF the way llama.cpp's
converter writes them load to the same weights; the engine's log-probs and greedy tokens equal
HF's over a context longer than the sliding window (Gemma 2's soft-capped scores and logits
included); a K-quant GGUF stays quantized and matches HF reading the same file.

One engine is compiled per family (and one per quantized file), so the module stays a few minutes
on 2 cores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_families as tf
from helpers import LOGIT_ATOL, hf_greedy, hf_logits
from tiny_gguf import tokenizer_meta

from xlaserve.checkpoints.load import load_model
from xlaserve.runtime.models.params import named
from xlaserve.runtime.quant import QuantArray, dequantize

pytestmark = pytest.mark.slow

TEXT = "The family runs through the same loader, engine and sampler; the window slides. " * 4
ENGINE = dict(max_slots=2, prefill_buckets=(32,), max_model_len=256, compile_cache="", compile_at="use")


@pytest.fixture(scope="module")
def meta(model_path):
    return tokenizer_meta(model_path)


@pytest.fixture(scope="module", params=tf.FAMILIES)
def family(request, meta, tmp_path_factory):
    """(name, HF directory, its GGUF (F32), HF's model of the directory)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf = tf.build(name, root / "hf", tf.tiny_tokenizer(meta))
    gguf = root / f"{name}.gguf"
    tf.write_gguf(root / "hf", gguf, meta)
    return name, root / "hf", gguf, hf


def log_probs(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    lg = logits[:-1]
    peak = lg.max(-1, keepdims=True)
    lp = lg - peak - np.log(np.exp(lg - peak).sum(-1, keepdims=True))
    return lp[np.arange(len(ids) - 1), ids[1:]]


def dense(x) -> np.ndarray:
    return np.asarray(dequantize(x) if isinstance(x, QuantArray) else x, np.float32)


def test_the_gguf_loads_to_the_hf_directorys_weights(family):
    """Names, the q/k permutation (Mistral), Gemma's 1 + w norms and Phi-3's fused tensors are
    undone exactly; the configs agree but for what llama.cpp's files do not carry."""
    name, directory, gguf, _ = family
    ours_hf, ours_gguf = load_model(directory), load_model(gguf, dequantize=True)
    a, b = named(ours_hf.weights), named(ours_gguf.weights)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(dense(b[key]), dense(a[key]), atol=1e-6, rtol=0, err_msg=key)
    want = "llama" if name == "mistral" else name
    assert ours_gguf.config.architecture == ours_hf.config.architecture == want
    # llama.cpp's mistral files carry no window (its loader reads none); every other field agrees
    # (GGUF stores numbers as float32)
    skip = {"name", "eos_token_ids", "max_position_embeddings"}
    skip |= {"sliding_window"} if name == "mistral" else set()
    same = lambda x, y: x == y or (isinstance(x, float) and np.float32(x) == np.float32(y))
    for field in ours_hf.config.__dataclass_fields__:
        if field not in skip:
            assert same(getattr(ours_gguf.config, field), getattr(ours_hf.config, field)), field


def test_an_xlaserve_checkpoint_keeps_the_family(family, tmp_path):
    """`xlaserve convert` of the GGUF (blocks kept) restores the same config (per-layer windows,
    local RoPE, soft-caps) and weights."""
    from xlaserve.checkpoints import convert

    _, _, gguf, _ = family
    convert.convert(gguf, tmp_path / "ckpt", quant="keep")
    src, back = load_model(gguf), load_model(tmp_path / "ckpt")
    assert back.config == src.config
    a, b = named(src.weights), named(back.weights)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(dense(b[key]), dense(a[key]), err_msg=key)


def test_engine_matches_hf_past_the_window(family):
    from xlaserve import LLM, SamplingParams

    name, directory, gguf, hf = family
    # a mistral GGUF has no window (as llama.cpp reads it): run the HF directory, which has one
    llm = LLM(str(directory if name == "mistral" else gguf), **ENGINE)
    assert llm.config.sliding_window == (None if name.startswith("qwen") else tf.WINDOW)
    ids = llm.encode(TEXT)[:100]
    assert len(ids) > 4 * tf.WINDOW
    (scores,) = llm.score([(ids, 1)])
    np.testing.assert_allclose(scores.logprobs, log_probs(hf_logits(hf, ids), ids), atol=LOGIT_ATOL, rtol=0)
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, ids, 24)


@pytest.mark.parametrize("name", ["qwen2", "gemma3", "phi3"])
def test_a_k_quant_gguf_stays_quantized_and_matches_hf_reading_it(name, meta, tmp_path):
    from xlaserve import LLM

    big = dict(hidden_size=256, intermediate_size=512) | ({"head_dim": 64} if name == "gemma3" else {})
    tf.build(name, tmp_path / "hf", tf.tiny_tokenizer(meta), **big)
    gguf = tmp_path / "q4_k.gguf"
    tf.write_gguf(tmp_path / "hf", gguf, meta, kind="Q4_K")
    hf = tf.hf_from_gguf(gguf)
    if name == "phi3":  # transformers reads no window from a GGUF; llama.cpp's file has one
        assert hf.config.sliding_window is None
        hf = _with_window(hf, tf.WINDOW)
    llm = LLM(str(gguf), **ENGINE)
    assert isinstance(llm.engine.weights.layers.wq, QuantArray)
    ids = llm.encode(TEXT)[:100]
    (scores,) = llm.score([(ids, 1)])
    np.testing.assert_allclose(scores.logprobs, log_probs(hf_logits(hf, ids), ids), atol=LOGIT_ATOL, rtol=0)


def _with_window(hf, window: int):
    hf.config.sliding_window = window
    for layer in hf.model.layers:
        layer.self_attn.config.sliding_window = window
    return hf


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_a_gemma_config_json_without_layer_types_gets_the_familys_pattern(name, meta, tmp_path):
    tf.build(name, tmp_path, tf.tiny_tokenizer(meta))
    want = load_model(tmp_path).config.layer_types
    assert want is not None and "full_attention" in want
    config = json.loads((tmp_path / "config.json").read_text())
    del config["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_model(tmp_path).config.layer_types == want


def test_a_model_whose_layers_all_slide_returns_pages_out_of_the_window(meta, tmp_path):
    """Mistral (every layer windowed): two sequences of 160 tokens need 20 pages of 16 without the
    window; a pool of 16 serves both at once with no preemption, and the output stays HF's."""
    from xlaserve import LLM, SamplingParams

    hf = tf.build("mistral", tmp_path, tf.tiny_tokenizer(meta))
    llm = LLM(str(tmp_path), **{**ENGINE, "num_pages": 16})
    prompts = [llm.encode(TEXT)[:40], llm.encode(TEXT[::-1])[:40]]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True))
    assert llm.stats().preemptions == 0
    for ids, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, ids, 120)


def test_the_pallas_kernels_run_windowed_soft_capped_layers(meta, tmp_path):
    """Gemma 2 through our Pallas attention (interpret mode on CPU): sliding and global layers,
    soft-capped scores, a custom attention scale, prefill past the window and decode."""
    from xlaserve import LLM, SamplingParams

    hf = tf.build("gemma2", tmp_path, tf.tiny_tokenizer(meta))
    llm = LLM(str(tmp_path), **ENGINE, attention_impl="pallas")
    ids = llm.encode(TEXT)[:60]
    (scores,) = llm.score([(ids, 1)])
    np.testing.assert_allclose(scores.logprobs, log_probs(hf_logits(hf, ids), ids), atol=LOGIT_ATOL, rtol=0)
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, ids, 8)


@pytest.mark.parametrize(
    "name, change, needle",
    [
        ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
        ("phi3", {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.75}}, "partial_rotary"),
        ("gemma3", {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "'gemma3'"),
        ("gemma2", {"sliding_window": 0}, "sliding_window=0"),
        ("gemma2", {"layer_types": ["sliding_attention"]}, "layer_types"),
    ],
)
def test_what_a_family_does_not_support_is_refused_naming_it(name, change, needle, meta, tmp_path):
    from xlaserve.checkpoints.loaded import CheckpointError

    tf.build(name, tmp_path, tf.tiny_tokenizer(meta))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=r"config\.json") as info:
        load_model(tmp_path)
    assert needle in str(info.value)
