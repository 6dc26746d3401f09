"""A stand-in for `Engine` with hand-checkable arithmetic, for fast tests of everything above it
(scheduler, runner, engine loop, server) without compiling anything.

Its "model" continues any sequence with the previous token + 1 (mod V), with log-prob 0 for that
token and -10 for every other; token 0 is EOS. A prompt ending in 7 therefore streams 8, 9, 10, ...
`step_s` slows each dispatch down, to test deadlines and cancellation mid-stream; `token_s` adds
that much per prompt token a prefill or scoring call computes (its chunk padded to the bucket), to
test the token budget. With `async_dispatch` it behaves like a JAX device: a dispatch returns at once
and queues its time on one device clock, and reading a result waits until the device has run
everything queued up to it (so work dispatched for a request that was then cancelled still costs
what it costs). `device_s` adds up every dispatch's time. With a grammar's bitmask (structured
output) a row takes its token when the mask allows it, else the lowest token the mask allows. It
has no tokenizer: the caller pairs it with one (`LLM.from_engine(MockEngine(), tokenizer)`; the
tests use a word-level one spelling token i as "w{i}", tests/serving.py).

`prefill_batch` answers each row as `prefill` would, in one call charged its padded tokens.

A speculative `verify` keeps the leading guesses that follow the same rule, then adds its own.
"""

from __future__ import annotations

import time

import numpy as np

from xlaserve.runtime.config import EngineConfig, ModelConfig
from xlaserve.runtime.prefill_calls import Calls, calls_for, prefill_rows, score_calls_for
from xlaserve.runtime.results import Sampled, Verified

VOCAB = 512
EOS = 0
OTHER_LOGPROB = -10.0


def mock_config(vocab: int = VOCAB) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_ids=(EOS,),
        name="mock",
    )


class _OnHost(np.ndarray):
    """A numpy result that accepts the calls the runner makes on device arrays."""

    def copy_to_host_async(self) -> None:
        pass


class _Pending:
    """A result of an asynchronous dispatch: reading it (np.asarray) waits until `ready_at`."""

    def __init__(self, value: np.ndarray, ready_at: float):
        self.value, self.ready_at = value, ready_at

    def copy_to_host_async(self) -> None:
        pass

    def block_until_ready(self):
        time.sleep(max(0.0, self.ready_at - time.perf_counter()))
        return self

    def __array__(self, dtype=None, copy=None):
        self.block_until_ready()
        return self.value if dtype is None else self.value.astype(dtype)


def _value(result) -> np.ndarray:
    """A result's values without waiting (the mock computes them at dispatch)."""
    return result.value if isinstance(result, _Pending) else np.asarray(result)


