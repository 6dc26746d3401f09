"""The engine on a background thread: submit, stream, cancel and drain from any thread or event loop.

One thread owns the runner: only it calls the runner (submit, cancel, step, stats), so nothing else
ever waits for a step. Callers hand it commands through an inbox (a short lock that a step never
holds) and hold a `Stream` per request. A submission is admitted or refused by the engine thread
before its next step (`Stream.admitted`; `submit` waits for that and raises the refusal, nothing is
queued). Stats are a snapshot the engine thread publishes after every step, so reading them never
waits either. A stream is read from a thread (`for`) or from an asyncio event loop (`async for`,
when submitted with `submit_nowait(req, loop)`): the engine thread hands an event loop a step's
items in one `call_soon_threadsafe`, and no thread is parked per stream. Draining stops admission
and lets running requests finish; `close()` cancels whatever is left.

A burst of requests to an idle engine goes in one step (`settle_s`): after the first submission the
engine thread waits until none has arrived for settle_s (at most settle_max_s) before it plans.
Without it the first request of a burst gets a step of its own: the engine thread wakes at once and
plans in Python while the server's event loop, which parses the others, waits for the GIL (up to its
5 ms switch interval), so the rest wait for that step and then take one more (measured: 8 clients
sending at once, 1 request in the first step, 7 in a second 20 ms later).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future

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

    def __init__(self, request: Request, loop: EngineLoop, aio: asyncio.AbstractEventLoop | None = None):
        self.request, self._loop, self._aio = request, loop, aio
        # Resolved by the engine thread: None (admitted) or the refusal. Marked running so that an
        # asyncio waiter that is cancelled cannot cancel it: the engine thread always decides.
        self.admitted: Future = Future()
        self.admitted.set_running_or_notify_cancel()
        self._queue = queue.SimpleQueue() if aio is None else asyncio.Queue()
        self.ended = False  # the consumer has read the last delta

    def __iter__(self):
        self.admitted.result()
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                self.ended = True
                return

    async def admission(self) -> None:
        """Wait (in the stream's event loop) until the engine admits the request; raise its refusal."""
        await asyncio.wrap_future(self.admitted)

    async def __aiter__(self):
        await self.admission()
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                self.ended = True
                return

    def cancel(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """End the request (no-op once it has ended, or if it was refused)."""
        self._loop._command(("cancel", self, reason))


async def merge(streams: Sequence[Stream]) -> AsyncIterator[tuple[int, Delta]]:
    """(stream index, delta) from every stream as they arrive, each stream's in order, until all
    have ended. A stream's error is raised here; closing this generator stops reading them all."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    arrived: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: Stream) -> None:
        try:
            async for delta in stream:
                arrived.put_nowait((i, delta))
        except Exception as e:
            arrived.put_nowait((i, e))
        else:
            arrived.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await arrived.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _put_all(items) -> None:
    for stream, item in items:
        stream._queue.put_nowait(item)


class EngineLoop:
    def __init__(
        self,
        runner: Runner,
        *,
        idle_wait_s: float = 0.05,
        settle_s: float = 0.002,
        settle_max_s: float = 0.01,
        on_finished: Callable[[Request], None] | None = None,
    ):
        self.runner = runner
        self.on_finished = on_finished  # called on the engine thread for every request that ends
        self._lock = threading.Condition()
        self._inbox: list[tuple] = []
        self._streams: dict[str, Stream] = {}  # engine thread only
        self._open = 0  # admitted streams not yet ended (published with the stats)
        self._working = False  # the engine thread holds commands it has not published yet
        self._stats = runner.stats()
        self._draining = self._closing = self._stopped = False
        self.error: BaseException | None = None
        self._idle_wait_s = idle_wait_s
        self._settle_s, self._settle_max_s = settle_s, settle_max_s
        self._thread = threading.Thread(target=self._run, name="xlaserve-engine", daemon=True)
        self._thread.start()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._stopped

    def submit_nowait(self, req: Request, aio: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Hand `req` to the engine; the stream's `admitted` says whether it got in. Raises at once
        when nothing can be admitted (Draining, EngineFailed)."""
        stream = Stream(req, self, aio)
        with self._lock:
            if self.error is not None:
                raise EngineFailed(f"the engine failed: {self.error!r}")
            if self._draining or self._closing:
                raise Draining(
                    "the server is draining and accepts no new requests", limit="draining", value=1
                )
            self._inbox.append(("submit", stream))
            self._lock.notify()
        return stream

    def submit(self, req: Request) -> Stream:
        """Admit `req` or raise (RequestTooLarge, Overloaded, Draining, EngineFailed, ValueError)."""
        stream = self.submit_nowait(req)
        stream.admitted.result()
        return stream

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """End the request with this id, if it is running (before the engine's next step)."""
        self._command(("cancel_id", request_id, reason))

    def _command(self, cmd: tuple) -> None:
        with self._lock:
            self._inbox.append(cmd)
            self._lock.notify()

    def stats(self) -> EngineStats:
        """The snapshot published after the last step (never waits for a step)."""
        with self._lock:
            return dataclasses.replace(self._stats, draining=self._draining)

    def stop_admitting(self) -> None:
        with self._lock:
            self._draining = True

    def drain(self, grace_s: float) -> bool:
        """Stop admitting; wait up to grace_s for running requests. True if all finished."""
        self.stop_admitting()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not (self._open or self._inbox or self._working):
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        """Cancel what is left and stop the thread."""
        with self._lock:
            self._draining = self._closing = True
            self._lock.notify()
        self._thread.join(timeout=10)
        self._stopped = True

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        closing = False
        while not closing:
            with self._lock:
                while not (self._inbox or self._closing or self.runner.busy):
                    self._lock.wait(self._idle_wait_s)
                if not self.runner.busy:
                    self._settle()
                inbox, self._inbox, closing = self._inbox, [], self._closing
                self._working = True
            out: list[tuple[Stream, object]] = []
            try:
                for cmd in inbox:
                    self._apply(cmd, out)
                if closing:
                    for stream in list(self._streams.values()):
                        self._cancel(stream, FinishReason.CANCELLED, out)
                elif self.runner.busy:
                    self._route(self.runner.step(), out)
            except BaseException as e:  # a bug or a device failure: fail every stream, loudly
                log.exception("engine step failed")
                with self._lock:
                    self.error = e
                for stream in self._streams.values():
                    out.append((stream, EngineFailed(f"the engine failed: {e!r}")))
                self._streams.clear()
                closing = True
            self._publish(closing)
            self._deliver(out)

    def _settle(self) -> None:
        """(Holding the lock, the engine idle.) Wait while submissions keep arriving: until none has
        for settle_s, at most settle_max_s in all."""
        deadline, seen = time.monotonic() + self._settle_max_s, len(self._inbox)
        while not self._closing and seen and (left := deadline - time.monotonic()) > 0:
            self._lock.wait(min(self._settle_s, left))
            if len(self._inbox) == seen:
                return
            seen = len(self._inbox)

    def _apply(self, cmd: tuple, out: list) -> None:
        kind = cmd[0]
        if kind == "submit":
            stream = cmd[1]
            try:
                self.runner.submit(stream.request)
            except Exception as e:  # refused (Rejected, a duplicate id): nothing was queued
                stream.admitted.set_exception(e)
                return
            self._streams[stream.request.request_id] = stream
            stream.admitted.set_result(None)
        else:
            key, reason = cmd[1], cmd[2]
            request_id = key if kind == "cancel_id" else key.request.request_id
            stream = self._streams.get(request_id)
            if stream is not None and (kind == "cancel_id" or stream is key):
                self._cancel(stream, reason, out)

    def _cancel(self, stream: Stream, reason: FinishReason, out: list) -> None:
        req = self.runner.cancel(stream.request.request_id, reason)
        del self._streams[stream.request.request_id]
        if req is not None:
            out.append((stream, Delta(req, [], "", [], finished=True)))
            self._finished(req)

    def _route(self, deltas: list[Delta], out: list) -> None:
        for d in deltas:
            stream = self._streams.get(d.request.request_id)
            if stream is not None:
                out.append((stream, d))
                if d.finished:
                    del self._streams[d.request.request_id]
                    self._finished(d.request)

    def _finished(self, req: Request) -> None:
        if self.on_finished is not None:
            try:
                self.on_finished(req)
            except Exception:  # metrics must never stop the engine
                log.exception("on_finished failed")

    def _publish(self, exiting: bool) -> None:
        stats = self._stats if self.error is not None else self.runner.stats()
        with self._lock:
            self._stats, self._open, self._working = stats, len(self._streams), False
            if exiting:  # whatever arrived since is refused, so no caller waits forever
                self._stopped = True
                left, self._inbox = self._inbox, []
                error = EngineFailed(f"the engine failed: {self.error!r}") if self.error else None
        if exiting:
            for cmd in left:
                if cmd[0] == "submit":
                    cmd[1].admitted.set_exception(
                        error or Draining("the server is shutting down", limit="draining", value=1)
                    )

    @staticmethod
    def _deliver(out: list) -> None:
        """Hand each stream its items: a thread's queue directly, an event loop's in one callback."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in out:
            if stream._aio is None:
                stream._queue.put(item)
            else:
                by_loop.setdefault(stream._aio, []).append((stream, item))
        for aio, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody reads those streams
                aio.call_soon_threadsafe(_put_all, items)
