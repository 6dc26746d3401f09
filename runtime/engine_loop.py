"""The engine on a background thread: submit, stream, cancel and drain from any thread.

One thread owns the runner and steps it while there is work; callers hold a `Stream` per request
that yields its deltas. Admission happens in the caller's thread (a refusal raises there, nothing is
queued), under the same lock that guards a step, so it waits at most one step. Draining stops
admission and lets running requests finish; `close()` cancels whatever is left.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time

from xlaserve.runtime.admission import Overloaded
from xlaserve.runtime.request import Delta, FinishReason, Request
from xlaserve.runtime.runner import Runner
from xlaserve.runtime.stats import EngineStats

log = logging.getLogger("xlaserve")


class Draining(Overloaded):
    """The engine is shutting down and admits nothing new."""


class EngineFailed(RuntimeError):
    pass


class Stream:
    """Deltas of one request, in order, ending with the one whose request is finished."""

    def __init__(self, request: Request, loop: EngineLoop):
        self.request, self._loop = request, loop
        self._queue: queue.Queue = queue.Queue()

    def _put(self, item) -> None:
        self._queue.put(item)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def cancel(self) -> None:
        self._loop.cancel(self.request.request_id)


class EngineLoop:
    def __init__(self, runner: Runner, *, idle_wait_s: float = 0.05):
        self.runner = runner
        self._lock = threading.Condition()
        self._streams: dict[str, Stream] = {}
        self._draining = False
        self._stopped = False
        self.error: BaseException | None = None
        self._idle_wait_s = idle_wait_s
        self._thread = threading.Thread(target=self._run, name="xlaserve-engine", daemon=True)
        self._thread.start()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._stopped

    def submit(self, req: Request) -> Stream:
        """Admit `req` or raise (RequestTooLarge, Overloaded, Draining, EngineFailed)."""
        with self._lock:
            if self.error is not None:
                raise EngineFailed(f"the engine failed: {self.error!r}")
            if self._draining or self._stopped:
                raise Draining(
                    "the server is draining and accepts no new requests", limit="draining", value=1
                )
            self.runner.submit(req)
            stream = self._streams[req.request_id] = Stream(req, self)
            self._lock.notify()
        return stream

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        with self._lock:
            req = self.runner.cancel(request_id, reason)
            stream = self._streams.pop(request_id, None)
        if stream is not None and req is not None:
            stream._put(Delta(req, [], "", [], finished=True))

    def stats(self) -> EngineStats:
        with self._lock:
            return dataclasses.replace(self.runner.stats(), draining=self._draining)

    def stop_admitting(self) -> None:
        with self._lock:
            self._draining = True

    def drain(self, grace_s: float) -> bool:
        """Stop admitting; wait up to grace_s for running requests. True if all finished."""
        self.stop_admitting()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._streams:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        """Cancel what is left and stop the thread."""
        with self._lock:
            self._draining = True
            ids = list(self._streams)
        for request_id in ids:
            self.cancel(request_id)
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self.runner.busy:
                    self._lock.wait(self._idle_wait_s)
                if self._stopped:
                    return
                try:
                    deltas = self.runner.step()
                except BaseException as e:  # a bug or a device failure: fail every stream, loudly
                    log.exception("engine step failed")
                    self.error = e
                    streams, self._streams = list(self._streams.values()), {}
                    for s in streams:
                        s._put(EngineFailed(f"the engine failed: {e!r}"))
                    return
                routed = []
                for d in deltas:
                    stream = self._streams.get(d.request.request_id)
                    if stream is not None:
                        routed.append((stream, d))
                        if d.finished:
                            del self._streams[d.request.request_id]
            for stream, d in routed:
                stream._put(d)
