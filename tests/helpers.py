"""Helpers shared by the tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import json
import socket

import numpy as np

# A small engine shape shared by the end-to-end tests: compiles in ~10 s on 2 cores.
TEST_ENGINE = dict(max_slots=4, prefill_buckets=(32, 128), max_model_len=1024)
# For a test that only generates a few short outputs: one prefill and one KV bucket, no scoring
# programs, each compiled on first use (an engine compiling all its programs at start-up takes
# most of such a test's time on programs it never runs).
SMALL_ENGINE = dict(max_slots=2, prefill_buckets=(32,), max_model_len=64, scoring=False, compile_at="use")
# A tiny random model's engine for one sequence: no compile cache (its programs are new each run),
# each program compiled on first use.
TINY_ENGINE = dict(max_slots=1, prefill_buckets=(32,), max_model_len=64, compile_cache="", compile_at="use")
# Logits of our fp32 engine and HF fp32 on the same weights differ only by summation order; the
# largest difference measured was 1.4e-4 on logits of magnitude ~30.
LOGIT_ATOL = 2e-3


@contextlib.contextmanager
def held_pages(engine, pages, lengths):
    """Pages of the pool `pages` for sequences of these lengths, held while the block runs: yields
    (each one's pages, its page-table row int32 [pages_per_seq])."""
    page, width = engine.ecfg.page_size, engine.ecfg.pages_per_seq
    held = [pages.alloc(-(-n // page)) for n in lengths]
    rows = [np.zeros((width,), np.int32) for _ in held]
    for row, got in zip(rows, held, strict=True):
        row[: len(got)] = got
    try:
        yield held, rows
    finally:
        for got in held:
            pages.release(got)


def assert_same_kv(engine, a, b, n: int) -> None:
    """The first n tokens' K and V in pages `a` equal those in pages `b`, bit for bit."""
    for kv in (engine.cache.k, engine.cache.v):
        x, y = (np.asarray(kv[:, pages]) for pages in (a, b))
        x, y = (z.reshape(z.shape[0], -1, *z.shape[3:])[:, :n] for z in (x, y))
        assert np.array_equal(x, y)


def hf_logits(hf_model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(hf_model, ids, n: int) -> list[int]:
    """n greedy tokens from HF with its KV cache, never stopping at EOS (the oracle for
    `ignore_eos=True`)."""
    import torch

    out, past, inputs = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = hf_model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            inputs = torch.tensor([[token]])
    return out


def default_model() -> str:
    """The default model's file in the model cache (`make test` pulls it before the suite): the
    `model_path` fixture, and the argv of a background job (tests/background.py), built before any
    fixture runs. Raises registry.PullError where it cannot be pulled."""
    from xlaserve.checkpoints import registry

    return str(registry.resolve(registry.DEFAULT_MODEL, log=lambda m: None))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 50000.0,
}


def save_tiny(path, tokenizer, dtype=None, shard: str | None = None, **overrides):
    """A tiny random Llama (llama3 RoPE scaling, GQA, untied head) saved as an HF directory with
    the tokenizer; returns HF's model read back from the files in fp32 (the oracle). `overrides`
    change the LlamaConfig."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = dtype or torch.float32

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=50000.0,
        rope_scaling=ROPE,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # larger weights than the default init, so differences would show
        for p in model.parameters():
            p.mul_(8.0 if p.ndim > 1 else 1.0)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": tokenizer.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
        )
    )
    # The reference reads the saved files back in fp32 (casting the live model would also round
    # its RoPE frequencies to the storage dtype).
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
