"""The host arrays of a prefill call of several chunks (Engine.prefill_batch), each chunk
(tokens, start, page_row, sampling, presence): as rows padded to a bucket (programs.prefill_batch)
or packed back to back (programs.prefill_packed). Rows past the chunks are padding: they write
nothing, sample greedily and are never read. And those of a scoring call (Engine.score_batch), each
chunk (tokens, start, page_row, targets, first position read): `score_batched`, `score_packed`."""

from __future__ import annotations

import jax
import numpy as np

from xlaserve.runtime.layout import SCORE_TARGETS
from xlaserve.runtime.sampling import SamplingState


def batched(chunks, t: int, rows: int, width: int, vocab: int) -> tuple:
    """(tokens [rows, t], start, n_valid [rows], page rows [rows, width], sampling, presence)."""
    tokens = np.zeros((rows, t), np.int32)
    start, n_valid = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
    for i, (toks, first, *_) in enumerate(chunks):
        tokens[i, : len(toks)], start[i], n_valid[i] = toks, first, len(toks)
    return (tokens, start, n_valid, *_per_sequence(chunks, rows, width, vocab))


def packed(chunks, n: int, rows: int, width: int, vocab: int) -> tuple:
    """(tokens, positions, sequence [n], real tokens, page rows [rows, width], last [rows], sampling,
    presence): chunk i's tokens follow chunk i - 1's; last[i] is the index of its last token."""
    tokens, positions, seq_of = (np.zeros((n,), np.int32) for _ in range(3))
    last, at = np.zeros((rows,), np.int32), 0
    for i, (toks, first, *_) in enumerate(chunks):
        end = at + len(toks)
        tokens[at:end], positions[at:end], seq_of[at:end] = toks, first + np.arange(len(toks)), i
        at, last[i] = end, end - 1
    table, sampling, presence = _per_sequence(chunks, rows, width, vocab)
    return tokens, positions, seq_of, np.int32(at), table, last, sampling, presence


def _per_sequence(chunks, rows: int, width: int, vocab: int) -> tuple:
    table = np.zeros((rows, width), np.int32)
    presence = np.zeros((rows, vocab), bool)
    sampling = [SamplingState.zeros(1)] * rows
    for i, (_, _, page_row, row_sampling, row_presence) in enumerate(chunks):
        table[i], presence[i], sampling[i] = page_row, row_presence, row_sampling
    return table, jax.tree.map(lambda *rows_: np.concatenate(rows_), *sampling), presence


def score_targets(targets, n: int) -> np.ndarray:
    """A scoring chunk's targets ([<= n] next tokens, or [<= n, K] candidates) as int32
    [n, SCORE_TARGETS], zero-padded."""
    targets = np.asarray(targets, np.int32)
    targets = targets[:, None] if targets.ndim == 1 else targets
    out = np.zeros((n, SCORE_TARGETS), np.int32)
    out[: len(targets), : targets.shape[1]] = targets
    return out


def score_batched(items, t: int, rows: int, width: int) -> tuple:
    """(tokens [rows, t], start, n_valid [rows], page rows [rows, width], targets [rows, t, K])."""
    tokens, nxt = np.zeros((rows, t), np.int32), np.zeros((rows, t, SCORE_TARGETS), np.int32)
    start, n_valid = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
    table = np.zeros((rows, width), np.int32)
    for i, (toks, first, page_row, targets, _) in enumerate(items):
        tokens[i, : len(toks)], nxt[i, : len(toks)] = toks, score_targets(targets, len(toks))
        start[i], n_valid[i], table[i] = first, len(toks), page_row
    return tokens, start, n_valid, table, nxt


def score_packed(items, n: int, s: int, rows: int, width: int) -> tuple:
    """(tokens, positions, sequence [n], real tokens, page rows [rows, width], sel [s], targets
    [s, K]): the chunks packed back to back as `packed`; sel the tokens read, each chunk's from its
    first position read on, in order (then index 0, unread)."""
    tokens, positions, seq_of = (np.zeros((n,), np.int32) for _ in range(3))
    table = np.zeros((rows, width), np.int32)
    sel, targets = np.zeros((s,), np.int32), np.zeros((s, SCORE_TARGETS), np.int32)
    at = read = 0
    for i, (toks, first, page_row, chunk_targets, read_from) in enumerate(items):
        end, k = at + len(toks), len(toks) - read_from
        tokens[at:end], positions[at:end], seq_of[at:end] = toks, first + np.arange(len(toks)), i
        table[i] = page_row
        sel[read : read + k] = np.arange(at + read_from, end)
        targets[read : read + k] = score_targets(chunk_targets, len(toks))[read_from:]
        at, read = end, read + k
    return tokens, positions, seq_of, np.int32(at), table, sel, targets


def score_results(items, parts) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each chunk's (log-probs, is-greedy), shaped as its targets ([n] or [n, K]; zeros before its
    first position read), from its part of a scoring call's output, int32 [positions read, K', 2]."""
    results = []
    for (toks, _, _, targets, first), part in zip(items, parts, strict=True):
        k = 1 if np.ndim(targets) < 2 else np.shape(targets)[1]
        lp, greedy = np.zeros((len(toks), k), np.float32), np.zeros((len(toks), k), bool)
        lp[first:], greedy[first:] = part[:, :k, 0].view(np.float32), part[:, :k, 1].astype(bool)
        results.append((lp[:, 0], greedy[:, 0]) if np.ndim(targets) < 2 else (lp, greedy))
    return results
