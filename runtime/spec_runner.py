"""Speculative decoding in the runner: which sequences guess, what they guess, and the verify step.

In a decode batch without grammar sequences, each sequence guesses up to K tokens, on pages the pool
has free (a guess never preempts anyone). Greedy sequences keep the guesses equal to the target's
argmax, so their output is plain decoding's; sampled ones keep them by rejection sampling
(runtime/speculative.py), so each token is distributed as plain sampling's. Both proposers make
deterministic guesses (a draft model's are its greedy tokens), which `accept` treats as a one-hot
draft distribution: guess d is kept with the target's probability p(d). With a guess to check, the
runner runs one verify call instead of a decode dispatch, and reads it before returning (the next
guesses need its tokens); with none, the decode dispatch. Either way the guesses needed the tokens
of the dispatch in flight first, so such batches are not pipelined. Only batches where some sequence
may guess pay that: a step guesses up to the K its batch size gets from the schedule, and only
sequences that have not opted out and are not switched off for poor acceptance guess
(runtime/spec_policy.py). Each request counts its guesses made and kept (`Request.speculative`);
`Speculation` sums them, and how many tokens each guessing sequence emitted per verify step.

Three proposers:
- `NgramProposer`: n-gram lookup in the sequence's own prompt and output (runtime/speculative.py);
- `DraftProposer`: a draft model (runtime/draft.py) on the target's page table. It knows how many
  of each slot's positions hold the draft's K/V of the slot's sequence (0 for a sequence new to the
  slot: prefix-cache pages may hold none); before guessing it catches a sequence up with prefill
  chunks, then all guessing rows get their guesses in one propose call. After a verify step the
  draft's K/V is valid up to the last guess the target kept (its K/V beyond is stale and gets
  overwritten).
- `EagleProposer`: a trained EAGLE-style draft head (runtime/draft_head.py) over the target's own
  states before its final norm, which the engine's decode and verify programs return when it is built
  with `features` (programs.py). It keeps each slot's last W (state, next token) pairs on the host,
  fed from every decode and verify step the runner reads (a verify step's accepted positions only);
  all guessing rows get their guesses from one `draft_head.propose` call over the batch's slot
  bucket (one compiled shape per bucket, compiled at start-up). A sequence new to its slot has no
  pairs: it guesses from its second step on (one pair is enough: the head pads the window). The
  call costs about a decode step, so, as for a draft model, whether a step pays is checked first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xlaserve.runtime.draft import WINDOW, DraftEngine
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.request import Delta, Request
from xlaserve.runtime.sampling import SamplingState
from xlaserve.runtime.sampling_params import SamplingParams
from xlaserve.runtime.scheduler import Scheduler
from xlaserve.runtime.sequence import Seq
from xlaserve.runtime.spec_policy import schedule_k
from xlaserve.runtime.speculative import ngram_propose

if TYPE_CHECKING:  # draft_head needs flax (the train extra): imported only when a head is used
    from xlaserve.runtime.draft_head import Head


class NgramProposer:
    """Prompt lookup: guesses cost nothing, so pages are reserved for the guesses found.

    A sequence `may_find` guesses when the last MIN_N of the tokens read occurred before, and
    guesses only from matches of at least MIN_N tokens. `Speculation.k` asks before the tokens in
    flight are read, so a sequence whose lookup would find nothing keeps its batch pipelined; one
    whose lookup finds nothing once they are read (a miss) counts a one-token step. Measured on
    SmolLM2's greedy answers to bench/spec.py's prompts (8 a kind, 128 tokens, K = 4), tokens a
    verify step and steps whose fresh lookup found nothing after all, for MIN_N 1 / 2 / 3: copy 4.92
    / 4.88 / 4.84 (8 / 1 / 0 misses), code editing 2.06 / 3.34 / 4.21 (132 / 83 / 40), open chat
    2.00 / 2.63 / 2.82 (175 / 59 / 28), against a verify step's cost of 1.9 to 2.7 decode steps
    (batch 1 to 32): one-token matches mostly guess wrong."""

    MIN_N = 3
    writes_cache = False
    costly = False  # (a draft's call costs about a decode step: Speculation.propose checks first)

    def may_find(self, seq: Seq) -> bool:
        return len(ngram_propose(seq.tokens(), 1, min_n=self.MIN_N)) > 0

    def ready(self, seq: Seq) -> bool:
        return True

    def guesses(self, rows: list[tuple[Seq, int]]) -> list[np.ndarray]:
        return [ngram_propose(seq.tokens(), most, min_n=self.MIN_N) for seq, most in rows]

    def accepted(self, seq: Seq, emitted: int) -> None:
        pass

    def observe(self, seq: Seq, pos: int, features, tokens) -> None:
        pass

    def free(self, slot: int) -> None:
        pass


class DraftProposer:
    """A draft model's guesses: it writes K/V at its inputs' positions, so a row's pages are
    reserved for all its guesses before it guesses."""

    writes_cache = True
    costly = True

    def __init__(self, draft: DraftEngine, scheduler: Scheduler):
        self.draft, self.scheduler = draft, scheduler
        slots = len(scheduler.slots)
        self.owner: list[Seq | None] = [None] * slots  # whose draft K/V the slot's pages hold
        self.valid = np.zeros((slots,), np.int64)  # positions 0 .. valid - 1 of it
        self._last: dict[int, tuple[int, int]] = {}  # slot -> (its input's position, guesses made)
        self._greedy = SamplingState.of(SamplingParams(temperature=0.0), 0)
        self._presence = np.zeros((draft.cfg.vocab_size,), bool)

    def guesses(self, rows: list[tuple[Seq, int]]) -> list[np.ndarray]:
        """rows: (sequence, most guesses ≥ 1), its pages holding positions up to length + most."""
        s = self.scheduler
        slots = len(s.slots)
        window, start = np.zeros((slots, WINDOW), np.int32), np.zeros((slots,), np.int32)
        n_valid, most = np.zeros((slots,), np.int32), np.zeros((slots,), np.int32)
        chunk = self.draft.ecfg.prefill_buckets[-1]
        for seq, m in rows:
            slot, tokens = seq.slot, seq.tokens()
            pos = len(tokens) - 1  # of the next input, the last token
            have = min(int(self.valid[slot]) if self.owner[slot] is seq else 0, pos)
            for at in range(have, pos + 1 - WINDOW, chunk):  # catch up, leaving at most WINDOW
                part = tokens[at : min(at + chunk, pos + 1 - WINDOW)]
                self.draft.prefill(part, at, s.page_table[slot], self._greedy, self._presence)
                have = at + len(part)
            window[slot, : pos + 1 - have] = tokens[have:]
            start[slot], n_valid[slot], most[slot] = have, pos + 1 - have, m
            # the input's K/V is the real token's whatever the target keeps
            self.owner[slot], self.valid[slot], self._last[slot] = seq, pos + 1, (pos, m)
        kv = max(len(seq.tokens()) - 1 + m for seq, m in rows)  # the last position written + 1
        busy = 1 + max(seq.slot for seq, _ in rows)
        out = self.draft.propose(s.page_table, kv, window, start, n_valid, most, busy)
        return [out[seq.slot, :m] for seq, m in rows]

    def accepted(self, seq: Seq, emitted: int) -> None:
        """A verify step emitted `emitted` tokens for `seq` (kept guesses + 1): the draft's inputs
        up to the last kept guess were the sequence's tokens."""
        pos, made = self._last.pop(seq.slot)
        self.valid[seq.slot] = pos + min(emitted, made)

    def observe(self, seq: Seq, pos: int, features, tokens) -> None:
        pass

    def ready(self, seq: Seq) -> bool:
        return True

    may_find = ready

    def free(self, slot: int) -> None:
        """The slot's sequence left it (finished or preempted): its draft K/V is no one's."""
        self.owner[slot], self.valid[slot] = None, 0
        self._last.pop(slot, None)


