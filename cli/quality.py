"""The convert-time quality report: perplexity of the converted model against its source on the
same text, both scored by our engine with lm-evaluation-harness's rolling windows."""

from __future__ import annotations

import math
from pathlib import Path

from xlaserve.data import TWO_CITIES

DEFAULT_TEXT = TWO_CITIES
# Small enough to compile quickly, and only the scoring programs it runs; the text is scored in
# windows of max_model_len - 2 tokens.
REPORT_ENGINE = dict(max_slots=2, prefill_buckets=(128,), max_model_len=512, compile_at="use")


def perplexity(model, text: str, **engine) -> dict:
    from xlaserve.llm import LLM

    llm = LLM(str(model), **(REPORT_ENGINE | engine))
    (res,) = llm.score_rolling([text])
    nll = -sum(res.logprobs)
    return {"tokens": len(res.logprobs), "nll": nll, "perplexity": math.exp(nll / len(res.logprobs))}


def quality_report(source, converted, text_path=None) -> dict:
    """{source: {...}, converted: {...}, ratio, text}: perplexities on the same text and tokens."""
    path = Path(text_path) if text_path else DEFAULT_TEXT
    if not path.is_file():
        raise ValueError(f"report text {path} not found; pass --report-text FILE (or --no-report)")
    text = path.read_text()
    src, dst = perplexity(source, text), perplexity(converted, text)
    return {
        "text": path.name,
        "source": src,
        "converted": dst,
        "ratio": dst["perplexity"] / src["perplexity"],
    }


def format_report(report: dict) -> str:
    s, c = report["source"], report["converted"]
    return (
        f"quality on {report['text']} ({s['tokens']} tokens): perplexity {s['perplexity']:.3f} (source) -> "
        f"{c['perplexity']:.3f} (converted), x{report['ratio']:.4f}"
    )
