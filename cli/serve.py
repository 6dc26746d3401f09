"""`xlaserve serve`: serve the model over gRPC (xlaserve.v1.Generation, health, reflection) and/or the
OpenAI-compatible HTTP API (--http-port), over one engine loop, with optional TLS, API keys and
Prometheus metrics; drains running streams on SIGTERM/SIGINT."""

from __future__ import annotations

from xlaserve.checkpoints import registry
from xlaserve.cli.common import (
    Progress,
    add_engine_args,
    engine_kwargs,
    finish_cluster,
    follow,
    join_cluster,
    read_bytes,
)
from xlaserve.serve.limits import MAX_MESSAGE_BYTES, MAX_OPEN_STREAMS, MAX_SCORE_ITEMS, WORKER_THREADS

GRPC_PORT = 50051


def _servers(args, keys, names, tls, progress):
    """(the gRPC server or None, the HTTP server or None), started, health still not serving."""
    from xlaserve.serve.server import Server

    server = http = None
    if args.port is not None or args.http_port is None:  # --http-port alone: HTTP only
        server = Server(
            host=args.host,
            port=GRPC_PORT if args.port is None else args.port,
            tls=tls,
            api_keys=keys,
            worker_threads=args.worker_threads,
            max_open_streams=args.max_open_streams,
            max_score_items=args.max_score_items,
            max_message_bytes=args.max_message_bytes,
            model_names=names,
        ).start()
        progress(
            f"listening on {args.host}:{server.port} ({'TLS' if tls else 'plaintext'}"
            f"{', API keys required' if keys else ''}); health NOT_SERVING until the model is compiled"
        )
    metrics_host = args.metrics_host or args.host
    if args.http_port is not None:
        from xlaserve.serve.http_server import HttpServer

        extra = {} if args.max_body_bytes is None else {"max_body_bytes": args.max_body_bytes}
        origins = [o.strip() for o in (args.cors_origins or "").split(",") if o.strip()]
        # GET /metrics on the API port only where the metrics endpoint already is (same host).
        route = args.metrics_port is not None and args.http_host == metrics_host
        http = HttpServer(
            host=args.http_host,
            port=args.http_port,
            api_keys=keys,
            metrics=server.metrics if server else None,
            model_names=names,
            worker_threads=args.worker_threads,
            cors_origins=origins,
            metrics_route=route,
            tls_files=(args.tls_key, args.tls_cert) if tls else None,
            **extra,
        ).start()
        progress(
            f"OpenAI-compatible HTTP API on {http.url}/v1{' (API keys required)' if keys else ''}"
            f"{'; CORS for ' + ', '.join(origins) if origins else ''}; /health 503 until the model "
            "is compiled"
        )
    if args.metrics_port is not None:
        (server or http).metrics.serve(args.metrics_port, metrics_host)
        progress(f"Prometheus metrics on http://{metrics_host}:{args.metrics_port}/metrics (no auth)")
    return server, http


def cmd_serve(args) -> int:
    import signal
    import threading

    from xlaserve.llm import LLM
    from xlaserve.runtime.models.params import weight_bytes
    from xlaserve.serve.auth import load_keys

    if join_cluster(args):
        return follow(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    tls = (read_bytes(args.tls_key), read_bytes(args.tls_cert)) if args.tls_cert else None
    keys = load_keys(args.api_key_file, args.api_keys_env)
    progress = Progress()
    names = (args.model, registry.DEFAULT_MODEL) if args.model == registry.DEFAULT_MODEL else (args.model,)
    server, http = _servers(args, keys, names, tls, progress)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    llm = LLM(args.model, progress=progress, mesh=args.mesh, **engine_kwargs(args))
    names = (*names, llm.config.name)
    loop = None
    if server is not None:
        server.service.model_names, server.service.mesh = names, llm.describe_mesh()
        loop = server.attach(llm)
    if http is not None:
        http.service.model_names = names
        loop = http.attach(llm, loop)
    e, ecfg = llm.engine, llm.engine_config
    weights_mb = weight_bytes(e.weights) / 2**20
    kv_mb = weight_bytes(e.cache) / 2**20
    compile_s = sum(e.compile_seconds.values())
    progress.done(
        f"SERVING {llm.config.name} ({llm.quantization}, {ecfg.dtype}) on {llm.describe_mesh()}; "
        f"{ecfg.max_slots} slots x {ecfg.max_model_len} tokens; weights {weights_mb:.0f} MiB, "
        f"KV cache {kv_mb:.0f} MiB; load {llm.load_seconds:.1f}s, compile {compile_s:.1f}s"
    )
    stop.wait()
    for s in (server, http):
        if s is not None:
            s.begin_drain()
    progress(f"draining: no new requests; {args.grace_period:.0f}s for running streams")
    finished = loop.drain(args.grace_period)
    for s in (server, http):  # the gRPC server closes the shared loop first: HTTP streams get an error event
        if s is not None:
            s.stop(grace_s=1.0)
    finish_cluster(llm)
    progress.done("stopped" + ("" if finished else " (grace period over: remaining streams cancelled)"))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over gRPC (xlaserve.v1.Generation, health, reflection) and/or an "
        "OpenAI-compatible HTTP API",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address the gRPC server binds (default: loopback only)"
    )
    p.add_argument(
        "--port",
        type=int,
        help=f"gRPC port (default {GRPC_PORT}; with --http-port and no --port, gRPC is off)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        help="serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions, "
        "/health) on this port, beside gRPC when --port is given too, alone otherwise",
    )
    p.add_argument(
        "--http-host", default="127.0.0.1", help="address the HTTP API binds (default: loopback only)"
    )
    p.add_argument(
        "--cors-origins",
        help="comma-separated browser origins the HTTP API allows (CORS); default: none, no CORS headers",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest HTTP request body; larger ones get 413 (default: 4 MiB)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics over plain HTTP on this port; the endpoint has no "
        "authentication and binds --metrics-host (default: --host), so keep it where only operators reach. "
        "The HTTP API then also answers GET /metrics (no key) when --http-host is that same host",
    )
    p.add_argument("--metrics-host", help="address the metrics endpoint binds (default: --host)")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key); gRPC and the HTTP API use it")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--api-key-file", help="file of accepted API keys, one per line")
    p.add_argument(
        "--api-keys-env", default="XLASERVE_API_KEYS", help="env var with comma-separated API keys"
    )
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds running streams get on SIGTERM")
    p.add_argument(
        "--worker-threads",
        "--max-workers",
        type=int,
        default=WORKER_THREADS,
        help="threads that tokenize prompts and build requests off the event loop (streams hold none; "
        "there is no cap on concurrent RPCs: streams queue in --max-queue). --max-workers is the old name",
    )
    p.add_argument(
        "--max-open-streams",
        type=int,
        default=MAX_OPEN_STREAMS,
        help="concurrent health Watch and reflection streams (open without an API key); "
        "RESOURCE_EXHAUSTED past it, and nothing else shares this cap",
    )
    p.add_argument(
        "--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES, help="largest request or response"
    )
    p.add_argument(
        "--max-score-items", type=int, default=MAX_SCORE_ITEMS, help="items one Score request may hold"
    )
    p.add_argument(
        "--max-queue", type=int, help="requests waiting for a slot before RESOURCE_EXHAUSTED (HTTP: 429)"
    )
    p.add_argument(
        "--max-per-client",
        type=int,
        help="requests in flight per client: its API key when keys are on (x-client-id is then "
        "ignored), else its x-client-id (an HTTP header too)",
    )
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)
