"""The HTTP server of the OpenAI-compatible API (openai_api.py): uvicorn on an event loop of its own
thread, alone or beside the gRPC server (server.py), over the same engine loop and metrics.

Life cycle, as the gRPC server's: the port opens (bound here, so a taken port fails at once and
port 0 picks a free one) with /health 503 while the model loads and compiles; `attach` serves a
model — on the gRPC server's engine loop when given it, else on one of its own after a warm-up
request — and /health turns 200. On drain, /health turns 503 and new requests get 503; running
streams finish within the grace period; `stop` cuts the rest (their streams end with an error
event) and closes the server. Methods are called from ordinary threads.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from xlaserve.runtime.engine_loop import EngineLoop
from xlaserve.serve.limits import WORKER_THREADS
from xlaserve.serve.metrics import Metrics
from xlaserve.serve.openai_api import MAX_BODY_BYTES, OpenAIService, create_app
from xlaserve.serve.server import start_engine_loop


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """Owns the HTTP port, its event loop thread and the API service; shares `metrics` (and, via
    `attach`, the engine loop) with a gRPC server when there is one."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_keys=(),
        metrics: Metrics | None = None,
        model_names: tuple[str, ...] = (),
        worker_threads: int = WORKER_THREADS,
        max_body_bytes: int = MAX_BODY_BYTES,
        cors_origins=(),
        metrics_route: bool = False,
        tls_files: tuple[str, str] | None = None,
    ):
        """tls_files: (PEM private key file, PEM certificate chain file) to serve HTTPS."""
        self.metrics = metrics or Metrics(stats=lambda: self.service.stats())
        self.service = OpenAIService(
            self.metrics,
            model_names,
            api_keys=api_keys,
            worker_threads=worker_threads,
            max_body_bytes=max_body_bytes,
        )
        self.app = create_app(self.service, cors_origins=cors_origins, metrics_route=metrics_route)
        self._sock = bind(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        key, cert = tls_files or (None, None)
        config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_keyfile=key,
            ssl_certfile=cert,
        )
        self.scheme = "https" if tls_files else "http"
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._owns_loop = self._stopped = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> HttpServer:
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._uvicorn.serve(sockets=[self._sock])),
            name="xlaserve-http",
            daemon=True,
        )
        self._thread.start()
        end = time.monotonic() + timeout_s
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def attach(self, llm, loop: EngineLoop | None = None, *, warm_up: bool = True) -> EngineLoop:
        """Serve `llm` on `loop` (the gRPC server's), or on a new engine loop; then /health is 200."""
        if loop is None:
            loop, self._owns_loop = start_engine_loop(llm, self.metrics, warm_up=warm_up), True
        self.service.attach(llm, loop)
        return loop

    def begin_drain(self) -> None:
        """Refuse new requests (503); /health answers 503."""
        self.service.draining = True
        if self.service.loop is not None:
            self.service.loop.stop_admitting()

    def drain(self, grace_s: float) -> bool:
        """begin_drain, let running requests finish (up to grace_s), then stop (cutting the rest)."""
        self.begin_drain()
        loop = self.service.loop
        finished = True if loop is None else loop.drain(grace_s)
        self.stop(grace_s=1.0)
        return finished

    def stop(self, grace_s: float = 1.0) -> None:
        """Cancel what runs in an engine loop of our own (a shared one is the gRPC server's to
        close), give open responses up to grace_s to end, stop the server. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self.service.draining = True
        if self._owns_loop:
            self.service.loop.close()
        self._uvicorn.config.timeout_graceful_shutdown = grace_s
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=grace_s + 10)
        self._sock.close()
        self.service.pool.shutdown(wait=False, cancel_futures=True)
