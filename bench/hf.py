"""HF transformers as the reference the benchmarks compare against, in one place:

- `load_model` / `load_tokenizer`: transformers' own load of a GGUF file (as bench/compare_hf.py,
  bench/offline.py and `xlaserve bench decode --compare hf` use it);
- `left_padded` / `greedy`: batched greedy `generate` of exactly n new tokens per prompt;
- `random_llama`: a LlamaForCausalLM with a preset's shapes and random weights, built on the device;
- `Decoder`: TTFT and decode-step timing driven directly (`bench decode --compare hf`), in HF's
  strongest configuration on CUDA (bf16, static cache, torch.compile mode="reduce-overhead") and
  fp32 with its default dynamic cache elsewhere.

torch and transformers are imported lazily: they are only in the test/bench extras.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from xlaserve.runtime.config import ModelConfig


def load_model(path: Path, dtype=None):
    """The GGUF file at `path` through transformers (dequantized to `dtype`, default float32), in
    eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def left_padded(tokenizer, texts: list[str]):
    """`texts` as one batch for `generate`: left-padded, with the eos token as pad where there is none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True)


def greedy(model, tokenizer, enc, new_tokens: int, exact: bool = True):
    """Greedy `model.generate` on the batch `enc`: exactly `new_tokens` new tokens per prompt
    (at most, if not `exact`). Returns generate's output ids (prompt included)."""
    kw = dict(min_new_tokens=new_tokens) if exact else {}
    return model.generate(
        **enc, max_new_tokens=new_tokens, **kw, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )


def random_llama(cfg: ModelConfig, dtype, device: str):
    """A transformers Llama with `cfg`'s shapes and random weights, built on `device` (an 8B model
    is never materialized on the host). Speed does not depend on the values."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope.theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


class Decoder:
    """HF transformers on the same GGUF file (or, for a preset, a LlamaForCausalLM with the same
    shapes and random weights); its strongest configuration on CUDA."""

    def __init__(self, path: Path | None, preset: ModelConfig | None = None):
        import torch
        import transformers

        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        dtype = torch.bfloat16 if self.cuda else torch.float32
        model = random_llama(preset, dtype, self.device) if preset is not None else load_model(path, dtype)
        self.model = model.to(self.device).eval()
        self.forward, self.static = self.model.forward, {}
        if self.cuda:
            self.forward = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True)
        self.describe = {
            "name": f"HF transformers {transformers.__version__}",
            "config": "bf16, static cache, torch.compile(mode='reduce-overhead')"
            if self.cuda
            else "fp32, dynamic cache, eager",
            "torch": torch.__version__,
            "device": self.device,
            "threads": torch.get_num_threads(),
        }

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def ttft(self, tokens: np.ndarray) -> float:
        """A forward over the prompt with logits_to_keep=1, then the argmax on the host."""
        torch = self.torch
        ids = torch.tensor(tokens[None].astype(np.int64), device=self.device)
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, logits_to_keep=1, use_cache=True)
            int(out.logits[0, -1].argmax())
            return time.perf_counter() - t0

    def _cache(self, batch: int, context: int, start: int):
        from transformers import DynamicCache, StaticCache

        cfg, torch = self.model.config, self.torch
        if self.cuda:  # one static cache per shape (CUDA graphs keep its addresses); zeros are fine
            cache = self.static.get((batch, context))
            if cache is None:
                return self.static.setdefault(
                    (batch, context), StaticCache(config=cfg, max_cache_len=context)
                )
            cache.reset()
            return cache
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache = DynamicCache()
        shape = (batch, cfg.num_key_value_heads, start, head_dim)
        for layer in range(cfg.num_hidden_layers):
            kv = torch.full(shape, 1e-3, dtype=self.model.dtype)  # written, so the pages are real
            cache.update(kv, kv.clone(), layer)
        return cache

    def decode(self, batch: int, context: int, steps: int) -> float:
        """Seconds per step: one token per sequence over a cache of context - steps tokens, `steps`
        forwards, each followed by an argmax."""
        torch, start = self.torch, context - steps
        with torch.inference_mode():
            cache = self._cache(batch, context, start)
            ids = torch.ones((batch, 1), dtype=torch.long, device=self.device)
            self._sync()
            t0 = time.perf_counter()
            for i in range(steps):
                if self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                pos = torch.tensor([start + i], device=self.device)
                out = self.forward(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)
                ids = out.logits[:, -1:].argmax(-1)
            self._sync()
            return (time.perf_counter() - t0) / steps