class MockEngine:
    def __init__(
        self,
        engine_cfg: EngineConfig | None = None,
        *,
        vocab: int = VOCAB,
        step_s: float = 0.0,
        token_s: float = 0.0,
        depth_s: float = 0.0,
        async_dispatch: bool = False,
        packed: bool = False,
    ):
        self.cfg = mock_config(vocab)
        self.packed = packed  # prefill_batch packs its chunks' tokens (prefill_calls.Packed)
        self.ecfg = (engine_cfg or EngineConfig()).resolve(self.cfg, "cpu")
        self.step_s, self.token_s, self.async_dispatch = step_s, token_s, async_dispatch
        self.depth_s = depth_s  # a prefill's extra cost per padded token per position of its start
        self.device_s = 0.0
        self._free_at = 0.0  # when the device has run everything dispatched so far
        self.compile_seconds: dict[str, float] = {}
        self.tokens = np.zeros((self.ecfg.max_slots,), np.int64)
        self.active = np.zeros((self.ecfg.max_slots,), bool)
        self.copied: list[tuple[int, int]] = []  # copy_pages calls' (src, dst): no K/V here
        self.dispatches = 0
        self.verifies = 0  # of the dispatches, verify calls

    def _packed(self, tokens: np.ndarray, n_top: int) -> _OnHost:
        out = np.zeros((*tokens.shape, 2 + 2 * self.ecfg.max_logprobs), np.int32)
        out[..., 0] = tokens
        out[..., 1] = np.float32(0.0).view(np.int32)
        if n_top:
            out[..., 2] = tokens
            out[..., 3 : 2 + self.ecfg.max_logprobs] = (
                tokens[..., None] + np.arange(1, self.ecfg.max_logprobs)
            ) % self.cfg.vocab_size
            lps = np.full(self.ecfg.max_logprobs, OTHER_LOGPROB, np.float32)
            lps[0] = 0.0
            out[..., 2 + self.ecfg.max_logprobs :] = lps.view(np.int32)
        return out.view(_OnHost)

    def _next(self, token):
        return (np.asarray(token) + 1) % self.cfg.vocab_size

    def _allowed(self, token: int, words: np.ndarray) -> int:
        """`token` if the bitmask words (int32 [ceil(V/32)]) allow it, else the lowest they allow."""
        bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")
        return int(token) if bits[token] else int(np.argmax(bits))

    def _run(self, seconds: float, result):
        """Charge one dispatch of `seconds`: wait for it (synchronous) or queue it (async)."""
        self.device_s += seconds
        if not self.async_dispatch:
            time.sleep(seconds)
            return result
        self._free_at = max(time.perf_counter(), self._free_at) + seconds
        return _Pending(result, self._free_at)

    def prefill(self, tokens, start, page_row, sampling, presence, allowed=None):
        cost = self.step_s + (self.token_s + self.depth_s * start) * self.ecfg.prefill_bucket(len(tokens))
        nxt = self._next([tokens[-1]])
        if allowed is not None:
            nxt[0] = self._allowed(nxt[0], allowed)
        return self._run(cost, self._packed(nxt, int(sampling.n_top[0])))

    def prefill_rows(self, t: int) -> tuple[int, ...]:
        return prefill_rows(self.ecfg.max_slots, self.ecfg.prefill_buckets, t)

    @property
    def prefill_calls(self) -> Calls:
        return calls_for(self.ecfg, self.packed, self.prefill_rows)

    def prefill_batch(self, chunks):
        """One call for every chunk (tokens, start, page_row, sampling, presence): step_s, and token_s
        per padded token (compiled rows x bucket, or packed: the tokens' bucket), as a real call
        costs."""
        if self.packed:
            rows, t = 1, self.prefill_calls.bucket(sum(len(c[0]) for c in chunks))
        elif len(chunks) == 1:
            return self.prefill(*chunks[0])
        else:
            t = self.ecfg.prefill_bucket(max(len(c[0]) for c in chunks))
            rows = next(r for r in self.prefill_rows(t) if r >= len(chunks))
        nxt = self._next([c[0][-1] for c in chunks])
        n_top = max(int(c[3].n_top[0]) for c in chunks)
        per_token = self.token_s + self.depth_s * max(c[1] for c in chunks)  # the deepest chunk's
        return self._run(self.step_s + per_token * rows * t, self._packed(nxt, n_top))

    def score_rows(self, t: int) -> tuple[int, ...]:
        return (1, 4)

    @property
    def score_calls(self):
        return score_calls_for(self.ecfg, self.packed, self.score_rows)

    def score_batch(self, items):
        """One call: step_s, and token_s per padded token (rows x bucket, or the tokens' bucket)."""
        if self.packed:
            tokens = self.score_calls.bucket(sum(len(it[0]) for it in items))
        else:
            tokens = self.ecfg.prefill_bucket(max(len(it[0]) for it in items)) * len(items)
        np.asarray(self._run(self.step_s + self.token_s * tokens, np.zeros(0)))  # one call, read
        out = []
        for tokens, _, _, targets, *_ in items:
            targets = np.asarray(targets, np.int64)  # [n] or [n, K] candidates
            nxt = self._next(np.asarray(tokens)[: len(targets)])
            greedy = targets == (nxt if targets.ndim == 1 else nxt[:, None])
            lps = np.where(greedy, 0.0, OTHER_LOGPROB).astype(np.float32)
            pad = [(0, len(tokens) - len(targets))] + [(0, 0)] * (targets.ndim - 1)
            out.append((np.pad(lps, pad), np.pad(greedy, pad)))
        return out

    def insert(self, slot, packed, length, sampling, presence, row=0):
        self.tokens[slot] = int(_value(packed)[row, 0])
        self.active[slot] = True

    def free(self, slot):
        self.active[slot] = False

    def copy_pages(self, pairs):
        self.copied += list(pairs)

    def routed_tokens(self, wait: bool = False, reset: bool = False) -> np.ndarray:
        return np.zeros((self.cfg.num_layers, 0), np.int64)  # a dense model routes nothing

    def decode(self, page_table, kv_tokens, busy_rows=None, allowed=None):
        self.dispatches += 1
        rows = busy_rows or self.ecfg.max_slots
        steps = []
        for _ in range(self.ecfg.decode_steps if allowed is None else 1):
            nxt = np.where(self.active, self._next(self.tokens), self.tokens)
            if allowed is not None:
                for row in np.flatnonzero(self.active):
                    nxt[row] = self._allowed(nxt[row], allowed[row])
            steps.append(nxt[:rows].copy())
            self.tokens = nxt
        return self._run(self.step_s, self._packed(np.stack(steps), self.ecfg.max_logprobs))

    def verify(self, page_table, kv_tokens, proposed, n_proposed, busy_rows=None):
        """Speculative step: a slot keeps its leading guesses that are each the previous token + 1,
        then adds its own next token. Returns `Verified` (on the host, as Engine.verify does)."""
        self.dispatches += 1
        self.verifies += 1
        rows = busy_rows or self.ecfg.max_slots
        emitted = np.zeros((rows,), np.int32)
        tokens = np.zeros((rows, proposed.shape[1] + 1), np.int64)
        for row in np.flatnonzero(self.active[:rows]):
            i = 0
            while True:
                tokens[row, i] = self._next(self.tokens[row] if i == 0 else tokens[row, i - 1])
                if i == n_proposed[row] or proposed[row, i] != tokens[row, i]:
                    break
                i += 1
            emitted[row], self.tokens[row] = i + 1, tokens[row, i]
        packed = np.asarray(self._run(self.step_s, self._packed(tokens, self.ecfg.max_logprobs)))
        return Verified(emitted, Sampled.unpack(packed))
