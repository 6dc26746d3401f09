"""API keys: `authorization: Bearer <key>` metadata, checked by the transport guard (guards.py) before
any handler runs. Health checks and reflection stay open (probes carry no keys); their streams have
their own cap there, so unauthenticated clients cannot take what keyed clients need."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

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


class Keys:
    """The accepted keys; `check` compares in constant time (no timing leak about which key)."""

    def __init__(self, keys):
        self._keys = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def check(self, metadata) -> str | None:
        """None when the metadata carries an accepted key, else why not (the UNAUTHENTICATED message)."""
        key = bearer(metadata)
        if key is None:
            return "missing API key (metadata 'authorization: Bearer <key>')"
        digest = hashlib.sha256(key.encode()).digest()  # equal lengths; every key compared
        if not any([hmac.compare_digest(digest, k) for k in self._keys]):
            return "invalid API key"
        return None


def client_identity(metadata, keys_on: bool) -> str | None:
    """Who a request counts against for the per-client limit. With keys on it is the key (the guard
    has checked it), and `x-client-id` cannot override it: a tenant could otherwise multiply its own
    share or spend another's. Without keys, `x-client-id` names the client (nothing is verified)."""
    if keys_on:
        key = bearer(metadata)
        return key_id(key) if key else None
    for k, v in metadata or ():
        if k.lower() == "x-client-id" and v:
            return v
    return None
