"""Engine: owns the device state and the compiled programs; executes what the scheduler decides.

Verbs over integer slots (JetStream's contract): `prefill` a prompt chunk into pages, `insert` a
prefilled sequence into a slot, `generate` one dispatch of k decode steps for every slot, `free` a
slot. Every program is compiled ahead of time in the constructor, so no request can trigger a
compile; JAX's persistent compilation cache makes later start-ups fast.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime import llama, programs, quant
from xlaserve.runtime.attention import KVCache
from xlaserve.runtime.config import EngineConfig, Kernels, ModelConfig
from xlaserve.runtime.programs import DecodeState, Sampled, Statics
from xlaserve.runtime.sampling import SamplingState

log = logging.getLogger("xlaserve")


def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: llama.Weights,
        engine_cfg: EngineConfig,
        *,
        progress: Callable[[str], None] | None = None,
    ):
        self.cfg = cfg
        self.ecfg = ecfg = engine_cfg.resolve(cfg, jax.default_backend())
        backend = jax.default_backend()
        kernels = Kernels(attention=ecfg.attention_impl, matmul=ecfg.matmul_impl, interpret=backend == "cpu")
        self.st = Statics(
            cfg=cfg, block=ecfg.attn_block, dtype=ecfg.dtype, max_top=ecfg.max_logprobs, kernels=kernels
        )
        self.weights = jax.device_put(quant.for_backend(weights, backend, ecfg.matmul_impl))
        shape = (cfg.num_layers, ecfg.total_pages, ecfg.page_size, cfg.num_kv_heads, cfg.head_dim)
        self.cache = KVCache(jnp.zeros(shape, ecfg.dtype), jnp.zeros(shape, ecfg.dtype))
        self.state = jax.device_put(DecodeState.zeros(ecfg.max_slots, cfg.vocab_size))
        self._progress = progress or (lambda msg: None)
        self.compile_seconds: dict[str, float] = {}
        self._prefill: dict[int, jax.stages.Compiled] = {}
        self._score: dict[int, jax.stages.Compiled] = {}
        self._generate_logits: dict[tuple[int, int], jax.stages.Compiled] = {}
        self._compile_all()

    # -- compilation ------------------------------------------------------------------------------

    def _compile(self, name: str, fn, donate: tuple[str, ...], *args):
        self._progress(f"compiling {name}")
        t0 = time.perf_counter()
        compiled = jax.jit(fn, donate_argnames=donate).lower(*args).compile()
        self.compile_seconds[name] = dt = time.perf_counter() - t0
        log.info("compiled %s in %.2fs", name, dt)
        return compiled

    def _prefill_args(self, t: int):
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        return (
            abstract(self.weights),
            abstract(self.cache),
            jax.ShapeDtypeStruct((t,), jnp.int32),
            i32,
            i32,
            jax.ShapeDtypeStruct((self.ecfg.pages_per_seq,), jnp.int32),
            abstract(SamplingState.zeros(1)),
            jax.ShapeDtypeStruct((self.cfg.vocab_size,), bool),
        )

    def _generate_fn(self, rows: int, kv_tokens: int, with_logits: bool = False):
        ecfg = self.ecfg
        fn = functools.partial(
            programs.generate,
            st=self.st,
            steps=ecfg.decode_steps,
            kv_pages=kv_tokens // ecfg.page_size,
            rows=rows,
            with_logits=with_logits,
        )
        table = jax.ShapeDtypeStruct((ecfg.max_slots, ecfg.pages_per_seq), jnp.int32)
        name = f"generate{'_logits' if with_logits else ''}[S={rows},k={ecfg.decode_steps},kv={kv_tokens}]"
        args = (abstract(self.weights), abstract(self.cache), abstract(self.state), table)
        return self._compile(name, fn, ("cache", "state"), *args)

    def _compile_all(self) -> None:
        ecfg, i32 = self.ecfg, jax.ShapeDtypeStruct((), jnp.int32)
        for t in ecfg.prefill_buckets:
            fn = functools.partial(programs.prefill, st=self.st)
            self._prefill[t] = self._compile(f"prefill[T={t}]", fn, ("cache",), *self._prefill_args(t))
            if ecfg.scoring:
                fn = functools.partial(programs.score, st=self.st)
                args = (*self._prefill_args(t)[:6], jax.ShapeDtypeStruct((t,), jnp.int32))
                self._score[t] = self._compile(f"score[T={t}]", fn, ("cache",), *args)
        self._generate = {
            (rows, kv): self._generate_fn(rows, kv) for rows in ecfg.slot_buckets for kv in ecfg.kv_buckets
        }
        packed = jax.ShapeDtypeStruct((1, 2 + 2 * ecfg.max_logprobs), jnp.int32)
        row = abstract(SamplingState.zeros(1))
        presence = jax.ShapeDtypeStruct((self.cfg.vocab_size,), bool)
        self._insert = self._compile(
            "insert", programs.insert, ("state",), abstract(self.state), i32, packed, i32, row, presence
        )
        self._free = self._compile("free", programs.free, ("state",), abstract(self.state), i32)
        log.info(
            "compiled %d programs in %.1fs", len(self.compile_seconds), sum(self.compile_seconds.values())
        )

    # -- verbs --------------------------------------------------------------------------------------

    def bucket(self, n: int) -> int:
        """The smallest prefill bucket holding n tokens (the largest bucket if none does)."""
        return next((t for t in self.ecfg.prefill_buckets if t >= n), self.ecfg.prefill_buckets[-1])

    def prefill(
        self, tokens, start: int, page_row: np.ndarray, sampling: SamplingState, presence: np.ndarray
    ):
        """Prefill one chunk (len(tokens) ≤ largest bucket) starting at position `start`.
        Returns the packed first-token result, on device (pass it to `insert`)."""
        n = len(tokens)
        t = self.bucket(n)
        assert 0 < n <= t, (n, t)
        padded = np.zeros((t,), np.int32)
        padded[:n] = tokens
        self.cache, packed = self._prefill[t](
            self.weights, self.cache, padded, np.int32(start), np.int32(n), page_row, sampling, presence
        )
        return packed

    def score(self, tokens, start: int, page_row: np.ndarray, targets) -> tuple[np.ndarray, np.ndarray]:
        """Prefill one chunk and return, per chunk position i, the log-prob of targets[i] (the next
        token) and whether it was the argmax: (float32 [n], bool [n])."""
        if not self._score:
            raise ValueError("this engine was built with scoring=False")
        n = len(tokens)
        t = self.bucket(n)
        padded, nxt = np.zeros((t,), np.int32), np.zeros((t,), np.int32)
        padded[:n], nxt[: len(targets)] = tokens, targets
        self.cache, out = self._score[t](
            self.weights, self.cache, padded, np.int32(start), np.int32(n), page_row, nxt
        )
        out = np.asarray(out)[:n]
        return out[:, 0].view(np.float32), out[:, 1].astype(bool)

    def insert(self, slot: int, packed, length: int, sampling: SamplingState, presence: np.ndarray) -> None:
        self.state = self._insert(self.state, np.int32(slot), packed, np.int32(length), sampling, presence)

    def kv_bucket(self, kv_tokens: int) -> int:
        """The smallest decode KV bucket holding `kv_tokens` (every active slot's length after the
        dispatch)."""
        return next(b for b in self.ecfg.kv_buckets if b >= kv_tokens)

    def slot_bucket(self, busy_rows: int) -> int:
        """The smallest decode batch holding slots 0 .. busy_rows - 1."""
        return next(b for b in self.ecfg.slot_buckets if b >= busy_rows)

    def generate(self, page_table: np.ndarray, kv_tokens: int, busy_rows: int | None = None):
        """Dispatch `decode_steps` steps for the active slots, all below `busy_rows` (default: all
        slots); `kv_tokens` bounds every active slot's length after the dispatch. Returns the packed
        results [steps, rows, C] (rows = the slot bucket used), on device."""
        key = (self.slot_bucket(busy_rows or self.ecfg.max_slots), self.kv_bucket(kv_tokens))
        self.cache, self.state, packed = self._generate[key](self.weights, self.cache, self.state, page_table)
        return packed

    def free(self, slot: int) -> None:
        self.state = self._free(self.state, np.int32(slot))

    # -- test and debug entry points (compiled on first use, never on the serving path) -------------

    @functools.cached_property
    def _prefill_logits(self):
        t = self.ecfg.prefill_buckets[-1]
        fn = functools.partial(programs.prefill, st=self.st, all_logits=True)
        return self._compile(f"prefill_logits[T={t}]", fn, ("cache",), *self._prefill_args(t))

    def prefill_with_logits(self, tokens, start, page_row, sampling, presence):
        """Like `prefill` (chunk padded to the largest bucket), also returning logits [n, V]."""
        n = len(tokens)
        padded = np.zeros((self.ecfg.prefill_buckets[-1],), np.int32)
        padded[:n] = tokens
        self.cache, packed, lg = self._prefill_logits(
            self.weights, self.cache, padded, np.int32(start), np.int32(n), page_row, sampling, presence
        )
        return packed, np.asarray(lg)[:n]

    def generate_with_logits(self, page_table: np.ndarray, kv_tokens: int):
        """Like `generate` (all slots), also returning the logits [steps, S, V] each token was drawn
        from."""
        key = (self.ecfg.max_slots, self.kv_bucket(kv_tokens))
        if key not in self._generate_logits:
            self._generate_logits[key] = self._generate_fn(*key, with_logits=True)
        self.cache, self.state, packed, lg = self._generate_logits[key](
            self.weights, self.cache, self.state, page_table
        )
        return packed, np.asarray(lg)


__all__ = ["Engine", "Sampled"]
