"""The gRPC server: `xlaserve.v1.Generation` over the engine loop, with health and reflection on the
same port.

Life cycle: the port opens with health NOT_SERVING (Generation answers UNAVAILABLE) while the model
loads and every program compiles; one warm-up request runs; then SERVING. On drain (SIGTERM) health
turns NOT_SERVING, new requests get UNAVAILABLE, running streams finish within the grace period,
and the process exits 0.

Status codes: INVALID_ARGUMENT (a field, or a prompt over a limit: the message names them),
RESOURCE_EXHAUSTED (queue full, per-client limit), UNAVAILABLE (loading, draining),
DEADLINE_EXCEEDED, CANCELLED, NOT_FOUND (another model), UNAUTHENTICATED (see auth.py).
"""

from __future__ import annotations

import logging
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from xlaserve import __version__
from xlaserve.runtime.admission import Overloaded, Rejected, RequestTooLarge
from xlaserve.runtime.engine_loop import Draining, EngineFailed, EngineLoop
from xlaserve.runtime.request import FinishReason
from xlaserve.runtime.sampling_params import SamplingParams
from xlaserve.runtime.stats import EngineStats
from xlaserve.serve import messages
from xlaserve.serve.auth import ApiKeyInterceptor, bearer, key_id
from xlaserve.serve.metrics import Metrics
from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2 as pb
from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2_grpc as pb_grpc

