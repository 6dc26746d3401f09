"""Carries out the scheduler's plans on the engine and turns sampled tokens into request output.

One `step()`:
  1. end requests past their deadline; plan; free preempted slots on device;
  2. dispatch the planned page copies (a prefix shared within a page), the prompt chunks (several
     prompts' chunks to a prefill call: prefills.py), then one decode dispatch for the running
     slots, then insert the sequences whose prompt just finished (after the dispatch, so a slot
     never decodes before the scheduler gave it pages);
  3. only then read the *previous* decode dispatch's tokens (already on the host: its copy was
     started when it was dispatched) and the first tokens of the prompts just finished, and do the
     host bookkeeping (detokenize, stop checks, publish pages) while the device runs step 2;
  4. wait until the device has run this step's prompt chunks.
A sequence that finishes is therefore decoded once more in the dispatch already queued; those
tokens are dropped. Nothing here blocks on the device except reading results and step 4.

Step 4 is what makes the token budget a bound in time. Dispatch is asynchronous: without it, a step
whose chunks are not a prompt's last, with no decode to read, returns at once, so the next steps
queue the rest of a long prompt on the device within milliseconds, and the step that reads its
last chunk then waits for all of them (a 4000-token prompt: ~20 s on CPU in one step, running
streams stalled, and a cancel or deadline, which can only act between steps, too late to save any
of it). With it, a step is at most its budget of prompt tokens plus one decode, and a cancelled or
expired prompt stops at the next step, its pages released and the rest never dispatched.

Structured output (runtime/grammar.py): a request with a grammar carries a matcher that takes each
of its output tokens once, as it is read, so it always holds exactly the request's output so far (a
preempted request keeps it: recomputing replays no token through it, and tokens dropped from a
dispatch are never offered). Its first token comes from the masked prefill, the others from masked
one-step decode dispatches. A decode batch holding a grammar sequence needs the tokens of the
dispatch in flight before it is dispatched (its masks depend on them): their matchers take them
first, the rest of the reading (text, stops) still overlaps the device, and the device idles from
the end of one dispatch until the next is queued. With decode_steps k > 1 such a batch advances one
token per dispatch. A grammar that is complete (only EOS may follow) ends the request with finish
reason "stop".

Mixed steps (an engine with `mixed_batch`): when the scheduler puts the running sequences' next
tokens in the step's first prefill call (`Plan.mixed`), the decode in flight is read before
dispatching (they continue from its tokens), each goes as a one-token chunk and is inserted back in
its slot as a prompt's last chunk is, and the step dispatches no decode: the device runs one call
where it ran two, at the cost of this step's host work overlapping nothing.

Speculative decoding (an engine with `speculative_k`): in a decode batch without grammar sequences,
sequences guess up to K tokens (by n-gram lookup, or with a draft model) and one verify call
checks them instead of a decode dispatch, read before the step returns; runtime/spec_runner.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from xlaserve.runtime import models
from xlaserve.runtime.admission import Limits
from xlaserve.runtime.budget import PrefillBudget
from xlaserve.runtime.engine import SCORE_TOKENS, Engine, to_host
from xlaserve.runtime.grammar import Grammars
from xlaserve.runtime.prefill_calls import Packed
from xlaserve.runtime.prefills import Prefills
from xlaserve.runtime.request import Delta, FinishReason, Request, TokenLogprob
from xlaserve.runtime.results import Sampled
from xlaserve.runtime.sampling import SamplingState
from xlaserve.runtime.scheduler import Scheduler
from xlaserve.runtime.sequence import Chunk, Seq, State
from xlaserve.runtime.spec_policy import SpecCounts
from xlaserve.runtime.spec_runner import Speculation
from xlaserve.runtime.stats import EngineStats

log = logging.getLogger("xlaserve")


class Runner:
    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        token_budget=None,
        grammars: Grammars | None = None,
        draft=None,
    ):
        """token_budget: prompt tokens per step, an int or a budget.PrefillBudget (None: the engine
        config's prefill_token_budget, else the largest bucket; LLM passes the one it measured). A
        measured budget bounds a step's stall while a streamed request holds a slot; otherwise a
        step may prefill a whole context. grammars: compiles requests'
        grammars (None: one of its own for this tokenizer). draft: speculate with this draft model
        (on an engine with speculative_k), or this draft_head.Head (on an engine built with
        `features`); None: by n-gram lookup."""
        e = engine.ecfg
        measured = token_budget if isinstance(token_budget, PrefillBudget) and token_budget.measured else None
        token_budget = token_budget.tokens if isinstance(token_budget, PrefillBudget) else token_budget
        if e.mixed_batch and not isinstance(engine.prefill_calls, Packed):
            raise ValueError(
                "mixed_batch=True needs packed prefill calls (CPU, native attention, float32 cache, "
                "one device); this engine prefills padded rows"
            )
        self.engine, self.tokenizer = engine, tokenizer
        self.grammars = grammars or Grammars(tokenizer, engine.cfg.vocab_size, engine.cfg.eos_token_ids)
        limits = Limits(
            max_prompt_tokens=min(e.max_prompt_tokens or e.max_model_len - 1, e.max_model_len - 1),
            max_new_tokens=min(e.max_new_tokens or e.max_model_len - 1, e.max_model_len - 1),
            max_model_len=e.max_model_len,
            max_queue=e.max_queue,
            max_per_client=e.max_per_client,
        )
        self.scheduler = Scheduler(
            max_slots=e.max_slots,
            page_size=e.page_size,
            pages_per_seq=e.pages_per_seq,
            num_pages=e.total_pages,
            decode_steps=e.decode_steps,
            chunk=e.prefill_buckets[-1],
            limits=limits,
            token_budget=token_budget or e.prefill_token_budget,
            prefix_cache=e.prefix_cache,
            window=_window(engine.cfg),
            # a step with only scoring to do fills a scoring call (one at the smallest bucket)
            score_budget=max(token_budget or e.prefill_token_budget or 0, SCORE_TOKENS),
            score_calls=engine.score_calls,
            calls=engine.prefill_calls,
            budget_at=measured and measured.at,
            batch_budget=measured and measured.batch,
            mix=e.mixed_batch,
        )
        self.prefills = Prefills(engine, self.scheduler)
        self._rows: dict[Seq, SamplingState] = {}
        self.seqs: dict[str, Seq] = {}
        # (packed results on device, [(seq, slot)], features on device or None) of the last decode
        # dispatch; features: the states a draft head reads [steps, rows, D] (an engine with them)
        self._inflight = None
        self.finished = {reason.value: 0 for reason in FinishReason}
        self.prompt_tokens_computed = 0
        self.mixed_steps = 0
        self.spec = Speculation(engine, self.scheduler, self._emit, draft)

    @property
    def busy(self) -> bool:
        return self.scheduler.busy or self._inflight is not None

    def submit(self, req: Request) -> None:
        """Queue a request; raises RequestTooLarge or Overloaded (nothing queued) when refused."""
        if req.request_id in self.seqs:
            raise ValueError(f"request_id {req.request_id!r} is already running")
        if req.params.constrained and req.grammar is None:
            req.grammar = self.grammars.compile(req.params)  # built without LLM.make_request
        seq = self.scheduler.add(req)
        req.speculative = SpecCounts() if self.spec.on else None
        self._rows[seq] = SamplingState.of(req.params, req.seed)
        self.seqs[req.request_id] = seq

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> Request | None:
        """End a request now; its slot and pages are released before the next step."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        seq.req.finish(reason)
        self._retire(seq)
        return seq.req

    def stats(self) -> EngineStats:
        """A snapshot of the counters. MoE routing counts come back from the device after their
        step: while busy, the ones still on their way are left for a later snapshot; idle, it waits
        for them (the last step's would otherwise wait for the next request)."""
        routed = self.engine.routed_tokens(wait=not self.busy)  # [L, E]; [L, 0] for a dense model
        return dataclasses.replace(
            self.scheduler.stats(),
            requests_running=len(self.seqs) - len(self.scheduler.waiting),
            requests_finished=dict(self.finished),
            prefill_tokens_computed=self.prompt_tokens_computed,
            mixed_steps=self.mixed_steps,
            moe_routed=tuple(tuple(row) for row in routed.tolist()) if routed.size else (),
            speculative_proposed=self.spec.guesses[0],
            speculative_accepted=self.spec.guesses[1],
            speculative_emitted=tuple(self.spec.emitted),
        )

    def step(self) -> list[Delta]:
        deltas = []
        for seq in self.scheduler.expired(time.perf_counter()):
            seq.req.finish(FinishReason.DEADLINE)
            deltas.append(Delta(seq.req, [], "", [], finished=True))
            self._retire(seq)
        plan = self.scheduler.plan()
        for slot in plan.freed_slots:
            self.engine.free(slot)
            self.spec.free(slot)
        if plan.copies:  # before any chunk: they write the copies' destinations past what is copied
            self.engine.copy_pages(plan.copies)
        self.prompt_tokens_computed += sum(len(chunk.tokens) for chunk in plan.prefills)
        mixed = self._mixed(plan.mixed, deltas)
        scored, ready, last_chunk = self.prefills.dispatch(mixed + plan.prefills, self._rows, self._presence)
        deltas += scored
        previous, self._inflight = self._inflight, None
        grammar = any(seq.req.grammar is not None for seq in plan.decode)
        guesses, (k, break_even) = None, self.spec.k(plan.decode) if plan.decode and not grammar else (0, 1.0)
        if k:
            if previous is not None:  # the guesses continue from the tokens in flight
                deltas += self._read_decode(*previous)
                previous = None
            guesses = self.spec.propose(plan.decode, k, break_even)
        if guesses is not None and guesses[1].any():
            deltas += self.spec.verify(plan.decode, *guesses, break_even)
        elif plan.decode:  # (without a guess to check, a decode dispatch: cheaper than verify)
            masks = ()
            if grammar:
                if previous is not None:  # the masks need the tokens in flight
                    self._offer_inflight(*previous)
                masks = (self._masks(plan.decode),)
            busy = 1 + max(seq.slot for seq in plan.decode)
            packed = self.engine.decode(self.scheduler.page_table, plan.kv_tokens, busy, *masks)
            packed, feats = packed if isinstance(packed, tuple) else (packed, None)
            packed.copy_to_host_async()
            if feats is not None:
                feats.copy_to_host_async()
            self.scheduler.dispatched(plan.decode)
            self._inflight = (packed, [(seq, seq.slot) for seq in plan.decode], feats)
        for seq, packed, row in ready:
            self.engine.insert(seq.slot, packed, len(seq.tokens()), self._rows[seq], self._presence(seq), row)
        # Host work from here on overlaps the device running the dispatches above.
        if previous is not None:
            deltas += self._read_decode(*previous)
        results = {}  # a call's packed result, read once for all its rows
        for seq, packed, row in ready:
            if id(packed) not in results:
                results[id(packed)] = Sampled.unpack(to_host(packed))
            deltas.append(self._emit(seq, results[id(packed)], (row,)))
            if seq in plan.mixed:
                self.scheduler.decoded(seq)
        if last_chunk is not None:
            to_host(last_chunk)  # 4: the device ran this step's chunks (they run in dispatch order)
        for d in deltas:
            seq = self.seqs.get(d.request.request_id)
            if d.finished and seq is not None:
                self._retire(seq)
        return [d for d in deltas if d.token_ids or d.text or d.finished]

    def _mixed(self, seqs: list[Seq], deltas: list[Delta]) -> list[Chunk]:
        """A mixed step's decode rows: each of `seqs` (running) as a one-token chunk, its last token
        at its position, which the prefill call samples from and `insert` puts back in its slot as
        a prompt's last chunk does. They need the tokens in flight: that dispatch is read first (into
        `deltas`), so this step's host work does not overlap the device; a sequence it ended is left
        out."""
        if seqs and self._inflight is not None:
            deltas += self._read_decode(*self._inflight)
            self._inflight = None
        chunks = [Chunk(seq, seq.length, seq.tokens()[-1:]) for seq in seqs if not seq.req.finished]
        self.mixed_steps += bool(chunks)
        return chunks

    @staticmethod
    def _live(seq: Seq, slot: int) -> bool:
        """Whether a dispatch's tokens for (seq, slot) still count. Not when preempted or ended since:
        then its tokens are dropped (inflight was reset, also when it is back in the same slot,
        recomputed, by now: a preemption between steps, whose stale tokens would otherwise follow
        the recomputed first token)."""
        return seq.state is State.RUNNING and seq.slot == slot and seq.inflight > 0

    def _offer_inflight(self, packed, members, feats=None) -> None:
        """Before a masked dispatch: the grammar sequences' matchers take their tokens of the
        dispatch in flight (a masked one: one step), which the masks need; the rest of reading it
        (`_read_decode`) waits until the next dispatch is queued, overlapping the device."""
        tokens = Sampled.unpack(to_host(packed)).tokens
        for seq, slot in members:
            if seq.req.grammar is not None and self._live(seq, slot):
                self._offer(seq.req, int(tokens[0, slot]))

    def _offer(self, req: Request, token: int) -> None:
        """Offer output token number len(req.output_ids) to the request's matcher, once."""
        grammar = req.grammar
        if grammar is None or req.finished or grammar.offered > len(req.output_ids):
            return
        grammar.offered += 1
        if token in req.eos_ids and not req.params.ignore_eos:
            return  # it ends the request
        if not grammar.advance(token):
            log.warning("%s: token %d breaks its grammar: %.300s", req.request_id, token, grammar.error)

    def _read_decode(self, packed, members, feats=None) -> list[Delta]:
        result = Sampled.unpack(to_host(packed))  # [k, rows]
        feats = None if feats is None else to_host(feats)  # [k, rows, D]
        deltas = []
        for seq, slot in members:
            if not self._live(seq, slot):
                continue
            pos = len(seq.tokens()) - 1  # of the dispatch's first input
            for i in range(result.tokens.shape[0]):
                deltas.append(self._emit(seq, result, (i, slot)))
                if seq.req.finished:
                    break
            if feats is not None:  # step i: the state at pos + i, the token at pos + i + 1
                n = i + 1
                self.spec.proposer.observe(seq, pos, feats[:n, slot], result.tokens[:n, slot])
            self.scheduler.decoded(seq)
        return deltas

    def _presence(self, seq: Seq) -> np.ndarray:
        """The tokens so far, as a [V] mask (what the repetition penalty applies to)."""
        mask = np.zeros((self.engine.cfg.vocab_size,), bool)
        mask[seq.tokens()] = True
        return mask

    def _masks(self, seqs: list[Seq]) -> np.ndarray:
        """The grammar bitmasks of `seqs` in their slots' rows, all ones in every other row:
        int32 [max_slots, mask words]."""
        allowed = np.full((len(self.scheduler.slots), self.grammars.words), -1, np.int32)
        rows = [(s.req.grammar, s.slot) for s in seqs if s.req.grammar is not None and not s.req.finished]
        if rows:
            self.grammars.fill(rows, allowed)
        return allowed

    def _emit(self, seq: Seq, result: Sampled, index) -> Delta:
        req = seq.req
        token = int(result.tokens[index])
        logprob = None
        if req.params.logprobs is not None:
            n = req.params.logprobs
            top = tuple(
                (int(t), float(lp))
                for t, lp in zip(result.top_ids[index][:n], result.top_logprobs[index][:n], strict=True)
                if req.grammar is None or lp > -np.inf  # a grammar may allow fewer than n tokens
            )
            logprob = TokenLogprob(token, float(result.logprobs[index]), top)
        self._offer(req, token)
        complete = req.grammar is not None and req.grammar.done
        ids, text = req.append(token, logprob, self.tokenizer, self.engine.ecfg.max_model_len, complete)
        return Delta(req, ids, text, [logprob] if logprob is not None and ids else [], finished=req.finished)

    def _retire(self, seq: Seq) -> None:
        if seq.slot is not None:
            self.spec.free(seq.slot)
        if seq.slot is not None and seq.state in (State.PREFILL, State.RUNNING):
            self.engine.free(seq.slot)
        self.scheduler.finish(seq)
        self._rows.pop(seq, None)
        seq.req.grammar = None  # the matcher's memory goes with it
        if self.seqs.pop(seq.req.request_id, None) is not None and seq.req.finish_reason is not None:
            self.finished[seq.req.finish_reason.value] += 1


def _window(cfg) -> int | None:
    """The window pages may slide out of: the largest, when every layer has one (Mistral, Phi-3).
    With global layers among them (Gemma) every page stays: the global layers read it."""
    windows = models.kv_spec(cfg).windows
    return None if None in windows else max(windows)
