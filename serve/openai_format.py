"""The OpenAI API's response objects, built from finished (or streaming) requests: chat completions
and their chunks, text completions and theirs, both kinds of log-probs (chat's per-token objects
with bytes; completions' legacy tokens / token_logprobs / top_logprobs / text_offset), usage, and
the model list. Plain dicts, serialized once by the caller.

Usage counts each prompt once, however many choices sample it (as OpenAI bills n); completion
tokens are every choice's, the end-of-sequence token included (it was generated);
prompt_tokens_details.cached_tokens is, per prompt, the fewest prompt tokens any of its choices
took from the prefix cache.
"""

from __future__ import annotations

import re

from tokenizers import decoders

from xlaserve.checkpoints.vocab import bytes_to_unicode
from xlaserve.runtime.request import FinishReason, Request, TokenLogprob
from xlaserve.serve.openai_params import Plan
from xlaserve.serve.openai_tools import parse_tool_calls

FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTexts:
    """A token's bytes (what it adds to the output's UTF-8) and its text, cached per id: byte-level
    BPE pieces mapped back through GPT-2's alphabet, SentencePiece's "▁" and <0xNN> pieces undone,
    added tokens as their own text. A token that ends inside a UTF-8 sequence has text with U+FFFD."""

    def __init__(self, tokenizer):
        backend = tokenizer.backend
        self._backend = backend
        self._added = frozenset(backend.get_added_tokens_decoder())
        byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._unbyte = {c: b for b, c in bytes_to_unicode().items()} if byte_level else None
        self._cache: dict[int, tuple[bytes, str]] = {}

    def _compute(self, token: int) -> bytes:
        piece = self._backend.id_to_token(token)
        if piece is None:
            return b""
        if token in self._added:
            return piece.encode()
        if self._unbyte is not None:
            try:
                return bytes(self._unbyte[c] for c in piece)
            except KeyError:
                return piece.encode()
        m = _BYTE.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()

    def get(self, token: int) -> tuple[bytes, str]:
        got = self._cache.get(token)
        if got is None:
            raw = self._compute(token)
            got = self._cache[token] = (raw, raw.decode("utf-8", "replace"))
        return got

    def text(self, token: int) -> str:
        return self.get(token)[1]


def chat_logprobs(lps: list[TokenLogprob], texts: TokenTexts) -> dict:
    def entry(token: int, logprob: float) -> dict:
        raw, text = texts.get(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps
        ],
        "refusal": None,
    }


def legacy_logprobs(entries, texts: TokenTexts, offset: int) -> dict:
    """Completions' log-probs of `entries`: (token, logprob or None, top [(token, logprob)] or None),
    text offsets counted from `offset`. The chosen token is among its top_logprobs, as vLLM does."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in entries:
        text = texts.text(token)
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        if top is None:
            out["top_logprobs"].append(None)
        else:
            alternatives = {texts.text(t): v for t, v in top}
            alternatives.setdefault(text, logprob)
            out["top_logprobs"].append(alternatives)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def generated(lps: list[TokenLogprob]) -> list[tuple]:
    return [(lp.token_id, lp.logprob, lp.top) for lp in lps]


def prompt_entries(ids: list[int], score: Request | None) -> list[tuple]:
    """The prompt's tokens with their log-probs (scored: each given the ones before it; the first
    has none); top_logprobs of a prompt token hold that token alone."""
    if score is None:
        return [(ids[0], None, None)]
    lps = [lp for lp, _ in score.scores]
    return [(ids[0], None, None)] + [(t, v, ((t, v),)) for t, v in zip(ids[1:], lps, strict=True)]


def finish_reason(req: Request, tool_calls: bool = False) -> str | None:
    if tool_calls:
        return "tool_calls"
    return FINISH.get(req.finish_reason)


def usage(plan: Plan) -> dict:
    prompt = sum(len(p.ids) for p in plan.prompts)
    completion = sum(len(r.output_ids) for r in plan.requests)
    n = plan.n
    cached = sum(
        min(r.cached_tokens for r in plan.requests[i * n : (i + 1) * n]) for i in range(len(plan.prompts))
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def echo_text(plan: Plan, i: int, tokenizer) -> str:
    prompt = plan.prompts[i]
    return prompt.text if prompt.text is not None else tokenizer.decode(prompt.ids)


def chat_response(plan: Plan, rid: str, created: int, texts: TokenTexts) -> dict:
    choices = []
    for i, r in enumerate(plan.requests):
        content, calls = (
            parse_tool_calls(r.text, plan.parallel_tool_calls) if plan.tool_calls else (r.text, [])
        )
        message = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": None if plan.top_logprobs is None else chat_logprobs(r.logprobs, texts),
                "finish_reason": finish_reason(r, bool(calls)),
                "stop_reason": r.stop_reason if isinstance(r.stop_reason, str) else None,
            }
        )
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": plan.model,
        "choices": choices,
        "usage": usage(plan),
        "system_fingerprint": None,
    }


def completion_response(plan: Plan, rid: str, created: int, texts: TokenTexts, tokenizer) -> dict:
    choices = []
    for i, r in enumerate(plan.requests):
        p = i // plan.n
        prefix = echo_text(plan, p, tokenizer) if plan.echo else ""
        logprobs = None
        if plan.top_logprobs is not None:
            entries = generated(r.logprobs)
            logprobs = legacy_logprobs(entries, texts, len(prefix))
            if plan.echo:
                head = legacy_logprobs(prompt_entries(plan.prompts[p].ids, plan.prompts[p].score), texts, 0)
                logprobs = {k: head[k] + logprobs[k] for k in logprobs}
        choices.append(
            {
                "index": i,
                "text": prefix + r.text,
                "logprobs": logprobs,
                "finish_reason": finish_reason(r),
                "stop_reason": r.stop_reason if isinstance(r.stop_reason, str) else None,
            }
        )
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": plan.model,
        "choices": choices,
        "usage": usage(plan),
        "system_fingerprint": None,
    }


def chunk(plan: Plan, rid: str, created: int, choice: dict, include_usage: bool) -> dict:
    """One streamed chunk holding one choice's update."""
    out = {
        "id": rid,
        "object": "chat.completion.chunk" if plan.chat else "text_completion",
        "created": created,
        "model": plan.model,
        "choices": [choice],
    }
    if include_usage:
        out["usage"] = None
    return out


def usage_chunk(plan: Plan, rid: str, created: int) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if plan.chat else "text_completion",
        "created": created,
        "model": plan.model,
        "choices": [],
        "usage": usage(plan),
    }


def models(names: tuple[str, ...], created: int) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "xlaserve"}
            for name in dict.fromkeys(names)
        ],
    }