log = logging.getLogger("xlaserve")
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
Code = grpc.StatusCode


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, metrics: Metrics, model_names: tuple[str, ...] = (), mesh: str = "1 device"):
        self.metrics, self.model_names, self.mesh = metrics, model_names, mesh
        self.llm = self.loop = None
        self.started = time.monotonic()

    def attach(self, llm, loop: EngineLoop) -> None:
        self.llm, self.loop = llm, loop

    def stats(self) -> EngineStats:
        """The engine loop's stats; all zeros while the model loads."""
        return EngineStats() if self.loop is None else self.loop.stats()

    # -- helpers -----------------------------------------------------------------------------------

    def _check(self, context, model: str = "") -> None:
        if self.loop is None:
            context.abort(Code.UNAVAILABLE, "the model is still loading; health reports SERVING when ready")
        if model and model not in self.model_names:
            self.metrics.rejected("not_found")
            context.abort(
                Code.NOT_FOUND, f"model {model!r} is not served here (serving: {', '.join(self.model_names)})"
            )

    def _reject(self, context, e: Exception):
        if isinstance(e, RequestTooLarge | ValueError):
            code, outcome = Code.INVALID_ARGUMENT, "invalid_argument"
        elif isinstance(e, Draining):
            code, outcome = Code.UNAVAILABLE, "unavailable"
        elif isinstance(e, Overloaded):
            code, outcome = Code.RESOURCE_EXHAUSTED, "resource_exhausted"
        else:
            code, outcome = Code.INTERNAL, "internal"
        self.metrics.rejected(outcome)
        context.abort(code, str(e))

    @staticmethod
    def _client(context) -> str | None:
        md = dict(context.invocation_metadata() or ())
        if md.get("x-client-id"):
            return md["x-client-id"]
        key = bearer(context.invocation_metadata())
        return key_id(key) if key else None

    def _ended(self, req) -> None:
        """The RPC is over (done, cancelled by the client, or past its deadline): release the request.
        Its engine deadline is set just before the client's, so past it means the deadline ended it."""
        expired = req.deadline is not None and time.perf_counter() >= req.deadline
        self.loop.cancel(req.request_id, FinishReason.DEADLINE if expired else FinishReason.CANCELLED)

    @staticmethod
    def _timeout(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None or remaining > 1e8 else max(remaining - 0.01, 0.0)

    # -- RPCs --------------------------------------------------------------------------------------

    def Generate(self, request, context):
        self._check(context, request.model)
        try:
            prompt, chat = messages.prompt_of(request)
            req = self.llm.make_request(
                prompt,
                messages.sampling_params(request.sampling),
                chat=chat,
                request_id=request.request_id or None,
                priority=request.priority,
                client_id=self._client(context),
                timeout_s=self._timeout(context),
            )
            stream = self.loop.submit(req)
        except (ValueError, Rejected, EngineFailed) as e:
            self._reject(context, e)
        context.add_callback(lambda: self._ended(req))
        last = None
        try:
            for delta in stream:
                if delta.token_ids or delta.text:
                    now = time.perf_counter()
                    self.metrics.tokens_streamed(len(delta.token_ids), None if last is None else now - last)
                    last = now
                    yield messages.delta_message(delta, self.llm.tokenizer)
        except EngineFailed as e:
            self.metrics.rejected("internal")
            context.abort(Code.INTERNAL, str(e))
        self.metrics.finished(req)
        if req.finish_reason is FinishReason.CANCELLED and not context.is_active():
            return  # the client went away
        yield messages.final_message(req)
        if req.finish_reason is FinishReason.DEADLINE:
            context.abort(Code.DEADLINE_EXCEEDED, f"deadline exceeded after {len(req.output_ids)} tokens")
        if req.finish_reason is FinishReason.CANCELLED:
            context.abort(Code.CANCELLED, "cancelled by the server")

    def Score(self, request, context):
        self._check(context, request.model)
        if not request.items:
            self._reject(context, ValueError("items is empty"))
        streams = []
        try:
            requests = []
            for i, item in enumerate(request.items):
                try:
                    requests.append(self.llm.score_request(messages.score_item(item, i)))
                except (ValueError, RequestTooLarge) as e:
                    raise ValueError(f"items[{i}]: {e}") from None
            timeout = self._timeout(context)
            for r in requests:
                r.deadline = None if timeout is None else r.timings.arrival + timeout
                r.client_id = self._client(context)
                streams.append(self.loop.submit(r))
            for s in streams:
                for _ in s:
                    pass
        except (ValueError, Rejected, EngineFailed) as e:
            for s in streams:
                s.cancel()
            self._reject(context, e)
        results = []
        for s in streams:
            r = s.request
            if r.finish_reason is not FinishReason.SCORED:
                context.abort(
                    Code.DEADLINE_EXCEEDED if r.finish_reason is FinishReason.DEADLINE else Code.CANCELLED,
                    f"scoring ended early: {r.finish_reason.value}",
                )
            lps = [lp for lp, _ in r.scores]
            greedy = [g for _, g in r.scores]
            results.append(
                pb.ScoreResult(
                    token_ids=r.prompt_ids[r.score_start :],
                    logprobs=lps,
                    is_greedy=greedy,
                    sum_logprob=sum(lps),
                    all_greedy=all(greedy),
                )
            )
        return pb.ScoreResponse(results=results)

    def Tokenize(self, request, context):
        self._check(context)
        tok = self.llm.tokenizer
        try:
            if request.WhichOneof("input") == "chat":
                ids = tok.encode_chat([{"role": m.role, "content": m.content} for m in request.chat.messages])
            else:
                ids = tok.encode(request.text, add_special_tokens=request.add_special_tokens)
        except ValueError as e:
            self._reject(context, e)
        return pb.TokenizeResponse(token_ids=ids, tokens=[tok.token_text(i) for i in ids])

    def Detokenize(self, request, context):
        self._check(context)
        vocab = self.llm.config.vocab_size
        bad = next((i for i in request.token_ids if not 0 <= i < vocab), None)
        if bad is not None:
            self._reject(context, ValueError(f"token_ids contains {bad}, out of range [0, {vocab})"))
        text = self.llm.tokenizer.decode(request.token_ids, skip_special_tokens=request.skip_special_tokens)
        return pb.DetokenizeResponse(text=text)

    def GetModelInfo(self, request, context):
        self._check(context)
        return messages.model_info(self.llm, self.mesh, __version__)

    def GetServerStats(self, request, context):
        self._check(context)
        return messages.server_stats(self.loop.stats(), time.monotonic() - self.started)


class Server:
    """Owns the gRPC server, health, metrics and (once attached) the engine loop."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 50051,
        tls: tuple[bytes, bytes] | None = None,
        api_keys=(),
        max_workers: int = 256,
        max_message_bytes: int = 16 << 20,
        model_names: tuple[str, ...] = (),
        mesh: str = "1 device",
    ):
        self.metrics = Metrics(stats=lambda: self.service.stats())
        self.service = GenerationService(self.metrics, model_names, mesh)
        self.health = health.HealthServicer()
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Long-lived streams: ping idle connections, tolerate clients that ping every 10 s.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        interceptors = [ApiKeyInterceptor(api_keys)] if api_keys else []
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            options=options,
            interceptors=interceptors,
            maximum_concurrent_rpcs=max_workers,
        )
        pb_grpc.add_GenerationServicer_to_server(self.service, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        address = f"{host}:{port}"
        if tls is not None:
            key, cert = tls
            self.port = self.grpc.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = self.grpc.add_insecure_port(address)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status) -> None:
        for name in ("", SERVICE):
            self.health.set(name, status)

    def start(self) -> Server:
        self.grpc.start()
        return self

    def attach(self, llm, *, warm_up: bool = True) -> EngineLoop:
        """Serve `llm`: run one warm-up request through the loop, then report SERVING."""
        loop = EngineLoop(llm.runner)
        if warm_up:
            bos = llm.config.bos_token_id or 1
            for _ in loop.submit(llm.make_request([bos, bos], SamplingParams(temperature=0.0, max_tokens=2))):
                pass
        self.service.attach(llm, loop)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return loop

    def begin_drain(self) -> None:
        """Refuse new requests (UNAVAILABLE), then report NOT_SERVING."""
        if self.service.loop is not None:
            self.service.loop.stop_admitting()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def drain(self, grace_s: float) -> bool:
        """begin_drain, let running requests finish (up to grace_s), then stop."""
        self.begin_drain()
        loop = self.service.loop
        finished = True if loop is None else loop.drain(grace_s)
        self.stop(grace_s=1.0)
        return finished

    def stop(self, grace_s: float = 0.0) -> None:
        if self.service.loop is not None:
            self.service.loop.close()
        self.grpc.stop(grace_s).wait()
