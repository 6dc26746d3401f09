"""Streamed answers of the OpenAI API: the chunks of chat and text completions as server-sent events,
from the engine's deltas as they come.

Chat: each choice opens with a `{"role": "assistant", "content": ""}` delta, then content deltas
(with their log-probs), then tool calls (when the output held any: parsed at the end, the text from
the first `<tool_call>` held back until then), then an empty delta with its finish_reason.
Completions: the echoed prompt first (with its log-probs when asked), then text deltas. With
stream_options.include_usage every chunk has "usage": null and one last chunk with no choices
carries the usage. Then `data: [DONE]`.

An error after the headers went out (the engine failed, the server cut the stream at shutdown) is
sent as an event holding OpenAI's error object, with no [DONE] after it (the official client raises
it). However the stream ends — finished, failed, or closed because the client went away (the ASGI
server cancels this generator) — every request still running is cancelled, freeing its slot.
"""

from __future__ import annotations

import time

from fastapi.responses import StreamingResponse

from xlaserve.runtime.engine_loop import EngineFailed, merge
from xlaserve.runtime.request import FinishReason
from xlaserve.serve import openai_format as fmt
from xlaserve.serve.openai_params import Plan
from xlaserve.serve.openai_schemas import ApiError
from xlaserve.serve.openai_tools import ToolCallStream
from xlaserve.serve.sse import DONE, HEADERS, event

CUT = (FinishReason.CANCELLED, FinishReason.DEADLINE)


def cut_error(req) -> ApiError:
    return ApiError(
        503, f"the server is shutting down; the stream was cut after {len(req.output_ids)} tokens"
    )


class Events:
    """The SSE frames of one streamed request; `frames()` is the response body."""

    def __init__(self, plan: Plan, streams, rid: str, created: int, include_usage: bool, service):
        self.plan, self.streams, self.rid, self.created = plan, streams, rid, created
        self.include_usage, self.service = include_usage, service
        self.texts = service.texts

    def _chunk(self, choice: dict) -> bytes:
        return event(fmt.chunk(self.plan, self.rid, self.created, choice, self.include_usage))

    async def frames(self):
        last = None
        try:
            body = self._chat() if self.plan.chat else self._completion()
            async for item in body:
                if isinstance(item, int):  # tokens arrived: the inter-token latency histogram
                    now = time.perf_counter()
                    self.service.metrics.tokens_streamed(item, None if last is None else now - last)
                    last = now
                else:
                    yield item
            if self.include_usage:
                yield event(fmt.usage_chunk(self.plan, self.rid, self.created))
            yield DONE
        except ApiError as e:
            yield event(e.body())
        except EngineFailed as e:
            self.service.metrics.rejected("internal")
            yield event(ApiError(500, str(e)).body())
        finally:
            self.cancel()

    def cancel(self) -> None:
        """End every request still running (a no-op for those that have ended)."""
        for s in self.streams:
            if not s.ended:
                s.cancel()

    async def _chat(self):
        plan = self.plan
        held = [
            ToolCallStream(plan.parallel_tool_calls, plan.tool_grammar) if plan.tool_calls else None
            for _ in self.streams
        ]
        for i in range(len(self.streams)):
            yield self._chunk(
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
        async for i, d in merge(self.streams):
            yield len(d.token_ids)
            text, calls = (d.text, []) if held[i] is None else held[i].feed(d.text)
            if text or (d.logprobs and plan.top_logprobs is not None):
                lps = fmt.chat_logprobs(d.logprobs, self.texts) if plan.top_logprobs is not None else None
                yield self._chunk(
                    {"index": i, "delta": {"content": text}, "logprobs": lps, "finish_reason": None}
                )
            if calls:
                yield self._calls_chunk(i, calls)
            if not d.finished:
                continue
            req = d.request
            if req.finish_reason in CUT:
                raise cut_error(req)
            called = False
            if held[i] is not None:
                rest, calls, called = held[i].finish()
                if rest:
                    yield self._chunk(
                        {"index": i, "delta": {"content": rest}, "logprobs": None, "finish_reason": None}
                    )
                if calls:
                    yield self._calls_chunk(i, calls)
            reason = fmt.finish_reason(req, called)
            yield self._chunk({"index": i, "delta": {}, "logprobs": None, "finish_reason": reason})

    def _calls_chunk(self, i: int, calls: list[dict]) -> bytes:
        return self._chunk(
            {"index": i, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}
        )

    async def _completion(self):
        plan, texts, n = self.plan, self.texts, self.plan.n
        offsets = [0] * len(self.streams)
        if plan.echo:
            for i in range(len(self.streams)):
                p = plan.prompts[i // n]
                prefix = fmt.echo_text(plan, i // n, self.service.llm.tokenizer)
                lps = None
                if plan.top_logprobs is not None:
                    lps = fmt.legacy_logprobs(fmt.prompt_entries(p.ids, p.score), texts, 0)
                offsets[i] = len(prefix)
                yield self._chunk({"index": i, "text": prefix, "logprobs": lps, "finish_reason": None})
        async for i, d in merge(self.streams):
            yield len(d.token_ids)
            lps = None
            if plan.top_logprobs is not None and d.logprobs:
                lps = fmt.legacy_logprobs(fmt.generated(d.logprobs), texts, offsets[i])
            if d.text or lps:
                yield self._chunk({"index": i, "text": d.text, "logprobs": lps, "finish_reason": None})
                offsets[i] += len(d.text)
            if d.finished:
                if d.request.finish_reason in CUT:
                    raise cut_error(d.request)
                reason = fmt.finish_reason(d.request)
                yield self._chunk({"index": i, "text": "", "logprobs": None, "finish_reason": reason})


class EventResponse(StreamingResponse):
    """A server-sent event stream whose requests are cancelled however the response ends, even when
    the client left before its body was started (then the body's own `finally` never runs)."""

    def __init__(self, events: Events):
        super().__init__(events.frames(), media_type="text/event-stream", headers=HEADERS)
        self.events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.events.cancel()
