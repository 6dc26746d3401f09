"""Scoring on the host: `ScoreResult` (the log-probs of a request's scored tokens) and the rolling
windows that score a whole text (perplexity). No JAX here.

`rolling_windows` cuts a token list the way lm-evaluation-harness does for loglikelihood_rolling:
`lm_eval.utils.get_rolling_token_windows(ids, prefix_token, max_seq_len=window, context_len=1)`,
each window then made disjoint by `make_disjoint_window` (tests/test_evals.py checks they agree).
The first window predicts the first `window` tokens given `prefix_token`; each later one predicts the
next `window` tokens given the token before them, and the last (shorter) one is given a full window
of context, so every token is scored exactly once with as much context as fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from xlaserve.runtime.request import Request


@dataclass(frozen=True)
class ScoreResult:
    """Log-probabilities of the scored tokens, each given everything before it."""

    token_ids: list[int]
    logprobs: list[float]
    is_greedy: list[bool]  # the token was the model's argmax

    @property
    def sum_logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def all_greedy(self) -> bool:
        return all(self.is_greedy)

    @staticmethod
    def of(req: Request) -> ScoreResult:
        """The result of a finished scoring request (prompt_ids[score_start:] scored)."""
        return ScoreResult(
            token_ids=list(req.prompt_ids[req.score_start :]),
            logprobs=[lp for lp, _ in req.scores],
            is_greedy=[g for _, g in req.scores],
        )

    @staticmethod
    def concat(parts: Sequence[ScoreResult]) -> ScoreResult:
        """Consecutive pieces of one text (its rolling windows) as one result."""
        return ScoreResult(
            [t for p in parts for t in p.token_ids],
            [x for p in parts for x in p.logprobs],
            [g for p in parts for g in p.is_greedy],
        )


def rolling_windows(ids: Sequence[int], window: int, prefix_token: int) -> list[tuple[list[int], int]]:
    """(tokens, start) pieces that together score every token of `ids` once, `window` at a time:
    each piece scores tokens[start:] given tokens[:start], in at most window + 1 tokens. None for
    an empty text."""
    ids = list(ids)
    pieces = [([prefix_token, *ids[:window]], 1)] if ids else []
    done = min(window, len(ids))
    while done < len(ids):
        end = min(done + window, len(ids))
        pieces.append((ids[end - window - 1 : end], window + 1 - (end - done)))
        done = end
    return pieces
