"""The host arrays of a prefill call of several chunks (Engine.prefill_batch), each chunk
(tokens, start, page_row, sampling, presence): as rows padded to a bucket (programs.prefill_batch)
or packed back to back (programs.prefill_packed). Rows past the chunks are padding: they write
nothing, sample greedily and are never read."""

from __future__ import annotations

import jax
import numpy as np

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
