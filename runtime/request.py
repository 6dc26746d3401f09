"""A request on the host: its tokens, incremental text, stop conditions and timings. No JAX here.

Text is produced incrementally the way TGI and vLLM do it: decode a window of recent tokens and
emit only what extends the previous decode and does not end in an incomplete UTF-8 sequence. Stop
strings are searched in the text; text that could still become the start of a stop string is held
back, so a stop string never appears in streamed output.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from xlaserve.runtime.sampling_params import SamplingParams
from xlaserve.runtime.spec_policy import SpecCounts


class FinishReason(enum.StrEnum):
    EOS = "eos"  # the model's end-of-sequence token
    STOP = "stop"  # a stop string or stop token id (see stop_reason)
    LENGTH = "length"  # max_tokens, or the engine's max_model_len
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    SCORED = "scored"  # a scoring request: its tokens were scored, nothing was generated


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class Timings:
    arrival: float = 0.0  # time.perf_counter() when submitted
    first_token: float | None = None
    scheduled: float | None = None  # first admitted to a slot
    finished: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def queue_s(self) -> float | None:
        """Arrival to first admitted to a slot (what the Prometheus queue-time histogram records)."""
        return None if self.scheduled is None else self.scheduled - self.arrival

    def decode_tokens_per_s(self, n_tokens: int) -> float | None:
        if self.first_token is None or self.finished is None or n_tokens < 2:
            return None
        dt = self.finished - self.first_token
        return (n_tokens - 1) / dt if dt > 0 else None

    def as_dict(self, n_tokens: int) -> dict:
        total = None if self.finished is None else self.finished - self.arrival
        return {
            "queue_s": self.queue_s,
            "ttft_s": self.ttft_s,
            "decode_tokens_per_s": self.decode_tokens_per_s(n_tokens),
            "total_s": total,
        }


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # a FinishReason value; None while running
    stop_reason: str | int | None  # the stop string or stop token id that ended the output
    logprobs: list[TokenLogprob] | None
    timings: dict
    cached_tokens: int = 0
    # speculative decoding: {"proposed": guesses made, "accepted": guesses kept}; None when the
    # engine does not speculate
    speculative: dict | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Delta:
    """What one engine step added to a request (for streaming). `finished` says whether this is
    the request's last delta; read it rather than request.finished, which a consumer on another
    thread may see change before it has read the earlier deltas."""

    request: Request
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finished: bool = False


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    eos_ids: frozenset[int]
    timings: Timings = field(default_factory=Timings)
    priority: int = 0  # higher runs first
    client_id: str | None = None  # for the per-client concurrency limit
    # Someone reads its tokens as they come (a stream, a server's client): while such a request
    # holds a slot, a step's prefill is bounded to keep its stall short (budget.py). False: only the
    # whole output matters (LLM.generate), so steps prefill for throughput.
    streamed: bool = True
    deadline: float | None = None  # time.perf_counter() after which the request ends (DEADLINE)
    score_start: int | None = None  # scoring request: report log-probs of prompt_ids[score_start:]
    scores: list[tuple[float, bool]] = field(default_factory=list)  # (log-prob, is-greedy) per scored token
    # Other candidates for a scored position, read from the same logits: index p in [score_start,
    # len(prompt_ids)] -> token ids that could stand at p instead of prompt_ids[p] (at most
    # SCORE_TARGETS - 1 each; p == len(prompt_ids): candidates after the last token). Their
    # (log-prob, is-greedy) land in alt_scores[(p, token)]. See runtime/scoring.py `share_rows`.
    score_alts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    alt_scores: dict[tuple[int, int], tuple[float, bool]] = field(default_factory=dict)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""  # emitted text (stop strings never included)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    cached_tokens: int = 0
    # structured output: the grammar's state (runtime/grammar.py Matcher), None without one (and
    # once the request has ended: the runner frees it)
    grammar: object | None = None
    speculative: SpecCounts | None = None  # set by a runner that speculates
    # incremental detokenization state
    _prefix_offset: int = 0
    _read_offset: int = 0
    _pending: str = ""  # decoded but held back (could start a stop string)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: FinishReason, stop_reason=None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.stop_reason = reason, stop_reason
            self.timings.finished = time.perf_counter()

    def append(
        self, token: int, logprob: TokenLogprob | None, tokenizer, max_len: int, complete: bool = False
    ) -> tuple[list[int], str]:
        """Add one sampled token; apply the stop conditions. Returns (ids, text) to emit; nothing
        once the request has finished. `max_len` is the longest sequence the engine holds.
        An end token (EOS or a stop id) is kept in token_ids but adds no text. `complete`: the
        token completes the request's grammar (structured output), which then ends it (STOP)."""
        if self.finished:
            return [], ""
        if self.timings.first_token is None:
            self.timings.first_token = time.perf_counter()
        self.output_ids.append(token)
        if logprob is not None and self.params.logprobs is not None:
            self.logprobs.append(logprob)
        p = self.params
        if token in self.eos_ids and not p.ignore_eos:
            self.finish(FinishReason.EOS, token)
            return [token], self._flush(tokenizer, upto=len(self.output_ids) - 1)
        if token in p.stop_token_ids:
            self.finish(FinishReason.STOP, token)
            return [token], self._flush(tokenizer, upto=len(self.output_ids) - 1)
        text = self._detokenize(tokenizer)
        if self.finished:  # a stop string matched
            return [token], text
        if complete:
            self.finish(FinishReason.STOP)
            text += self._flush(tokenizer, upto=len(self.output_ids))
        elif len(self.output_ids) >= p.max_tokens or len(self.prompt_ids) + len(self.output_ids) >= max_len:
            self.finish(FinishReason.LENGTH)
            text += self._flush(tokenizer, upto=len(self.output_ids))
        return [token], text

    def _detokenize(self, tokenizer) -> str:
        ids = self.output_ids
        prefix = tokenizer.decode(ids[self._prefix_offset : self._read_offset])
        full = tokenizer.decode(ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return self._with_stops(self._pending + full[len(prefix) :])

    def _with_stops(self, new: str, final: bool = False) -> str:
        """Emit `new` unless it contains a stop string (then emit up to it and finish); unless
        `final`, hold back a tail that could be the start of a stop string."""
        self._pending = ""
        stops = self.params.stop
        if not stops:
            self.text += new
            return new
        search_from = max(0, len(self.text) - max(len(s) for s in stops))
        window = self.text[search_from:] + new
        hits = [(i, s) for s in stops if (i := window.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            cut = i - (len(self.text) - search_from)
            emit = new[: max(cut, 0)]
            self.text += emit
            self.finish(FinishReason.STOP, s)
            return emit
        if final:
            self.text += new
            return new
        hold = max((k for s in stops for k in range(1, len(s)) if new.endswith(s[:k])), default=0)
        emit, self._pending = (new[:-hold], new[-hold:]) if hold else (new, "")
        self.text += emit
        return emit

    def _flush(self, tokenizer, upto: int) -> str:
        """At the end: text of output_ids[:upto] not yet emitted (held back for a possible stop
        string, or waiting for the rest of a UTF-8 sequence)."""
        ids = self.output_ids[:upto]
        rest = tokenizer.decode(ids[self._prefix_offset :])
        done = tokenizer.decode(ids[self._prefix_offset : self._read_offset])
        self._prefix_offset = self._read_offset = len(ids)
        tail = rest[len(done) :] if rest.startswith(done) else ""
        out = self._with_stops(self._pending + tail, final=True)
        return out

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_ids),
            text=self.text,
            token_ids=list(self.output_ids),
            finish_reason=None if self.finish_reason is None else self.finish_reason.value,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            timings=self.timings.as_dict(len(self.output_ids)),
            cached_tokens=self.cached_tokens,
            speculative=None if self.speculative is None else self.speculative.as_dict(),
        )