class EagleProposer:
    """A draft head's guesses from the target's features; it writes no cache, so, as for n-gram,
    pages are reserved for the guesses made only."""

    writes_cache = False
    costly = True

    def __init__(self, head: Head, engine: Engine, slots: int):
        from xlaserve.runtime import draft_head

        cfg, w = engine.cfg, head.window
        self.head, self.engine, self.k = head, engine, engine.ecfg.speculative_k[-1]
        draft_head.check_k(self.k)
        self._propose = draft_head.propose
        # Per slot, its sequence's last `count` pairs right-aligned in the window (entries W - count
        # .. W - 1, oldest first; the head pads the rest): the state at position q [D] and the
        # token at q + 1; the newest token is at position `end`. Used only while `end` is the
        # position of the sequence's last token (a gap, e.g. a grammar step, starts it over).
        self.feats = np.zeros((slots, w, cfg.hidden_size), np.float32)
        self.tokens = np.zeros((slots, w), np.int32)
        self.count = np.zeros((slots,), np.int32)
        self.end = np.full((slots,), -1, np.int64)
        self.owner: list[Seq | None] = [None] * slots
        for rows in engine.ecfg.slot_buckets:  # compiled now: no request triggers a compile
            self.propose_all(np.zeros((rows,), np.int32))

    def propose_all(self, position: np.ndarray) -> np.ndarray:
        """position [R] (R a slot bucket): the first R slots' newest tokens' positions -> int32
        [R, K], their guesses (garbage for those with no pairs). One compiled shape per bucket: the
        call costs about a decode step of R rows (K steps of one layer plus the target's lm_head)."""
        r, w = len(position), self.tokens.shape[1]
        pad = (w - self.count[:r]).astype(np.int32)
        out = self._propose(
            self.head.params,
            self.engine.weights,
            self.feats[:r],
            self.tokens[:r],
            position,
            pad,
            cfg=self.engine.cfg,
            k=self.k,
        )
        return np.asarray(out)

    def ready(self, seq: Seq) -> bool:
        """Whether the slot holds pairs of `seq` ending at its last token (else it guesses nothing
        this step, and the step does not count against its acceptance: a sequence new to its slot
        always starts so, and counted, that one-token step would keep it from ever guessing)."""
        tokens = seq.tokens()
        slot = seq.slot
        fresh = self.owner[slot] is seq and self.end[slot] == len(tokens) - 1
        return fresh and self.count[slot] > 0 and self.tokens[slot, -1] == tokens[-1]

    may_find = ready  # (on the tokens read: the window then ends at the last of them)

    def guesses(self, rows: list[tuple[Seq, int]]) -> list[np.ndarray]:
        """rows: (sequence, most guesses ≥ 1), each `ready`."""
        busy = 1 + max(seq.slot for seq, _ in rows)
        position = np.zeros((self.engine.slot_bucket(busy),), np.int32)  # of each newest token
        for seq, _ in rows:
            position[seq.slot] = len(seq.tokens()) - 1
        out = self.propose_all(position)
        return [out[seq.slot, :m] for seq, m in rows]

    def accepted(self, seq: Seq, emitted: int) -> None:
        pass

    def observe(self, seq: Seq, pos: int, features: np.ndarray, tokens: np.ndarray) -> None:
        """A step the runner read for `seq`: features [n, D] at positions pos .. pos + n - 1 and the
        token [n] emitted after each (its accepted positions only)."""
        slot, n, w = seq.slot, len(tokens), self.tokens.shape[1]
        if n == 0:
            return
        if self.owner[slot] is not seq or self.end[slot] != pos:  # not contiguous: start over
            self.owner[slot], self.count[slot] = seq, 0
        old = int(self.count[slot])
        feats = np.concatenate([self.feats[slot, w - old :], features])[-w:]
        toks = np.concatenate([self.tokens[slot, w - old :], tokens])[-w:]
        m = len(toks)
        self.feats[slot, w - m :], self.tokens[slot, w - m :] = feats, toks
        self.count[slot], self.end[slot] = m, pos + n

    def free(self, slot: int) -> None:
        self.owner[slot], self.count[slot], self.end[slot] = None, 0, -1


