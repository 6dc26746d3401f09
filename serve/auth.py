"""API keys: `authorization: Bearer <key>` metadata checked by a server interceptor. Health checks
and reflection stay open (probes carry no keys)."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def load_keys(key_file: str | None = None, env_var: str | None = "XLASERVE_API_KEYS") -> tuple[str, ...]:
    """Keys from a file (one per line, '#' comments) and/or an environment variable (comma-separated)."""
    keys = []
    if key_file:
        for line in Path(key_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    if env_var and os.environ.get(env_var):
        keys += [k.strip() for k in os.environ[env_var].split(",") if k.strip()]
    return tuple(keys)


def key_id(key: str) -> str:
    """A stable, non-secret name for a key (used as the client id for per-client limits)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer(metadata) -> str | None:
    for k, v in metadata or ():
        if k.lower() == "authorization" and v.startswith("Bearer "):
            return v[len("Bearer ") :].strip()
    return None


class ApiKeyInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys):
        self._keys = [k.encode() for k in keys]

    def _valid(self, key: str | None) -> bool:
        return key is not None and any(hmac.compare_digest(key.encode(), k) for k in self._keys)

    def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_SERVICES):
            return continuation(details)
        key = bearer(details.invocation_metadata)
        if self._valid(key):
            return continuation(details)
        message = (
            "missing API key (metadata 'authorization: Bearer <key>')" if key is None else "invalid API key"
        )
        handler = continuation(details)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        def deny_stream(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - abort raises

        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)
