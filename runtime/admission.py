"""Admission control: the limits a request must fit and the refusals. Plain Python, no JAX.

A request is checked twice. `Limits.check` when it is built: a prompt or output that can never fit
raises `RequestTooLarge` (the client must change the request). `Limits.check_room` when it is
queued: a full queue or a client over its share raises `Overloaded` (the client may retry later).
Either way nothing has changed. The scheduler (scheduler.py) applies both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xlaserve.runtime.request import Request


class Rejected(Exception):
    """A request refused at admission. `limit` names the limit, `value` what the request asked."""

    def __init__(self, message: str, *, limit: str, value):
        super().__init__(message)
        self.limit, self.value = limit, value


class RequestTooLarge(Rejected, ValueError):
    """The request can never fit (prompt or output too long): the client must change it."""


class Overloaded(Rejected):
    """The server is full right now (queue, per-client limit): the client may retry later."""


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    max_model_len: int
    max_queue: int
    max_per_client: int | None = None

    def check(self, req: Request) -> None:
        """Refuse a request that can never run (RequestTooLarge)."""
        n, new = len(req.prompt_ids), req.params.max_tokens
        if n > self.max_prompt_tokens:
            raise RequestTooLarge(
                f"prompt has {n} tokens; the limit is {self.max_prompt_tokens}",
                limit="max_prompt_tokens",
                value=n,
            )
        if new > self.max_new_tokens:
            raise RequestTooLarge(
                f"max_tokens={new} exceeds the limit of {self.max_new_tokens}",
                limit="max_new_tokens",
                value=new,
            )
        if n + new > self.max_model_len:
            raise RequestTooLarge(
                f"prompt ({n} tokens) + max_tokens ({new}) = {n + new} exceeds the context of "
                f"{self.max_model_len} tokens",
                limit="max_model_len",
                value=n + new,
            )

    def check_room(self, req: Request, *, queued: int, in_flight: Iterable[Request]) -> None:
        """Refuse a request the server has no room for now (Overloaded): `queued` requests wait,
        `in_flight` are all the requests queued or in a slot (read only for a per-client limit)."""
        if queued >= self.max_queue:
            raise Overloaded(
                f"the queue is full ({self.max_queue} requests waiting)",
                limit="max_queue",
                value=queued + 1,
            )
        if self.max_per_client is not None and req.client_id is not None:
            mine = sum(1 for r in in_flight if r.client_id == req.client_id)
            if mine >= self.max_per_client:
                raise Overloaded(
                    f"client {req.client_id!r} already has {mine} requests in flight; the limit is "
                    f"{self.max_per_client}",
                    limit="max_per_client",
                    value=mine + 1,
                )