class Speculation:
    def __init__(
        self,
        engine: Engine,
        scheduler: Scheduler,
        emit,
        draft: DraftEngine | Head | None = None,
    ):
        """emit(seq, Sampled, index) -> Delta: the runner's. draft: guess with this draft model, or
        this draft head (the engine built with `features`); None: n-gram lookup."""
        e = engine.ecfg
        self.engine, self.scheduler, self._emit = engine, scheduler, emit
        self.on = bool(e.speculative_k)  # (needs the verify programs)
        if draft is None:
            self.proposer = NgramProposer()
        elif isinstance(draft, DraftEngine):
            self.proposer = DraftProposer(draft, scheduler)
        else:
            self.proposer = EagleProposer(draft, engine, len(scheduler.slots))
        self.guesses = [0, 0]  # speculative guesses made, and kept
        # [n]: verify steps in which a guessing sequence emitted n tokens (n ≤ K + 1); [] without
        self.emitted = [0] * (e.speculative_k[-1] + 2 if e.speculative_k else 0)
        # the sequences that made this step read the tokens in flight (`may_find`, asked by `k`):
        # only theirs is a miss when their lookup then finds nothing (the others cost nothing)
        self._armed: set[Seq] = set()

    def k(self, seqs: list[Seq]) -> tuple[int, float]:
        """(the most guesses a sequence makes this step, the break-even tokens a step) from the
        schedule for the batch size; K is 0 when not speculating or when no sequence both may guess
        and `may_find` guesses (then the batch stays pipelined)."""
        if not self.on:
            return 0, 1.0
        k, break_even = schedule_k(self.engine.ecfg.speculative_schedule, len(seqs))
        self._armed = (
            {seq for seq in seqs if self.may_guess(seq.req) and self.proposer.may_find(seq)} if k else set()
        )
        return (k, break_even) if self._armed else (0, 1.0)

    @staticmethod
    def may_guess(req: Request) -> bool:
        """Not opted out, not switched off for poor acceptance (spec_policy.py)."""
        counts = req.speculative
        return req.params.speculative and counts is not None and counts.guessing(len(req.output_ids))

    def propose(self, seqs: list[Seq], k: int, break_even: float) -> tuple[np.ndarray, np.ndarray]:
        """The running `seqs`' guesses (their slots' tokens all read; at most k each), on pages they
        now hold: (int32 [max_slots, k], counts [max_slots]; all 0 when a verify step would not pay).
        A sequence that may guess and does not get its guesses checked records a one-token step, unless
        its proposer is not `ready` for it (a draft head's empty window)."""
        s, ecfg, proposer = self.scheduler, self.engine.ecfg, self.proposer
        proposed = np.zeros((len(s.slots), k), np.int32)
        n = np.zeros((len(s.slots),), np.int32)
        rows = []
        for seq in seqs:
            if seq.req.finished or not self.may_guess(seq.req):  # a finished one runs once more, unread
                continue
            if not proposer.ready(seq):  # nothing to go on yet (a head's empty window): not counted
                continue
            req, length = seq.req, len(seq.tokens())
            # no guess past max_tokens or max_model_len: the last emitted token is the model's own
            left = min(req.params.max_tokens - len(req.output_ids), ecfg.max_model_len - length)
            most = min(k, left - 1)
            if most > 0 and proposer.writes_cache:  # positions up to length + guesses
                most = min(most, s.reserve(seq, length + most) - length)
            if most > 0:
                rows.append((seq, most))
        # A verify step costs the whole batch `break_even` decode steps: run it only when the rows'
        # expected tokens (a guessing row's mean over its recent verify steps, 1 for the others) make
        # up for that. When not, the guessing rows count a one-token step, so a batch that does not
        # pay stops trying.
        # A draft model or head guesses for every row it runs for, and its call costs about a decode
        # step: whether that pays is known before it runs.
        live = [seq for seq in seqs if not seq.req.finished]
        if proposer.costly and rows and not _pays(live, {seq for seq, _ in rows}, k, break_even):
            _one_token_steps([seq for seq, _ in rows], break_even)
            return proposed, n
        found = proposer.guesses(rows) if rows else []
        for (seq, _), guesses in zip(rows, found, strict=True):
            length = len(seq.tokens())
            held = s.reserve(seq, length + len(guesses))
            guesses = guesses[: max(0, held - length)]
            proposed[seq.slot, : len(guesses)], n[seq.slot] = guesses, len(guesses)
            if not len(guesses) and seq in self._armed:  # it was expected to find some
                _one_token_steps([seq], break_even)
        guessing = {seq for seq in live if n[seq.slot]}
        if guessing and not _pays(live, guessing, k, break_even):
            _one_token_steps(guessing, break_even)
            n[:] = 0
        return proposed, n

    def verify(self, seqs: list[Seq], proposed: np.ndarray, n: np.ndarray, break_even: float) -> list[Delta]:
        """One speculative step for the running `seqs`, read at once (the next guesses need it)."""
        s = self.scheduler
        live = [seq for seq in seqs if not seq.req.finished]
        kv = max(seq.length + 1 + n[seq.slot] for seq in seqs)
        result = self.engine.verify(s.page_table, kv, proposed, n, 1 + max(seq.slot for seq in seqs))
        deltas = []
        for seq in live:
            guessed, emitted = int(n[seq.slot]), int(result.emitted[seq.slot])
            if guessed:
                self.proposer.accepted(seq, emitted)
            if result.features is not None:  # positions pos .. pos + emitted - 1 were accepted
                pos, row = len(seq.tokens()) - 1, seq.slot
                tokens = result.sampled.tokens[row, :emitted]
                self.proposer.observe(seq, pos, result.features[row, :emitted], tokens)
            for i in range(emitted):
                deltas.append(self._emit(seq, result.sampled, (seq.slot, i)))
                if seq.req.finished:
                    break
            s.decoded(seq)
            if guessed:  # the request's counts and the runner's always move together
                self.guesses[0] += guessed
                self.guesses[1] += emitted - 1
                self.emitted[emitted] += 1
                seq.req.speculative.record(guessed, emitted, len(seq.req.output_ids), break_even)
        return deltas

    def free(self, slot: int) -> None:
        self.proposer.free(slot)


def _pays(live: list[Seq], guessing: set[Seq], k: int, break_even: float) -> bool:
    expected = sum(seq.req.speculative.expected(k) if seq in guessing else 1.0 for seq in live)
    return expected >= break_even * len(live)


def _one_token_steps(seqs, break_even: float) -> None:
    """Steps in which `seqs` may guess and emit one token (no guess of theirs is checked)."""
    for seq in seqs:
        seq.req.speculative.record(0, 1, len(seq.req.output_ids), break_even)
