"""Server-sent events for the OpenAI API: `data: <json>` frames, the closing `data: [DONE]`, and the
deltas of several engine streams merged into one sequence (n choices stream together)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence

from xlaserve.runtime.engine_loop import Stream
from xlaserve.runtime.request import Delta

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def merge(streams: Sequence[Stream]) -> AsyncIterator[tuple[int, Delta]]:
    """(stream index, delta) from every stream as they arrive, each stream's in order, until all
    have ended. A stream's error is raised here; closing this generator stops reading them all."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: Stream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        except Exception as e:
            queue.put_nowait((i, e))
        else:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
