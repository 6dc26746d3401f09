"""Admission control: the limits a request must fit and the refusals. Plain Python, no JAX.

A request is checked twice. `Limits.check` when it is built: a prompt or output that can never fit
raises `RequestTooLarge` (the client must change the request). `Limits.check_room` when it is
queued: a full queue or a client over its share raises `Overloaded` (the client may retry later).
Either way nothing has changed. The scheduler (scheduler.py) applies both.

`max_queue` bounds the requests that must WAIT: those queued beyond the slots that are free now. A
request that will take a free slot at the next step is not waiting, so an idle engine with S slots
admits a burst of S + max_queue requests (queued requests are only moved into slots by the next
step, which is why the count is not simply the queue's length).

`Limits.check_prompt_bytes` refuses a prompt text by its size before it is tokenized: no token
spells more than `token_bytes` bytes of text (the longest vocabulary entry, Tokenizer.max_token_bytes),
so a text of more than max_prompt_tokens × token_bytes bytes has more than max_prompt_tokens tokens.
Tokenizing it first would cost seconds of CPU and gigabytes of memory to learn the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

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

    def check_prompt_bytes(self, n_bytes: int, token_bytes: int | None, field: str = "prompt") -> None:
        """Refuse (RequestTooLarge) a prompt text of `n_bytes` UTF-8 bytes that cannot fit in
        max_prompt_tokens tokens of at most `token_bytes` bytes each (None: the tokenizer gives no
        such bound, and only the token count is checked)."""
        if token_bytes is None:
            return
        most = self.max_prompt_tokens * token_bytes
        if n_bytes > most:
            raise RequestTooLarge(
                f"{field} text is {n_bytes} bytes; the limit is {most} bytes (max_prompt_tokens="
                f"{self.max_prompt_tokens} tokens of at most {token_bytes} bytes each)",
                limit="max_prompt_bytes",
                value=n_bytes,
            )

    def check_room(
        self, req: Request, *, waiting: int, free_slots: int, in_flight: Iterable[Request]
    ) -> None:
        """Refuse a request the server has no room for now (Overloaded): `waiting` requests are
        queued and `free_slots` slots are free (the first `free_slots` queued requests take them at
        the next step: they are not waiting beyond the slots); `in_flight` are all the requests
        queued or in a slot (read only for a per-client limit)."""
        queued = max(0, waiting - free_slots)
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


def prompt_bytes(prompt, chat: bool) -> tuple[int, str]:
    """(UTF-8 bytes, field name) of a prompt's text: a text prompt, or every string of chat messages
    (their roles and contents; the template only adds to them). 0 for token ids or malformed input
    (refused later, by the checks that name the bad field)."""
    if chat and isinstance(prompt, list | tuple):
        texts, field = [t for m in prompt if isinstance(m, dict) for t in m.values()], "messages"
    else:
        texts, field = [prompt], "prompt"
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if isinstance(t, str)), field


def check_sampling(logprobs, stop_token_ids, *, max_logprobs: int, vocab_size: int) -> None:
    """Refuse (ValueError) sampling fields over this engine's limits, quoting them: more log-prob
    alternatives than max_logprobs, a stop token id outside the vocabulary. Other bad values are
    left to SamplingParams, which names its own ranges."""
    is_int = lambda v: isinstance(v, int | np.integer) and not isinstance(v, bool)
    if is_int(logprobs) and logprobs > max_logprobs:
        raise ValueError(
            f"logprobs={logprobs} exceeds max_logprobs={max_logprobs} (an integer in [0, {max_logprobs}])"
        )
    bad = next((t for t in stop_token_ids if is_int(t) and not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(
            f"stop_token_ids contains {bad}, out of range [0, {vocab_size}) (the model's vocabulary size)"
        )
