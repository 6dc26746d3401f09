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


@dataclass
class Row:
    """One scored sequence standing for several requests (`share_rows`): tokens, the first index
    any of them scores, and the other candidates per index (Request.score_alts)."""

    tokens: list[int]
    start: int
    alts: dict[int, tuple[int, ...]]


def share_rows(items: Sequence[tuple[Sequence[int], int]], max_alts: int) -> tuple[list[Row], list[int]]:
    """Rows that score every (tokens, start) item, and the row of each item.

    Item (s, k) needs the log-probs of s[k:], i.e. the logits after s[:k], ..., s[:-1]. Any row that
    starts with s[:-1] holds them (causal attention: a position's logits depend only on the tokens
    up to it), its last token s[-1] being either the row's own token at that index or one more
    candidate there, read from the same logits. So the continuations of one context whose all but
    last tokens agree (every one-token answer of a multiple-choice question) cost one row instead
    of one each. Items are placed longest first; a radix tree (a trie over tokens) finds a row
    starting with s[:-1] in O(len(s)); an index takes at most `max_alts` candidates, after which
    a new row is started. Returns (rows, row index per item)."""
    trie: dict = {}  # token -> child node; key None: the latest row through this node
    rows: list[Row] = []
    where = [0] * len(items)
    for i in sorted(range(len(items)), key=lambda i: -len(items[i][0])):
        tokens, start = list(items[i][0]), items[i][1]
        node, last = trie, len(tokens) - 1
        for t in tokens[:last]:
            node = node.get(t)
            if node is None:
                break
        r = None if node is None else node.get(None)
        if r is not None and not _takes(rows[r], last, tokens[last], max_alts):
            r = None
        if r is None:  # a row of its own, findable by every prefix of it
            r, node = len(rows), trie
            rows.append(Row(tokens, start, {}))
            for t in tokens:
                node = node.setdefault(t, {})
                node[None] = r
        row = rows[r]
        row.start = min(row.start, start)
        if not (last < len(row.tokens) and row.tokens[last] == tokens[last]):
            got = row.alts.get(last, ())
            row.alts[last] = got if tokens[last] in got else (*got, tokens[last])
        where[i] = r
    return rows, where


def _takes(row: Row, index: int, token: int, max_alts: int) -> bool:
    """Whether `row` can score `token` at `index` (its own token there, or room for a candidate)."""
    got = row.alts.get(index, ())
    own = index < len(row.tokens) and row.tokens[index] == token
    return own or token in got or len(got) < max_alts


def read_row(tokens: Sequence[int], start: int, row: Row, req: Request) -> ScoreResult:
    """An item's result out of its row's finished request (`share_rows`)."""
    lps, greedy = [], []
    for p in range(start, len(tokens)):
        if p < len(row.tokens) and row.tokens[p] == tokens[p]:
            lp, g = req.scores[p - row.start]
        else:
            lp, g = req.alt_scores[p, tokens[p]]
        lps.append(lp)
        greedy.append(g)
    return ScoreResult(list(tokens[start:]), lps, greedy)


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
