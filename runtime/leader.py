"""Process 0 leads, the others follow: engine calls replayed across hosts (`jax.distributed`).

Every process runs the same programs in the same order (SPMD), each on its own devices of one global
mesh. Process 0 owns the scheduler and the server and decides every step; each engine call it makes
(prefill, prefill_batch, insert, decode, verify, free, score_batch, copy_pages, with the host data
they take) is published to the coordinator's key-value store, and the other processes replay the
calls in order on their engines. A call's device results never travel: a later call that takes one
(insert takes prefill's packed result) names it by call number, and each process substitutes its own
copy.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass

import numpy as np

from xlaserve.runtime.engine import to_host

log = logging.getLogger("xlaserve")
VERBS = ("prefill", "prefill_batch", "insert", "decode", "verify", "free", "score_batch", "copy_pages")
PREFILLS = ("prefill", "prefill_batch")  # their results are arguments of later calls (insert)
KEY = "xlaserve/call/{}"


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized (see xlaserve.sharding.multihost.initialize)")
    return client


@dataclass(frozen=True)
class Result:
    """The device result of call number `call`, as an argument of a later call."""

    call: int


class LeaderEngine:
    """Process 0's engine: does each call and publishes it for the followers."""

    def __init__(self, engine):
        self.engine, self._client, self._n = engine, _client(), 0
        self._results: dict[int, int] = {}  # id(result) -> call number

    def __getattr__(self, name):
        attr = getattr(self.engine, name)
        if name not in VERBS:
            return attr

        def call(*args):
            sent = tuple(Result(self._results[id(a)]) if id(a) in self._results else a for a in args)
            self._client.key_value_set_bytes(KEY.format(self._n), pickle.dumps((name, sent)))
            out = attr(*args)
            if name in PREFILLS:
                self._results = {k: v for k, v in self._results.items() if v >= self._n - 64}
                self._results[id(out)] = self._n
            self._n += 1
            return out

        return call

    def stop(self) -> None:
        self._client.key_value_set_bytes(KEY.format(self._n), pickle.dumps(("stop", ())))


def follow(engine, timeout_s: float = 24 * 3600) -> int:
    """Replay the leader's calls until it stops; returns how many ran."""
    client, n, results = _client(), 0, {}
    while True:
        verb, args = pickle.loads(client.blocking_key_value_get_bytes(KEY.format(n), int(timeout_s * 1000)))
        if n >= 1:
            client.key_value_delete(KEY.format(n - 1))
        if verb == "stop":
            return n
        out = getattr(engine, verb)(*(results[a.call] if isinstance(a, Result) else a for a in args))
        if verb in PREFILLS:
            results[n] = out
            results.pop(n - 64, None)
        elif verb == "decode":
            np.asarray(to_host(out[0] if isinstance(out, tuple) else out))  # keep pace with the leader
        n += 1
