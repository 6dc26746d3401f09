"""Carries out the scheduler's plans on the engine and turns sampled tokens into request output.

One `step()`: free preempted slots, run the planned prompt chunks, dispatch one decode for the
running slots, then insert the sequences whose prompt just finished (after the dispatch, so a slot
never decodes before the scheduler has given it pages). Used by `LLM` directly and by the server's
engine thread.
"""

from __future__ import annotations

import numpy as np
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.programs import Sampled
from xlaserve.runtime.request import Delta, Request, TokenLogprob
from xlaserve.runtime.sampling import SamplingState
from xlaserve.runtime.scheduler import Scheduler, Seq


class Runner:
    def __init__(self, engine: Engine, tokenizer):
        e = engine.ecfg
        self.engine, self.tokenizer = engine, tokenizer
        self.scheduler = Scheduler(
            max_slots=e.max_slots,
            page_size=e.page_size,
            pages_per_seq=e.pages_per_seq,
            num_pages=e.total_pages,
            max_model_len=e.max_model_len,
            decode_steps=e.decode_steps,
            chunk=e.prefill_buckets[-1],
        )
        self._rows: dict[Seq, SamplingState] = {}
        self.seqs: dict[str, Seq] = {}

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    def submit(self, req: Request) -> None:
        if req.request_id in self.seqs:
            raise ValueError(f"request_id {req.request_id!r} is already running")
        seq = self.scheduler.add(req)
        self._rows[seq] = SamplingState.of(req.params, req.seed)
        self.seqs[req.request_id] = seq

    def cancel(self, request_id: str, reason) -> Request | None:
        """End a request now (cancelled or past its deadline); its slot and pages are released."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        seq.req.finish(reason)
        self._retire(seq)
        return seq.req

    def step(self) -> list[Delta]:
        plan = self.scheduler.plan()
        for slot in plan.freed_slots:
            self.engine.free(slot)
        deltas, ready = [], []
        for chunk in plan.prefills:
            seq = chunk.seq
            presence = self._presence(seq)
            packed = self.engine.prefill(
                chunk.tokens, chunk.start, self.scheduler.page_table[seq.slot], self._rows[seq], presence
            )
            self.scheduler.prefilled(chunk)
            if chunk.last:
                deltas.append(self._emit(seq, Sampled.unpack(np.asarray(packed)), (0,)))
                if not seq.req.finished:
                    ready.append((seq, packed))
        if plan.decode:
            busy = 1 + max(seq.slot for seq in plan.decode)
            packed = self.engine.generate(self.scheduler.page_table, plan.kv_tokens, busy)
            result = Sampled.unpack(np.asarray(packed))  # [k, S]
            for seq in plan.decode:
                for i in range(result.tokens.shape[0]):
                    deltas.append(self._emit(seq, result, (i, seq.slot)))
                    if seq.req.finished:
                        break
        for seq, packed in ready:
            self.engine.insert(seq.slot, packed, seq.length, self._rows[seq], self._presence(seq))
        for d in deltas:
            if d.request.finished and d.request.request_id in self.seqs:
                self._retire(self.seqs[d.request.request_id])
        return [d for d in deltas if d.token_ids or d.text or d.request.finished]

    def _presence(self, seq: Seq) -> np.ndarray:
        """The tokens so far, as a [V] mask (what the repetition penalty applies to)."""
        mask = np.zeros((self.engine.cfg.vocab_size,), bool)
        mask[seq.tokens()] = True
        return mask

    def _emit(self, seq: Seq, result: Sampled, index) -> Delta:
        req = seq.req
        token = int(result.tokens[index])
        logprob = None
        if req.params.logprobs is not None:
            n = req.params.logprobs
            top = tuple(
                (int(t), float(lp))
                for t, lp in zip(result.top_ids[index][:n], result.top_logprobs[index][:n], strict=True)
            )
            logprob = TokenLogprob(token, float(result.logprobs[index]), top)
        ids, text = req.append(token, logprob, self.tokenizer, self.engine.ecfg.max_model_len)
        return Delta(req, ids, text, [logprob] if logprob is not None and ids else [])

    def _retire(self, seq: Seq) -> None:
        if seq.slot is not None:
            self.engine.free(seq.slot)
        self.scheduler.finish(seq)
        self._rows.pop(seq, None)
        self.seqs.pop(seq.req.request_id, None)
