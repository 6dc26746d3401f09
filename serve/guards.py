"""The transport guard: every RPC passes here before its handler runs (a `grpc.aio` interceptor).

- API keys: without a valid key every method except health and reflection is UNAUTHENTICATED.
- Open streams: health Watch and reflection streams need no key, so they get a cap of their own
  (`max_open_streams`, RESOURCE_EXHAUSTED past it). Nothing else shares it, and the server has no
  transport-wide RPC limit: Generation streams queue in admission control (--max-queue), and
  probes and admin calls never wait behind them.
- Malformed requests (a corrupt protobuf, invalid UTF-8 in a string field): INVALID_ARGUMENT naming
  the problem, one log line, no traceback (the deserializer is wrapped; grpc's own would answer
  INTERNAL with a traceback per request).
- Every refusal is counted (Metrics.transport_rejected).

To see every request, a handler with a unary request is served as a request stream of one message
(the wire format is the same): grpc refuses a message over --max-message-bytes itself, before any
Python runs, and the only trace it leaves is a request stream that ends with no message. That is
how such refusals are counted ("message_too_large"; a client that sends no message at all, which no
gRPC client does for a unary method, counts the same).
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf.message import DecodeError

from xlaserve.serve.auth import OPEN_SERVICES, Keys
from xlaserve.serve.metrics import Metrics

log = logging.getLogger("xlaserve")
Code = grpc.StatusCode


class Malformed:
    """What the wrapped deserializer returns for bytes that are not a valid request."""

    def __init__(self, reason: str):
        self.reason = reason


def safe(deserialize):
    def parse(data: bytes):
        try:
            return deserialize(data) if deserialize is not None else data
        except (DecodeError, UnicodeDecodeError, ValueError) as e:
            return Malformed(str(e) or type(e).__name__)

    return parse


class Guard(grpc.aio.ServerInterceptor):
    def __init__(self, keys: Keys, metrics: Metrics, max_open_streams: int):
        self.keys, self.metrics, self.max_open_streams = keys, metrics, max_open_streams
        self.open_streams = 0  # changed only on the event loop's thread

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
            return None
        method, open_service = details.method, details.method.startswith(OPEN_SERVICES)
        denied = None if open_service or not self.keys else self.keys.check(details.invocation_metadata)
        capped = open_service and (handler.request_streaming or handler.response_streaming)
        return self._wrap(handler, method, denied, capped)

    async def _refuse(self, context, reason: str, code, message: str) -> None:
        self.metrics.transport_rejected(reason)
        await context.abort(code, message)

    def _wrap(self, handler, method: str, denied: str | None, capped: bool):
        streaming_request = handler.request_streaming
        inner = (
            handler.stream_stream or handler.stream_unary
            if streaming_request
            else handler.unary_stream or handler.unary_unary
        )

        async def requests(request_iterator, context):
            async for request in request_iterator:
                if isinstance(request, Malformed):
                    await self._malformed(context, method, request)
                yield request

        async def prepare(request_iterator, context):
            """The request (or an iterator of them) for `inner`, or None when refused."""
            if denied is not None:
                await self._refuse(context, "unauthenticated", Code.UNAUTHENTICATED, denied)
            if streaming_request:
                return requests(request_iterator, context)
            request = await anext(request_iterator, None)
            if request is None:
                if not context.cancelled():
                    self.metrics.transport_rejected("message_too_large")
                return None
            if isinstance(request, Malformed):
                await self._malformed(context, method, request)
            return request

        async def unary_response(request_iterator, context):
            request = await prepare(request_iterator, context)
            if request is None:
                return None
            return await self._counted(lambda: inner(request, context), context, capped)

        async def stream_response(request_iterator, context):
            request = await prepare(request_iterator, context)
            if request is None:
                return
            await self._counted(lambda: _forward(inner(request, context), context), context, capped)

        deserialize = safe(handler.request_deserializer)
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                stream_response,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_unary_rpc_method_handler(
            unary_response, request_deserializer=deserialize, response_serializer=handler.response_serializer
        )

    async def _counted(self, run, context, capped: bool):
        """Await `run()`, the handler; a capped one counts as an open stream while it runs (the check
        and the count happen with no await between them: the cap holds exactly)."""
        if not capped:
            return await run()
        if self.open_streams >= self.max_open_streams:
            await self._refuse(
                context,
                "open_stream_limit",
                Code.RESOURCE_EXHAUSTED,
                f"too many open health/reflection streams; the limit is {self.max_open_streams} "
                "(--max-open-streams)",
            )
        self.open_streams += 1
        try:
            return await run()
        finally:
            self.open_streams -= 1

    async def _malformed(self, context, method: str, request: Malformed) -> None:
        log.warning("malformed request to %s from %s: %s", method, context.peer(), request.reason)
        await self._refuse(
            context, "malformed", Code.INVALID_ARGUMENT, f"malformed request: {request.reason}"
        )


async def _forward(responses, context) -> None:
    """Write a handler's responses: an async generator's items, or a coroutine that writes them.
    The generator is closed here however the RPC ends (a client's cancel may land while a write
    waits): its `finally` (which frees the request's slot) must run now, not when it is collected."""
    if not hasattr(responses, "__anext__"):
        await responses
        return
    try:
        async for response in responses:
            await context.write(response)
    finally:
        await responses.aclose()
