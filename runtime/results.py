"""Host views of the device programs' packed int32 results (programs.pack): a row is [token,
bitcast(logprob), top ids (N), bitcast(top logprobs) (N)]. numpy only: the scheduler side reads them
without JAX."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampled:
    """Host view of packed results; leading dims [...] as packed (e.g. [steps, slots])."""

    tokens: np.ndarray  # [...] int32
    logprobs: np.ndarray  # [...] float32
    top_ids: np.ndarray  # [..., N] int32
    top_logprobs: np.ndarray  # [..., N] float32

    @staticmethod
    def unpack(packed: np.ndarray) -> Sampled:
        packed = np.asarray(packed, np.int32)
        n = (packed.shape[-1] - 2) // 2
        return Sampled(
            tokens=packed[..., 0],
            logprobs=packed[..., 1].view(np.float32),
            top_ids=packed[..., 2 : 2 + n],
            top_logprobs=packed[..., 2 + n :].view(np.float32),
        )


@dataclass(frozen=True)
class Verified:
    """Host view of `verify`'s packed result [R, 1 + (K+1) C]: per row the count emitted, then K+1
    `pack` rows (the first `emitted` are the output; the rest, and idle rows, are padding)."""

    emitted: np.ndarray  # [R] int32: 1 .. n_proposed + 1 for an active slot, 0 for an idle one
    sampled: Sampled  # leading dims [R, K+1]
    # float32 [R, K+1, D]: the states before the final norm at each position run (an engine built
    # for a draft head; else None); only a row's first `emitted` are the sequence's
    features: np.ndarray | None = None

    @staticmethod
    def unpack(packed: np.ndarray, k: int, features: np.ndarray | None = None) -> Verified:
        packed = np.asarray(packed, np.int32)
        rows = packed.shape[0]
        return Verified(packed[:, 0], Sampled.unpack(packed[:, 1:].reshape(rows, k + 1, -1)), features)

    def tokens(self, row: int) -> list[int]:
        return self.sampled.tokens[row, : self.emitted[row]].tolist()

    def logprobs(self, row: int) -> np.ndarray:
        return self.sampled.logprobs[row, : self.emitted[row]]
