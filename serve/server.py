"""The gRPC server: `xlaserve.v1.Generation` (service.py) over the engine loop, with health and
reflection on the same port, behind the transport guard (guards.py).

It is a `grpc.aio` server on an event loop of its own thread, so an open stream costs a coroutine,
not a thread, and there is no transport-wide RPC limit that streams could use up: Generation
streams queue in admission control (--max-queue), health, stats and model info answer at once
under any number of them, and the unauthenticated streams (health Watch, reflection) have a cap of
their own. This class's methods are called from ordinary threads; they run their work on that loop.

Life cycle: the port opens with health NOT_SERVING (Generation answers UNAVAILABLE) while the model
loads and every program compiles; one warm-up request runs; then SERVING. On drain (SIGTERM) health
turns NOT_SERVING, new requests get UNAVAILABLE, running streams finish within the grace period,
then the rest are cut with UNAVAILABLE, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from xlaserve.runtime.engine_loop import EngineLoop
from xlaserve.runtime.sampling_params import SamplingParams
from xlaserve.serve.auth import Keys
from xlaserve.serve.guards import Guard
from xlaserve.serve.limits import MAX_MESSAGE_BYTES, MAX_OPEN_STREAMS, MAX_SCORE_ITEMS, WORKER_THREADS
from xlaserve.serve.metrics import Metrics
from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2 as pb
from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2_grpc as pb_grpc
from xlaserve.serve.service import GenerationService

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
NOT_SERVING, SERVING = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING


def start_engine_loop(llm, metrics: Metrics, *, warm_up: bool = True) -> EngineLoop:
    """The engine loop over `llm`'s runner, after one warm-up request, recording every request that
    ends in `metrics`: what the gRPC server and the HTTP API (http_server.py) serve from."""
    loop = EngineLoop(llm.runner)
    if warm_up:
        bos = llm.config.bos_token_id or 1
        for _ in loop.submit(llm.make_request([bos, bos], SamplingParams(temperature=0.0, max_tokens=2))):
            pass
    loop.on_finished = metrics.finished
    return loop


class Server:
    """Owns the gRPC server, its event loop thread, health, metrics and (once attached) the engine loop."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 50051,
        tls: tuple[bytes, bytes] | None = None,
        api_keys=(),
        worker_threads: int = WORKER_THREADS,
        max_open_streams: int = MAX_OPEN_STREAMS,
        max_score_items: int = MAX_SCORE_ITEMS,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        model_names: tuple[str, ...] = (),
        mesh: str = "1 device",
    ):
        self.metrics = Metrics(stats=lambda: self.service.stats())
        keys = Keys(api_keys)
        self.service = GenerationService(
            self.metrics,
            model_names,
            mesh,
            keys_on=bool(keys),
            max_score_items=max_score_items,
            worker_threads=worker_threads,
        )
        self.guard = Guard(keys, self.metrics, max_open_streams)
        self._aio = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._aio.run_forever, name="xlaserve-grpc", daemon=True)
        self._thread.start()
        self._stopped = False
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
        self.port = self._call(self._build(f"{host}:{port}", tls, options))
        self._set_health(NOT_SERVING)

    async def _build(self, address: str, tls, options) -> int:
        # grpc.aio objects belong to the loop they are made on: make them on ours.
        self.grpc = grpc.aio.server(options=options, interceptors=[self.guard])
        self.health = health.aio.HealthServicer()
        pb_grpc.add_GenerationServicer_to_server(self.service, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        if tls is None:
            return self.grpc.add_insecure_port(address)
        key, cert = tls
        return self.grpc.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))

    def _call(self, coro, timeout: float | None = 60):
        """Run `coro` on the server's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._aio).result(timeout)

    def _set_health(self, status) -> None:
        async def set_all():
            for name in ("", SERVICE):
                await self.health.set(name, status)

        self._call(set_all())

    def start(self) -> Server:
        self._call(self.grpc.start())
        return self

    def attach(self, llm, *, warm_up: bool = True) -> EngineLoop:
        """Serve `llm`: run one warm-up request through the loop, then report SERVING. From then on
        every request that ends is recorded in the metrics, however it ends."""
        loop = start_engine_loop(llm, self.metrics, warm_up=warm_up)
        self.service.attach(llm, loop)
        self._set_health(SERVING)
        return loop

    def begin_drain(self) -> None:
        """Refuse new requests (UNAVAILABLE), then report NOT_SERVING."""
        if self.service.loop is not None:
            self.service.loop.stop_admitting()
        self._set_health(NOT_SERVING)

    def drain(self, grace_s: float) -> bool:
        """begin_drain, let running requests finish (up to grace_s), then stop (cutting the rest)."""
        self.begin_drain()
        loop = self.service.loop
        finished = True if loop is None else loop.drain(grace_s)
        self.stop(grace_s=1.0)
        return finished

    def stop(self, grace_s: float = 1.0) -> None:
        """Cancel what runs in the engine (its streams end UNAVAILABLE: they get up to grace_s to
        say so), stop the server, then its event loop. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self.service.loop is not None:
            self.service.loop.close()
        self._call(self.grpc.stop(grace_s))
        self._aio.call_soon_threadsafe(self._aio.stop)
        self._thread.join(timeout=10)
        self._aio.close()
        self.service.pool.shutdown(wait=False, cancel_futures=True)
