"""`xlaserve bench kv-cache`: what a quantized KV cache costs in quality and buys in memory.

For each model and KV cache dtype, one small engine runs:
- perplexity on the same text (lm-eval's rolling windows, as the convert-time quality report),
  against "auto" (the engine dtype: float32 on CPU);
- greedy agreement: the same chat prompts decoded greedily with "auto" and with the quantized
  cache; the share of prompts whose output is token-identical, and of output positions that agree
  before the first divergence;
- memory: bytes per token of K/V and, from the memory plan of Llama-3-8B on an H200 (bfloat16,
  nothing allocated), how many tokens of KV fit in the budget.

    xlaserve bench kv-cache --models smollm2,qwen2.5-coder-0.5b --kv-cache-dtypes int8
"""

from __future__ import annotations

import argparse
import math
import time

# the text is scored in windows of max_model_len - 2 tokens, chunks of 128 attending to the cache
ENGINE = dict(max_slots=2, prefill_buckets=(128,), max_model_len=512)
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a hash table is to a new programmer.",
    "List three differences between TCP and UDP.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Write a haiku about autumn rain.",
    "How do I reverse a linked list in place?",
    "Why is the sky blue?",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models", default="smollm2", help="comma-separated aliases or paths (default: %(default)s)"
    )
    p.add_argument("--kv-cache-dtypes", default="int8", help="quantized formats against auto (default: int8)")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--report-text", help="text for perplexity (default: the quality report's)")
    p.add_argument("--out", help="result .json file or directory (default: bench/results)")


def greedy_agreement(base: list[list[int]], other: list[list[int]]) -> dict:
    """Token-identical outputs, and the agreeing prefix as a share of the base outputs' tokens."""
    prefix = []
    for a, b in zip(base, other, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(n)
    return {
        "identical": sum(a == b for a, b in zip(base, other, strict=True)) / len(base),
        "prefix_agreement": sum(prefix) / max(1, sum(len(a) for a in base)),
        "first_divergence": [n if a != b else None for n, a, b in zip(prefix, base, other, strict=True)],
    }


def one_engine(model: str, kv: str, text: str, max_tokens: int) -> dict:
    from xlaserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, **ENGINE, kv_cache_dtype=kv)
    (res,) = llm.score_rolling([text])
    nll = -sum(res.logprobs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate([[{"role": "user", "content": p}] for p in PROMPTS], params, chat=True)
    return {
        "kv_cache_dtype": kv,
        "perplexity": math.exp(nll / len(res.logprobs)),
        "tokens_scored": len(res.logprobs),
        "kv_bytes_per_token": _token_bytes(llm),
        "outputs": [list(o.token_ids) for o in outs],
        "seconds": time.perf_counter() - t0,
    }


def _token_bytes(llm) -> int:
    from xlaserve.runtime.attention import token_bytes

    return token_bytes(llm.engine.cache)


def h200_fit(kinds) -> list[dict]:
    """Tokens of KV that fit beside Llama-3-8B (bfloat16) in 0.9 x 141 GiB, per cache dtype."""
    from xlaserve.runtime import lower
    from xlaserve.runtime.config import EngineConfig
    from xlaserve.runtime.layout import Layout
    from xlaserve.runtime.models.presets import PRESETS

    cfg = PRESETS["llama3-8b"]
    weights = lower.preset_weights(cfg, "none", "bfloat16")
    rows = []
    for kv in ("auto", *kinds):
        ecfg = EngineConfig(max_slots=1, kv_cache_dtype=kv)
        p = Layout.build(cfg, weights, ecfg, backend="gpu", device=(141 << 30, "H200")).plan
        pages = (p.budget - p.weights - p.activations) // p.page_bytes
        rows.append({"kv_cache_dtype": kv, "page_bytes": p.page_bytes, "tokens_fit": pages * p.page_size})
    for r in rows:
        r["vs_auto"] = r["tokens_fit"] / rows[0]["tokens_fit"]
    return rows


def run(args) -> dict:
    from pathlib import Path

    from xlaserve.bench import report
    from xlaserve.checkpoints import registry
    from xlaserve.data import TWO_CITIES

    text = Path(args.report_text or TWO_CITIES).read_text()
    kinds = [k for k in args.kv_cache_dtypes.split(",") if k]
    models = []
    for name in args.models.split(","):
        path = str(registry.resolve(name))
        runs = [one_engine(path, kv, text, args.max_tokens) for kv in ("auto", *kinds)]
        base = runs[0]
        for r in runs[1:]:
            r["perplexity_ratio"] = r["perplexity"] / base["perplexity"]
            r["greedy"] = greedy_agreement(base["outputs"], r["outputs"])
            r["memory_ratio"] = base["kv_bytes_per_token"] / r["kv_bytes_per_token"]
        models.append({"model": name, "runs": runs})
        for r in runs:
            extra = (
                f", x{r['perplexity_ratio']:.4f}; greedy identical {r['greedy']['identical']:.0%}, "
                f"agreeing prefix {r['greedy']['prefix_agreement']:.1%}; KV bytes /{r['memory_ratio']:.2f}"
                if "greedy" in r
                else ""
            )
            print(f"{name} kv={r['kv_cache_dtype']}: perplexity {r['perplexity']:.4f}{extra}")
    fit = h200_fit(kinds)
    for r in fit:
        kv, fits = r["kv_cache_dtype"], r["tokens_fit"]
        print(f"llama3-8b on H200 (bf16): KV {kv}: {fits} tokens, x{r['vs_auto']:.2f}")
    import jax

    result = {
        "kind": "kv-cache",
        "device": report.device_info(),
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": report.command_line("xlaserve bench kv-cache", add_arguments, args),
        "max_tokens": args.max_tokens,
        "prompts": PROMPTS,
        "models": models,
        "llama3_8b_h200": fit,
    }
    report.write(result, report.result_path(args.out, "kv-cache"), markdown(result))
    return result


def markdown(result: dict) -> str:
    from xlaserve.bench.report import table

    rows = []
    for m in result["models"]:
        for r in m["runs"]:
            g = r.get("greedy")
            rows.append(
                [
                    m["model"],
                    r["kv_cache_dtype"],
                    f"{r['perplexity']:.4f}",
                    f"x{r['perplexity_ratio']:.4f}" if g else "–",
                    f"{g['identical']:.0%}" if g else "–",
                    f"{g['prefix_agreement']:.1%}" if g else "–",
                    r["kv_bytes_per_token"],
                ]
            )
    heads = ["model", "KV", "perplexity", "vs auto", "greedy identical", "agreeing prefix", "KV bytes/token"]
    fit = [
        [r["kv_cache_dtype"], r["page_bytes"], r["tokens_fit"], f"x{r['vs_auto']:.2f}"]
        for r in result["llama3_8b_h200"]
    ]
    where = f"{result['device']['kind']}, jax {result['jax_version']}, {result['date']}"
    work = f"{len(result['prompts'])} chat prompts x {result['max_tokens']} greedy tokens"
    return "\n\n".join(
        [
            f"# KV-cache quantization ({where})",
            f"`{result['command']}`; {work}.",
            table(heads, rows),
            "Llama-3-8B (bfloat16) on an H200, 0.9 x 141 GiB: tokens of KV that fit beside the weights.",
            table(["KV", "page bytes", "tokens fit", "vs auto"], fit),
        ]
    )
