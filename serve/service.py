"""`xlaserve.v1.Generation` on the asyncio server: validate, admit, stream, map every failure to a status.

Each RPC is a coroutine on the server's event loop; nothing here may block it. CPU work (tokenizing
a prompt, building a request, detokenizing) runs on a small thread pool (`worker_threads`); the
engine is reached only through the engine loop's inbox and its streams, which it feeds to this
event loop; stats are its published snapshot. So health, stats and model info answer at once
however many streams are open, and a stream waits in admission control (--max-queue), never for a
thread.

Status codes: INVALID_ARGUMENT (a field, or a prompt over a limit: the message names them),
RESOURCE_EXHAUSTED (queue full, per-client limit), UNAVAILABLE (loading, draining, and a stream
cut at shutdown), DEADLINE_EXCEEDED, CANCELLED (the client's own), NOT_FOUND (another model),
UNAUTHENTICATED (guards.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from xlaserve import __version__
from xlaserve.runtime.admission import Overloaded, Rejected, RequestTooLarge
from xlaserve.runtime.engine_loop import Draining, EngineFailed, EngineLoop, merge
from xlaserve.runtime.request import FinishReason
from xlaserve.runtime.sampling_params import MAX_SEED
from xlaserve.runtime.stats import EngineStats
from xlaserve.serve import messages
from xlaserve.serve.auth import client_identity
from xlaserve.serve.limits import MAX_SCORE_ITEMS, WORKER_THREADS, most_choices
from xlaserve.serve.metrics import Metrics
from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2 as pb
from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2_grpc as pb_grpc

Code = grpc.StatusCode
REFUSED = (ValueError, Rejected, EngineFailed)
CUT = (FinishReason.DEADLINE, FinishReason.CANCELLED)  # ended by the server, not the client


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(
        self,
        metrics: Metrics,
        model_names: tuple[str, ...] = (),
        mesh: str = "1 device",
        *,
        keys_on: bool = False,
        max_score_items: int = MAX_SCORE_ITEMS,
        worker_threads: int = WORKER_THREADS,
    ):
        self.metrics, self.model_names, self.mesh = metrics, model_names, mesh
        self.keys_on, self.max_score_items = keys_on, max_score_items
        self.pool = ThreadPoolExecutor(worker_threads, thread_name_prefix="xlaserve-work")
        self.llm = self.loop = None
        self.started = time.monotonic()

    def attach(self, llm, loop: EngineLoop) -> None:
        self.llm, self.loop = llm, loop

    def stats(self) -> EngineStats:
        """The engine loop's stats; all zeros while the model loads."""
        return EngineStats() if self.loop is None else self.loop.stats()

    # -- helpers -----------------------------------------------------------------------------------

    async def _check(self, context, model: str = "") -> None:
        if self.loop is None:
            await context.abort(
                Code.UNAVAILABLE, "the model is still loading; health reports SERVING when ready"
            )
        if model and model not in self.model_names:
            self.metrics.rejected("not_found")
            served = ", ".join(dict.fromkeys(self.model_names))
            await context.abort(Code.NOT_FOUND, f"model {model!r} is not served here (serving: {served})")

    async def _reject(self, context, e: Exception, ids: tuple[str, str] | None = None):
        if isinstance(e, RequestTooLarge | ValueError):
            code, outcome = Code.INVALID_ARGUMENT, "invalid_argument"
        elif isinstance(e, Draining):
            code, outcome = Code.UNAVAILABLE, "unavailable"
        elif isinstance(e, Overloaded):
            code, outcome = Code.RESOURCE_EXHAUSTED, "resource_exhausted"
        else:
            code, outcome = Code.INTERNAL, "internal"
        self.metrics.rejected(outcome, getattr(e, "limit", None))
        message = str(e)
        if ids is not None:  # name the client's own id, never the engine's scoped one
            message = message.replace(repr(ids[0]), repr(ids[1]))
        await context.abort(code, message)

    def _client(self, context) -> str | None:
        return client_identity(context.invocation_metadata(), self.keys_on)

    def _scope(self, context) -> str:
        """The namespace of a client's request ids: its key, else its claimed id on its connection
        (unverified claims cannot reach into another connection's ids)."""
        client = self._client(context)
        return client if self.keys_on and client else f"{client or ''}@{context.peer()}"

    async def _work(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    @staticmethod
    def _timeout(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None or remaining > 1e8 else max(remaining - 0.01, 0.0)

    @staticmethod
    def _end_reason(req) -> FinishReason:
        """The RPC is over before its request ended: the client cancelled, or its deadline passed
        (the engine deadline is set just before the client's, so past it means the deadline)."""
        expired = req.deadline is not None and time.perf_counter() >= req.deadline
        return FinishReason.DEADLINE if expired else FinishReason.CANCELLED

    # -- RPCs --------------------------------------------------------------------------------------

    async def Generate(self, request, context):
        await self._check(context, request.model)
        ids, streams = None, []
        try:
            ids = messages.request_ids(request.request_id, self._scope(context))
            requests = await self._work(
                self._make_requests, request, ids[0], self._client(context), self._timeout(context)
            )
            aio = asyncio.get_running_loop()
            for r in requests:
                streams.append(self.loop.submit_nowait(r, aio))
            for s in streams:  # all samples are admitted, or none runs
                await s.admission()
        except REFUSED as e:
            for s in streams:
                s.cancel()
            await self._reject(context, e, ids)
        except BaseException:  # cancelled while waiting for admission: the client went away
            for s in streams:
                s.cancel(self._end_reason(s.request))
            raise
        try:
            tokenizer, echo = self.llm.tokenizer, [ids[1]] * len(streams)
            last: list[float | None] = [None] * len(streams)  # per sample: ITL is within one sample
            async for i, delta in merge(streams):
                if delta.token_ids or delta.text:
                    now = time.perf_counter()
                    gap = None if last[i] is None else now - last[i]
                    self.metrics.tokens_streamed(len(delta.token_ids), gap)
                    last[i] = now
                    yield messages.delta_message(delta, tokenizer, echo[i], index=i)
                    echo[i] = ""
        except EngineFailed as e:
            self.metrics.rejected("internal")
            await context.abort(Code.INTERNAL, str(e))
        finally:
            for s in streams:
                if not s.ended:  # the client went away or its deadline passed: free the slot
                    s.cancel(self._end_reason(s.request))
        for i, s in enumerate(streams):
            yield messages.final_message(s.request, ids[1], index=i)
        cut = [s.request for s in streams if s.request.finish_reason in CUT]
        if cut and cut[0].finish_reason is FinishReason.DEADLINE:
            await context.abort(
                Code.DEADLINE_EXCEEDED, f"deadline exceeded after {len(cut[0].output_ids)} tokens"
            )
        if cut:  # not the client's cancel: that ends the RPC
            await context.abort(
                Code.UNAVAILABLE,
                f"the server is shutting down; the stream was cut after {len(cut[0].output_ids)} tokens",
            )

    def _make_requests(self, request, request_id: str, client: str | None, timeout: float | None):
        """request.n requests (validated; the prompt tokenized once). Sample j's engine id is
        request_id + "\\t" + j: a tab can be in neither a client's id nor a uuid, so none collide."""
        e = self.llm.engine_config
        n, most = request.n or 1, most_choices(e.max_slots, e.max_queue)
        if not 1 <= n <= most:
            raise ValueError(f"n={request.n} must be in [1, {most}] (all samples run at once here)")
        prompt, chat = messages.prompt_of(request)
        params = messages.sampling_params(request.sampling, self.llm.sampling_params)
        requests = []
        for j in range(n):
            if j:
                prompt, chat = requests[0].prompt_ids, False
                if params.seed is not None:
                    params = dataclasses.replace(params, seed=(requests[0].params.seed + j) & MAX_SEED)
            requests.append(
                self.llm.make_request(
                    prompt,
                    params,
                    chat=chat,
                    request_id=request_id if n == 1 else f"{request_id}\t{j}",
                    priority=request.priority,
                    client_id=client,
                    timeout_s=timeout,
                )
            )
        return requests

    async def Score(self, request, context):
        await self._check(context, request.model)
        n = len(request.items)
        if not n:
            await self._reject(context, ValueError("items is empty"))
        if n > self.max_score_items:
            await self._reject(
                context, ValueError(f"items has {n} entries; the limit is {self.max_score_items}")
            )
        streams = []
        try:
            try:
                requests, read = await self._work(
                    self._score_requests, request, self._client(context), self._timeout(context)
                )
                aio = asyncio.get_running_loop()
                for r in requests:
                    streams.append(self.loop.submit_nowait(r, aio))
                for s in streams:
                    await s.admission()
            except REFUSED as e:
                await self._reject(context, e)
            for s in streams:
                async for _ in s:
                    pass
        finally:
            for s in streams:
                if not s.ended:
                    s.cancel(self._end_reason(s.request))
        for s in streams:
            r = s.request
            if r.finish_reason is not FinishReason.SCORED:
                deadline = r.finish_reason is FinishReason.DEADLINE
                await context.abort(
                    Code.DEADLINE_EXCEEDED if deadline else Code.UNAVAILABLE,
                    f"scoring ended early: {r.finish_reason.value}",
                )
        return pb.ScoreResponse(results=[messages.score_result(r) for r in read()])

    def _score_requests(self, request, client: str | None, timeout: float | None):
        """The rows that score the request's items (items that differ only in their last token
        share one, as in LLM.score), each item checked first; and what reads the items' results."""
        items = []
        for i, item in enumerate(request.items):
            try:
                items.append(self.llm.score_request(messages.score_item(item, i)))
            except (ValueError, RequestTooLarge) as e:
                raise ValueError(f"items[{i}]: {e}") from None
        rows, read = self.llm.shared_rows(items)
        for r in rows:
            r.request_id = messages.new_request_id()
            r.deadline = None if timeout is None else r.timings.arrival + timeout
            r.client_id = client
        return rows, read

    async def Tokenize(self, request, context):
        await self._check(context)
        which = request.WhichOneof("input")
        if which is None:
            await self._reject(context, ValueError("input is required: set text or chat"))
        try:
            ids, tokens = await self._work(self._tokenize, request, which)
        except ValueError as e:
            await self._reject(context, e)
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens)

    def _tokenize(self, request, which: str):
        tok = self.llm.tokenizer
        if which == "chat":
            ids = tok.encode_chat([{"role": m.role, "content": m.content} for m in request.chat.messages])
        else:
            ids = tok.encode(request.text, add_special_tokens=request.add_special_tokens)
        return ids, [tok.token_text(i) for i in ids]

    async def Detokenize(self, request, context):
        await self._check(context)
        vocab = self.llm.config.vocab_size
        bad = next((i for i in request.token_ids if not 0 <= i < vocab), None)
        if bad is not None:
            await self._reject(context, ValueError(f"token_ids contains {bad}, out of range [0, {vocab})"))
        ids, skip = list(request.token_ids), request.skip_special_tokens
        text = await self._work(lambda: self.llm.tokenizer.decode(ids, skip_special_tokens=skip))
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request, context):
        await self._check(context)
        return messages.model_info(self.llm, self.mesh, __version__)

    async def GetServerStats(self, request, context):
        await self._check(context)
        return messages.server_stats(self.loop.stats(), time.monotonic() - self.started)
