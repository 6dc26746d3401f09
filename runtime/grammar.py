"""Structured output on the host: a request's JSON schema, regex or grammar (SamplingParams'
json_schema, regex, grammar: Lark in llguidance's dialect, or llama.cpp's GBNF, which llguidance
converts to Lark; a grammar with a `start:` rule or `%llguidance` line is read as Lark) compiled by
llguidance into a `Matcher`, the per-sequence parser state that says which tokens may come next.
No JAX here; the device applies the masks (sampling.py).

- `Grammars` belongs to one tokenizer and model: it builds llguidance's tokenizer once (on first
  use: ~0.3 s for SmolLM2's 49k tokens, ~1 s for Qwen's 152k) and compiles requests' grammars,
  refusing one that does not compile with a ValueError naming the field and llguidance's message.
  Compiled grammars are kept (LRU, `CACHED`): a request repeating a schema gets a copy of the
  compiled matcher instead of compiling it again.
- `Matcher` advances with each token the sequence accepts and writes the allowed-token bitmask for
  the next one: int32 [ceil(V/32)], bit t % 32 of word t // 32 set when token t is allowed, V the
  model's vocabulary (which may be larger than the tokenizer's: the padding rows are never allowed).
  EOS is allowed exactly when the grammar accepts what came so far; `done` says the grammar is
  complete (nothing but EOS can follow), and the request then ends with finish reason "stop".

JSON schemas are compiled with compact separators and no free whitespace ("whitespace_flexible":
false) unless the schema's own "x-guidance" options say otherwise: with free whitespace a small
model at temperature 1 readily spends its whole max_tokens on newlines inside a valid document.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import llguidance as llg
import llguidance.numpy as llnp
import numpy as np

from xlaserve.runtime.sampling_params import SamplingParams

FIELDS = (("json_schema", "json"), ("regex", "regex"), ("grammar", "grammar"))  # "grammar": Lark or GBNF
JSON_DEFAULTS = {"whitespace_flexible": False}
CACHED = 64  # compiled grammars kept
MAX_ERROR = 1000  # characters of llguidance's message quoted in a refusal


def mask_words(vocab_size: int) -> int:
    """int32 words of a bitmask over `vocab_size` tokens."""
    return -(-vocab_size // 32)


def unpack(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """A bitmask [..., W] int32 as bool [..., vocab_size] (for tests and debugging)."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :vocab_size].astype(bool)


class Matcher:
    """One sequence's grammar state. The runner offers it each output token exactly once, in order
    (`offered` of them so far; an EOS that ends the request is offered but not consumed), so it
    holds exactly the request's output: a recomputed (preempted) sequence keeps it as it is."""

    def __init__(self, matcher: llg.LLMatcher, words: int, field: str):
        self._m, self.words, self.field = matcher, words, field
        self.accepted = 0  # tokens consumed
        self.offered = 0  # output tokens the runner has offered it

    def advance(self, token: int) -> bool:
        """Accept the sampled token; False when the grammar refuses it (the matcher is then in an
        error state and `error` says why)."""
        ok = self._m.consume_token(int(token))
        self.accepted += ok
        return ok

    def fill(self, out: np.ndarray) -> None:
        """Write the allowed-token bitmask for the next token into out (int32 [words], contiguous)."""
        assert out.dtype == np.int32 and out.shape == (self.words,) and out.flags["C_CONTIGUOUS"]
        self._m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def mask(self) -> np.ndarray:
        out = np.empty((self.words,), np.int32)
        self.fill(out)
        return out

    @property
    def done(self) -> bool:
        """The grammar is complete: no token but EOS may follow (or the matcher failed)."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """What was accepted so far is a complete output (EOS may follow)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str:
        return self._m.get_error()

    @property
    def inner(self) -> llg.LLMatcher:
        return self._m


class Grammars:
    """Compiles requests' grammars for one tokenizer (our `Tokenizer`, whose `.backend` is an HF
    `tokenizers.Tokenizer`), a model vocabulary of `vocab_size` tokens and its EOS ids."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._eos = sorted(int(t) for t in eos_ids)
        self._lock = threading.Lock()
        self._ll: llg.LLTokenizer | None = None
        self._compiled: OrderedDict[tuple[str, str], llg.LLMatcher] = OrderedDict()
        self._executor: llg.LLExecutor | None = None

    @property
    def words(self) -> int:
        return mask_words(self.vocab_size)

    @property
    def ll_tokenizer(self) -> llg.LLTokenizer:
        """llguidance's view of the tokenizer (built on first use, what `llguidance.hf`'s
        from_tokenizer does from a transformers tokenizer: the backend's JSON, the vocabulary
        size, the EOS tokens)."""
        with self._lock:
            if self._ll is None:
                backend = getattr(self._tokenizer, "backend", None)
                if backend is None:
                    raise ValueError(
                        "structured output needs an HF tokenizers backend; this tokenizer has none"
                    )
                self._ll = llg.LLTokenizer(
                    backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos or None
                )
            return self._ll

    def compile(self, params: SamplingParams) -> Matcher | None:
        """A fresh matcher for params' json_schema / regex / grammar (None when it has none).
        Raises ValueError "<field> does not compile: <llguidance's message>"."""
        field = next((f for f, _ in FIELDS if getattr(params, f) is not None), None)
        if field is None:
            return None
        return Matcher(self._compiled_for(params).deep_copy(), self.words, field)

    def check(self, params: SamplingParams) -> None:
        """Refuse (ValueError, as `compile`) a grammar that does not compile; it stays cached."""
        if params.constrained:
            self._compiled_for(params)

    def _compiled_for(self, params: SamplingParams) -> llg.LLMatcher:
        """The compiled grammar of params (from the cache, or compiled and cached): a matcher in
        its initial state, never advanced (requests get copies)."""
        field, kind = next((f, k) for f, k in FIELDS if getattr(params, f) is not None)
        text = getattr(params, field)
        with self._lock:
            cached = self._compiled.get((field, text))
            if cached is not None:
                self._compiled.move_to_end((field, text))
        if cached is None:
            cached = self._build(field, kind, text)
            with self._lock:
                self._compiled[field, text] = cached
                while len(self._compiled) > CACHED:
                    self._compiled.popitem(last=False)
        return cached

    def _build(self, field: str, kind: str, text: str) -> llg.LLMatcher:
        try:
            if kind == "json":
                spec = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)
            else:
                spec = llg.grammar_from(kind, text)
        except ValueError as e:
            raise ValueError(f"{field} does not compile: {_short(str(e))}") from None
        matcher = llg.LLMatcher(self.ll_tokenizer, spec, log_level=0)
        if matcher.is_error():
            raise ValueError(f"{field} does not compile: {_short(matcher.get_error())}")
        return matcher

    def fill(self, rows: list[tuple[Matcher, int]], out: np.ndarray) -> None:
        """Write each (matcher, row)'s bitmask into out[row] (out int32 [R, words], contiguous); more
        than one are computed in parallel by llguidance's thread pool."""
        if len(rows) == 1:
            matcher, row = rows[0]
            matcher.fill(out[row])
            return
        if self._executor is None:
            self._executor = llg.LLExecutor()
        llnp.fill_next_token_bitmask_par(self._executor, [(m.inner, row) for m, row in rows], out)


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= MAX_ERROR else message[:MAX_ERROR] + " ..."
