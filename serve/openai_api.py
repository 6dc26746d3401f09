"""The OpenAI-compatible HTTP API (FastAPI) over the engine loop the gRPC service uses: the same
admission control, per-client limits, API keys and Prometheus metrics.

    GET  /v1/models             the served names (API key)
    POST /v1/completions        text completions (API key)
    POST /v1/chat/completions   chat completions, tools (API key)
    GET  /health                200 serving, 503 loading / draining / failed (no key: for probes)
    GET  /metrics               Prometheus text (no key), only where the metrics endpoint is

A request is a coroutine on the server's event loop, which nothing blocks: the body is parsed,
prompts tokenized and responses built on a small thread pool (`worker_threads`), the engine is
reached through the engine loop's streams, and a request waits for a slot in admission control
(--max-queue), never for a thread. Order of checks: key (401), ready (503), body size (413), JSON
and fields (400), model (404), then admission (429 queue full or per-client limit, 503 draining).
Errors are OpenAI's error object naming the parameter (openai_schemas.ApiError). A client that
goes away cancels its requests: a stream's generator is cancelled by the ASGI server (sse.py /
openai_stream.py); a non-streaming request watches for the disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from xlaserve.runtime.admission import Overloaded, Rejected, RequestTooLarge
from xlaserve.runtime.engine_loop import Draining, EngineFailed, EngineLoop
from xlaserve.runtime.stats import EngineStats
from xlaserve.serve import openai_format as fmt
from xlaserve.serve.auth import Keys, bearer, client_identity
from xlaserve.serve.limits import WORKER_THREADS
from xlaserve.serve.metrics import Metrics
from xlaserve.serve.openai_params import chat_plan, completion_plan
from xlaserve.serve.openai_schemas import ApiError, ChatRequest, CompletionRequest, parse
from xlaserve.serve.openai_stream import CUT, EventResponse, Events, cut_error

MAX_BODY_BYTES = 4 << 20  # --max-body-bytes


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def _json(obj, status: int = 200) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), status, media_type="application/json")


class OpenAIService:
    def __init__(
        self,
        metrics: Metrics,
        model_names: tuple[str, ...] = (),
        *,
        api_keys=(),
        worker_threads: int = WORKER_THREADS,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        self.metrics, self.model_names, self.keys = metrics, model_names, Keys(api_keys)
        self.max_body_bytes = max_body_bytes
        self.pool = ThreadPoolExecutor(worker_threads, thread_name_prefix="xlaserve-http")
        self.llm = self.loop = self.texts = None
        self.draining = False
        self.created = int(time.time())

    def attach(self, llm, loop: EngineLoop) -> None:
        self.texts = fmt.TokenTexts(llm.tokenizer)
        self.llm, self.loop = llm, loop

    def stats(self) -> EngineStats:
        """The engine loop's stats; all zeros while the model loads."""
        return EngineStats() if self.loop is None else self.loop.stats()

    def state(self) -> str:
        if self.llm is None:
            return "loading"
        if self.draining or self.loop.draining:
            return "draining"
        return "serving" if self.loop.healthy else "failed"

    # -- checks ------------------------------------------------------------------------------------

    def authorize(self, request: Request) -> str | None:
        """The client's identity for per-client limits (its key when keys are on), or 401."""
        metadata = [(k, v) for k, v in request.headers.items() if k in ("authorization", "x-client-id")]
        if self.keys and self.keys.check(metadata) is not None:
            self.metrics.transport_rejected("unauthenticated")
            if bearer(metadata) is None:
                raise ApiError(
                    401, "missing API key (header 'Authorization: Bearer <key>')", None, "invalid_api_key"
                )
            raise ApiError(401, "invalid API key", None, "invalid_api_key")
        return client_identity(metadata, bool(self.keys))

    def ready(self) -> None:
        state = self.state()
        if state == "loading":
            raise ApiError(503, "the model is still loading; /health answers 200 when ready")
        if state == "draining":
            raise ApiError(503, "the server is draining and accepts no new requests")
        if state == "failed":
            raise ApiError(503, "the engine failed; the server is not serving")

    def model(self, name: str | None) -> str:
        if not name:
            return self.model_names[0]
        if name not in self.model_names:
            served = ", ".join(dict.fromkeys(self.model_names))
            raise ApiError(
                404, f"model {name!r} is not served here (serving: {served})", "model", "model_not_found"
            )
        return name

    async def body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        length = request.headers.get("content-length", "")
        too_big = ApiError(
            413, f"the request body is over the limit of {limit} bytes", None, "request_too_large"
        )
        if length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def work(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def count(self, e: ApiError) -> None:
        """Every refusal in the metrics, under the names the gRPC server uses."""
        transport = "message_too_large" if e.status == 413 else None
        if e.code == "invalid_json":
            transport = "malformed"
        if transport is not None:
            self.metrics.transport_rejected(transport)
            return
        outcome = {400: "invalid_argument", 404: "not_found", 429: "resource_exhausted", 503: "unavailable"}
        limit = e.code if e.status == 429 else None
        self.metrics.rejected(outcome.get(e.status, "internal"), limit)

    # -- generation ----------------------------------------------------------------------------------

    async def submit(self, requests):
        """Hand the requests to the engine; all are admitted, or none runs (429 / 503 / 400)."""
        streams, aio = [], asyncio.get_running_loop()
        try:
            for r in requests:
                streams.append(self.loop.submit_nowait(r, aio))
            for s in streams:
                await s.admission()
        except (Rejected, EngineFailed, ValueError) as e:
            for s in streams:
                s.cancel()
            if isinstance(e, Draining):
                raise ApiError(503, str(e)) from None
            if isinstance(e, Overloaded):
                raise ApiError(429, str(e), None, e.limit) from None
            if isinstance(e, RequestTooLarge | ValueError):
                raise ApiError(400, str(e), None, "invalid_value") from None
            raise ApiError(500, str(e)) from None
        except BaseException:  # cancelled while waiting for admission: the client went away
            for s in streams:
                s.cancel()
            raise
        return streams

    async def _disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(self, streams, request: Request) -> None:
        """Read the streams to their ends; cancel them all if the client goes away first."""

        async def drain(stream):
            last = None
            async for delta in stream:
                now = time.perf_counter()
                self.metrics.tokens_streamed(len(delta.token_ids), None if last is None else now - last)
                last = now

        reading = asyncio.gather(*(drain(s) for s in streams))
        watching = asyncio.ensure_future(self._disconnect(request))
        try:
            await asyncio.wait({reading, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()
                raise ClientGone
            reading.result()
        finally:
            watching.cancel()
            for s in streams:
                if not s.ended:
                    s.cancel()
        for s in streams:
            if s.request.finish_reason in CUT:
                raise cut_error(s.request)

    def _response(self, plan, rid: str, created: int) -> Response:
        """The whole answer, built and serialized on the worker pool (log-probs can make it large)."""
        if plan.chat:
            return _json(fmt.chat_response(plan, rid, created, self.texts))
        return _json(fmt.completion_response(plan, rid, created, self.texts, self.llm.tokenizer))

    async def generate(self, request: Request, chat: bool) -> Response:
        client = self.authorize(request)
        try:
            self.ready()
            raw = await self.body(request)
            body = await self.work(parse, raw, ChatRequest if chat else CompletionRequest)
            model = self.model(body.model)
            build = chat_plan if chat else completion_plan
            plan = await self.work(build, self.llm, body, model, client)
            scores = [p.score for p in plan.prompts if p.score is not None]
            streams = await self.submit(scores + plan.requests)
        except ApiError as e:
            self.count(e)
            raise
        streaming = False
        try:
            if scores:  # echo with log-probs: the prompts' scores come first
                await self.collect(streams[: len(scores)], request)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            created = int(time.time())
            if body.stream:
                usage = body.stream_options is not None and body.stream_options.include_usage
                streaming = True  # from here on the response cancels what is left (EventResponse)
                return EventResponse(Events(plan, streams[len(scores) :], rid, created, usage, self))
            await self.collect(streams[len(scores) :], request)
            return await self.work(self._response, plan, rid, created)
        except ClientGone:
            return Response(status_code=499)
        except EngineFailed as e:
            raise ApiError(500, str(e)) from None
        finally:
            if not streaming:  # however this ended, nothing keeps running for it
                for s in streams:
                    if not s.ended:
                        s.cancel()


def create_app(service: OpenAIService, *, cors_origins=(), metrics_route: bool = False) -> FastAPI:
    """The FastAPI app over `service`. cors_origins: browser origins allowed (none: no CORS headers);
    metrics_route: serve GET /metrics (no key, as the metrics endpoint)."""
    app = FastAPI(title="xlaserve", docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Client-Id"],
        )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _json(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return _json(ApiError(e.status_code, str(e.detail)).body(), e.status_code)

    @app.get("/health")
    async def health():
        state = service.state()
        return _json({"status": state}, 200 if state == "serving" else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        service.authorize(request)
        return _json(fmt.models(service.model_names, service.created))

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        service.authorize(request)
        service.model(name)
        return _json(fmt.models((name,), service.created)["data"][0])

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await service.generate(request, chat=True)

    if metrics_route:

        @app.get("/metrics")
        async def metrics():
            text = await service.work(generate_latest, service.metrics.registry)
            return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app
