"""What a request asks of the sampler, validated on the host: `SamplingParams` and the seed a
request samples with. No JAX here (the device side, `SamplingState` and `sample`, is sampling.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

MAX_SEED = 2**64 - 1
MAX_TOP_K = 2**31 - 1  # an int32 on device; any value ≥ the vocabulary size keeps every token
MAX_LOGPROBS = 100  # the most EngineConfig.max_logprobs allows
MAX_GRAMMAR = 1 << 20  # characters of a JSON schema, regex or grammar


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler. Invalid values raise ValueError naming the field.

    top_k 0 and top_p 1 and min_p 0 disable those filters; top_k -1 is accepted as "disabled" too (the
    vLLM and OpenAI-compatible spelling), any other negative value is refused. repetition_penalty 1
    disables it. logprobs None returns no log-probs; 0 the chosen token's; N also the top N
    alternatives. stop: strings that end the output (not included in the text); stop_token_ids
    likewise for ids. speculative False: the request never guesses when the engine speculates
    (greedy output is the same either way; runtime/spec_policy.py).

    Structured output (at most one): json_schema (a JSON schema, as a dict or its JSON text; the
    output is JSON the schema accepts), regex (the whole output matches
    it), grammar (Lark in llguidance's dialect, or llama.cpp's GBNF). The output is constrained token by token
    (runtime/grammar.py); a grammar that cannot be compiled is refused naming the field.

    The bounds here are the ones no engine exceeds (logprobs ≤ 100, the most `max_logprobs` can be;
    token ids ≥ 0). A serving engine's own limits (its max_logprobs, its vocabulary size) are checked
    by `LLM.sampling_params` / `LLM.make_request`, whose messages quote those limits.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None
    speculative: bool = True  # False: never guess (speculative decoding); outputs are the same

    def __post_init__(self):
        if isinstance(self.json_schema, dict | bool):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        for name in ("json_schema", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_GRAMMAR):
                raise ValueError(f"{name} must be a non-empty string of at most {MAX_GRAMMAR} characters")
        if sum(getattr(self, n) is not None for n in ("json_schema", "regex", "grammar")) > 1:
            raise ValueError("json_schema, regex and grammar are exclusive: give at most one")
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _int("max_tokens", self.max_tokens, 1, 1 << 20)
        _num("temperature", self.temperature, 0.0, 100.0)
        _int("top_k", self.top_k, -1, MAX_TOP_K, "0 or -1: no top-k filter")
        _num("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _num("min_p", self.min_p, 0.0, 1.0)
        _num("repetition_penalty", self.repetition_penalty, 0.0, 100.0, low_open=True)
        if self.seed is not None:
            _int("seed", self.seed, 0, MAX_SEED)
        if len(self.stop) > 16 or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in self.stop):
            raise ValueError("stop must be at most 16 non-empty strings of at most 256 characters")
        for i, t in enumerate(self.stop_token_ids):
            if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 0:
                raise ValueError(
                    f"stop_token_ids[{i}]={t!r} must be a token id: an integer ≥ 0 and below the model's "
                    "vocabulary size"
                )
        for name in ("ignore_eos", "speculative"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, MAX_LOGPROBS, "and at most the engine's max_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def constrained(self) -> bool:
        """The output follows a JSON schema, regex or grammar."""
        return self.json_schema is not None or self.regex is not None or self.grammar is not None


def with_seed(params: SamplingParams, rng: np.random.Generator) -> int:
    """The request's seed, or a fresh one for unseeded requests."""
    if params.seed is not None:
        return params.seed
    return int(rng.integers(0, MAX_SEED, dtype=np.uint64))


def _int(field: str, value, lo: int, hi: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        raise ValueError(
            f"{field}={value!r} must be an integer in [{lo}, {hi}]" + (f" ({note})" if note else "")
        )


def _num(field: str, value, lo: float, hi: float, low_open: bool = False) -> None:
    ok = isinstance(value, int | float | np.floating) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo < value if low_open else lo <= value) and value <= hi
    if not ok:
        raise ValueError(f"{field}={value!r} must be a number in {'(' if low_open else '['}{lo}, {hi}]")
