"""Carries out a plan's prompt chunks on the engine (the runner's step 2, runner.py): generation
chunks go as batched prefill calls, grouped as the scheduler costed them (prefill_calls.py), a
grammar request's last chunk alone through the masked prefill (its bitmask is per call); scoring
chunks go as batched scoring calls, whose log-probs are read at once.

Generation calls are dispatched first and not read here: the runner inserts the sequences whose
prompt ended (each takes its row of its call's result) and reads the first tokens later, while the
device runs. A sequence's chunks keep their order; across sequences order does not matter within a
step (prefill_calls.py), so scoring and generation calls need not interleave as planned.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from xlaserve.runtime.engine import Engine
from xlaserve.runtime.request import Delta, FinishReason
from xlaserve.runtime.sampling import SamplingState
from xlaserve.runtime.scheduler import Scheduler
from xlaserve.runtime.sequence import Chunk, Seq

# A sequence whose prompt is now prefilled: (it, the packed result of its call, its row in it)
Ready = tuple[Seq, object, int]


class Prefills:
    def __init__(self, engine: Engine, scheduler: Scheduler):
        self.engine, self.scheduler = engine, scheduler

    def dispatch(
        self, chunks: list[Chunk], sampling: dict[Seq, SamplingState], presence: Callable[[Seq], np.ndarray]
    ) -> tuple[list[Delta], list[Ready], object | None]:
        """Run `chunks` (a plan's, in plan order). Returns the deltas of scoring requests that ended,
        the sequences ready to insert, and the last generation call's result (None: no such call)
        to wait on: calls run in dispatch order."""
        s, last = self.scheduler, None
        generating = [c for c in chunks if c.seq.req.score_start is None]
        items = [(c.seq, len(c.tokens), c.last and c.seq.req.grammar is not None) for c in generating]
        ready: list[Ready] = []
        for call in self.engine.prefill_calls.group(items):
            batch = [generating[i] for i in call]
            rows = [
                (c.tokens, c.start, s.page_table[c.seq.slot], sampling[c.seq], presence(c.seq)) for c in batch
            ]
            if items[call[0]][2]:
                last = self.engine.prefill(*rows[0], batch[0].seq.req.grammar.mask())
            else:
                last = self.engine.prefill_batch(rows)
            for row, chunk in enumerate(batch):
                s.prefilled(chunk)
                if chunk.last:
                    ready.append((chunk.seq, last, row))
        return self._score_all([c for c in chunks if c.seq.req.score_start is not None]), ready, last

    def _score_all(self, chunks: list[Chunk]) -> list[Delta]:
        """Scoring chunks go to the device in the calls `Engine.score_calls` groups them in."""
        calls = self.engine.score_calls.group([(c.seq, len(c.tokens)) for c in chunks])
        return [d for call in calls for d in self._score([chunks[i] for i in call])]

    def _score(self, chunks: list[Chunk]) -> list[Delta]:
        """Score chunks in one call (of distinct sequences, or packed: two of one in order): position i
        of a chunk predicts the token at chunk.start + i + 1 (and the request's other candidates for
        that index, if any)."""
        items = []
        for chunk in chunks:
            end = chunk.start + len(chunk.tokens)
            first = min(len(chunk.tokens), max(0, chunk.seq.req.score_start - 1 - chunk.start))  # first read
            row = self.scheduler.page_table[chunk.seq.slot]
            items.append((chunk.tokens, chunk.start, row, _targets(chunk.seq, chunk.start, end), first))
        deltas = []
        for chunk, (logprobs, greedy) in zip(chunks, self.engine.score_batch(items), strict=True):
            self.scheduler.prefilled(chunk)
            req, n = chunk.seq.req, len(chunk.seq.tokens())
            if logprobs.ndim == 2:  # [n, K]: column 0 the next token, then score_alts
                for i in range(len(chunk.tokens)):
                    p = chunk.start + i + 1
                    for k, token in enumerate(req.score_alts.get(p, ()), 1):
                        req.alt_scores[p, token] = (float(logprobs[i, k]), bool(greedy[i, k]))
                logprobs, greedy = logprobs[:, 0], greedy[:, 0]
            for i in range(len(chunk.tokens)):
                if req.score_start <= chunk.start + i + 1 < n:
                    req.scores.append((float(logprobs[i]), bool(greedy[i])))
            if not chunk.last:
                continue
            if req.timings.first_token is None:
                req.timings.first_token = time.perf_counter()
            req.finish(FinishReason.SCORED)
            deltas.append(Delta(req, [], "", [], finished=True))
        return deltas


def _targets(seq: Seq, start: int, end: int):
    """What chunk positions start .. end - 1 of a scoring sequence score: the next tokens [<= n],
    or, when the request has other candidates (score_alts), [n, 1 + most candidates] (column 0 the
    next token or 0 past the end, then the candidates, padded with 0)."""
    tokens, alts = seq.tokens(), seq.req.score_alts
    if not alts:
        return tokens[start + 1 : end + 1]
    width = 1 + max(len(alts.get(p, ())) for p in range(start + 1, end + 1))
    out = np.zeros((end - start, width), np.int32)
    for i, p in enumerate(range(start + 1, end + 1)):
        row = (tokens[p] if p < len(tokens) else 0, *alts.get(p, ()))
        out[i, : len(row)] = row
    return out
