"""Engine: owns the device state and the compiled programs; executes what the scheduler decides.

Verbs over integer slots (JetStream's contract): `prefill` a prompt chunk into pages, `insert` a
prefilled sequence into a slot, `decode` one dispatch of k decode steps for every slot, `free` a
slot. Every program is compiled ahead of time in the constructor, so no request can trigger a
compile; JAX's persistent compilation cache makes later start-ups fast.

Structured output has programs of its own, compiled with the others: a masked prefill per bucket
and a masked one-step decode per (slots, KV) bucket, which take the grammar slots' token bitmasks
(runtime/grammar.py). The runner dispatches them only when a sequence with a grammar is in the
call, so requests without one run exactly the programs they ran before.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xlaserve.runtime import models, placement, programs, quant
from xlaserve.runtime.attention import KVCache
from xlaserve.runtime.config import EngineConfig, Kernels, ModelConfig
from xlaserve.runtime.grammar import mask_words
from xlaserve.runtime.programs import DecodeState, Sampled, Statics
from xlaserve.runtime.sampling import SamplingState

log = logging.getLogger("xlaserve")


def to_host(x) -> np.ndarray:
    """A replicated device array as numpy, also when some of its shards live on other processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def abstract(tree, default_sharding=None):
    """Shapes, dtypes and shardings of a pytree (device arrays keep theirs; host arrays get
    `default_sharding`)."""

    def one(a):
        sharding = a.sharding if isinstance(a, jax.Array) else default_sharding
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


# Tokens per batched scoring call (rows x chunk bucket): see Engine.score_rows.
SCORE_TOKENS = 256


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        weights,
        engine_cfg: EngineConfig,
        *,
        mesh: Mesh | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        """weights: the family's weights pytree (host or device arrays); mesh: a ("tp",) mesh to
        shard the model over (None: the default device)."""
        self.cfg, self.mesh = cfg, mesh
        family = models.of(cfg)
        family.check(cfg)
        kv = family.kv_spec(cfg)
        backend = jax.default_backend()
        self.ecfg = ecfg = engine_cfg.resolve(cfg, backend)
        host = quant.for_backend(weights, backend, ecfg.matmul_impl)
        sharded = mesh is not None and mesh.size > 1
        kernels = Kernels(
            attention=ecfg.attention_impl,
            matmul=ecfg.matmul_impl,
            interpret=backend == "cpu",
            mesh=mesh if sharded else None,
            matrix_specs=placement.matrix_specs(cfg, host, mesh if sharded else None),
        )
        self.st = Statics(
            cfg=cfg, block=ecfg.attn_block, dtype=ecfg.dtype, max_top=ecfg.max_logprobs, kernels=kernels
        )
        shape = (kv.num_layers, ecfg.total_pages, ecfg.page_size, kv.num_kv_heads, kv.head_dim)
        self._repl = None if mesh is None else NamedSharding(mesh, P())
        if mesh is None:
            self.weights = jax.device_put(host)
            cache_sharding = None
        else:
            self.weights = placement.place(cfg, host, mesh)
            cache_sharding = placement.cache_sharding(cfg, mesh)
        zeros = jax.jit(lambda: jnp.zeros(shape, ecfg.dtype), out_shardings=cache_sharding)
        self.cache = KVCache(zeros(), zeros())  # created in place, shard by shard
        self.state = jax.device_put(DecodeState.zeros(ecfg.max_slots, cfg.vocab_size), self._repl)
        self._progress = progress or (lambda msg: None)
        self.compile_seconds: dict[str, float] = {}
        self._prefill: dict[int, jax.stages.Compiled] = {}
        self._prefill_masked: dict[int, jax.stages.Compiled] = {}
        self._score: dict[tuple[int, int], jax.stages.Compiled] = {}  # (rows, bucket)
        self._decode_logits: dict[tuple[int, int], jax.stages.Compiled] = {}
        self._compile_all()

    # -- compilation ------------------------------------------------------------------------------

    def _spec(self, shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._repl)

    def _outputs(self, *parts):
        """out_shardings: the cache keeps its sharding, "state" its own, everything else replicated."""
        if self.mesh is None:
            return None
        table = {
            "cache": jax.tree.map(lambda a: a.sharding, self.cache),
            "state": jax.tree.map(lambda a: a.sharding, self.state),
        }
        return (
            tuple(table.get(p, self._repl) for p in parts)
            if len(parts) > 1
            else table.get(parts[0], self._repl)
        )

    def _compile(self, name: str, fn, donate: tuple[str, ...], *args, outputs: tuple[str, ...] = ()):
        self._progress(f"compiling {name}")
        t0 = time.perf_counter()
        jitted = jax.jit(
            fn, donate_argnames=donate, out_shardings=self._outputs(*outputs) if outputs else None
        )
        compiled = jitted.lower(*args).compile()
        self.compile_seconds[name] = dt = time.perf_counter() - t0
        log.info("compiled %s in %.2fs", name, dt)
        return compiled

    @property
    def mask_words(self) -> int:
        """int32 words of one grammar bitmask (the model's vocabulary, 32 tokens a word)."""
        return mask_words(self.cfg.vocab_size)

    def _prefill_args(self, t: int, masked: bool = False):
        i32 = self._spec((), jnp.int32)
        return (
            abstract(self.weights),
            abstract(self.cache),
            self._spec((t,), jnp.int32),
            i32,
            i32,
            self._spec((self.ecfg.pages_per_seq,), jnp.int32),
            abstract(SamplingState.zeros(1), self._repl),
            self._spec((self.cfg.vocab_size,), bool),
        ) + ((self._spec((self.mask_words,), jnp.int32),) if masked else ())

    def _decode_fn(self, rows: int, kv_tokens: int, with_logits: bool = False, masked: bool = False):
        ecfg = self.ecfg
        steps = 1 if masked else ecfg.decode_steps
        fn = functools.partial(
            programs.decode,
            st=self.st,
            steps=steps,
            kv_pages=kv_tokens // ecfg.page_size,
            rows=rows,
            with_logits=with_logits,
        )
        table = self._spec((ecfg.max_slots, ecfg.pages_per_seq), jnp.int32)
        kind = "_logits" if with_logits else "_masked" if masked else ""
        name = f"decode{kind}[S={rows},k={steps},kv={kv_tokens}]"
        args = (abstract(self.weights), abstract(self.cache), abstract(self.state), table)
        if masked:
            args += (self._spec((ecfg.max_slots, self.mask_words), jnp.int32),)
        outputs = ("cache", "state", "packed", "logits") if with_logits else ("cache", "state", "packed")
        return self._compile(name, fn, ("cache", "state"), *args, outputs=outputs)

    def _compile_all(self) -> None:
        ecfg, i32 = self.ecfg, self._spec((), jnp.int32)
        for t in ecfg.prefill_buckets:
            st = dataclasses.replace(self.st, block=ecfg.attn_block_for(t))
            fn = functools.partial(programs.prefill, st=st)
            self._prefill[t] = self._compile(
                f"prefill[T={t}]", fn, ("cache",), *self._prefill_args(t), outputs=("cache", "packed")
            )
            self._prefill_masked[t] = self._compile(
                f"prefill_masked[T={t}]",
                fn,
                ("cache",),
                *self._prefill_args(t, masked=True),
                outputs=("cache", "packed"),
            )
            if ecfg.scoring:
                fn = functools.partial(programs.score, st=st)
                for rows in self.score_rows(t):
                    args = (
                        abstract(self.weights),
                        abstract(self.cache),
                        self._spec((rows, t), jnp.int32),
                        self._spec((rows,), jnp.int32),
                        self._spec((rows,), jnp.int32),
                        self._spec((rows, ecfg.pages_per_seq), jnp.int32),
                        self._spec((rows, t), jnp.int32),
                    )
                    self._score[rows, t] = self._compile(
                        f"score[B={rows},T={t}]", fn, ("cache",), *args, outputs=("cache", "scores")
                    )
        self._decode = {
            (rows, kv): self._decode_fn(rows, kv) for rows in ecfg.slot_buckets for kv in ecfg.kv_buckets
        }
        self._decode_masked = {
            (rows, kv): self._decode_fn(rows, kv, masked=True)
            for rows in ecfg.slot_buckets
            for kv in ecfg.kv_buckets
        }
        packed = self._spec((1, 2 + 2 * ecfg.max_logprobs), jnp.int32)
        row = abstract(SamplingState.zeros(1), self._repl)
        presence = self._spec((self.cfg.vocab_size,), bool)
        state = abstract(self.state)
        self._insert = self._compile(
            "insert", programs.insert, ("state",), state, i32, packed, i32, row, presence, outputs=("state",)
        )
        self._free = self._compile("free", programs.free, ("state",), state, i32, outputs=("state",))
        log.info(
            "compiled %d programs in %.1fs", len(self.compile_seconds), sum(self.compile_seconds.values())
        )

    # -- verbs --------------------------------------------------------------------------------------

    def _put(self, *host):
        """Host inputs as device arrays. Needed across processes (every process supplies the same
        value for its devices); on one process the executable takes numpy directly."""
        if self.mesh is None or jax.process_count() == 1:
            return host
        return tuple(jax.device_put(x, self._repl) for x in host)

    def prefill(
        self,
        tokens,
        start: int,
        page_row: np.ndarray,
        sampling: SamplingState,
        presence: np.ndarray,
        allowed: np.ndarray | None = None,
    ):
        """Prefill one chunk (len(tokens) ≤ largest bucket) starting at position `start`; `allowed`:
        the grammar's bitmask int32 [mask_words] for the token sampled (None: no grammar).
        Returns the packed first-token result, on device (pass it to `insert`)."""
        n = len(tokens)
        t = self.ecfg.prefill_bucket(n)
        assert 0 < n <= t, (n, t)
        padded = np.zeros((t,), np.int32)
        padded[:n] = tokens
        extra = () if allowed is None else (allowed,)
        host = self._put(padded, np.int32(start), np.int32(n), page_row, sampling, presence, *extra)
        program = self._prefill if allowed is None else self._prefill_masked
        self.cache, packed = program[t](self.weights, self.cache, *host)
        return packed

    def score_rows(self, t: int) -> tuple[int, ...]:
        """Batch sizes the scoring program is compiled for at chunk bucket t: 1, and as many rows
        as fit SCORE_TOKENS tokens (at most max_slots). One call over many short sequences costs
        little more than over one on CPU, and it keeps a GPU busy."""
        most = min(self.ecfg.max_slots, max(1, SCORE_TOKENS // t))
        return (1,) if most == 1 else (1, most)

    def score_batch(self, items) -> list[tuple[np.ndarray, np.ndarray]]:
        """Prefill (tokens, start, page_row, targets) chunks of distinct sequences in one call, all
        in one prefill bucket and at most score_rows(bucket)[-1] of them. For each, per chunk
        position i: the log-prob of targets[i] (the next token) and whether it was the argmax,
        (float32 [n], bool [n])."""
        if not self._score:
            raise ValueError("this engine was built with scoring=False")
        bucket = self.ecfg.prefill_bucket
        t = bucket(max(len(tokens) for tokens, *_ in items))
        rows = next((r for r in self.score_rows(t) if r >= len(items)), None)
        assert rows is not None and all(bucket(len(it[0])) == t for it in items), (t, len(items))
        tokens, nxt = np.zeros((rows, t), np.int32), np.zeros((rows, t), np.int32)
        start, n_valid = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
        table = np.zeros((rows, self.ecfg.pages_per_seq), np.int32)
        for i, (toks, first, page_row, targets) in enumerate(items):
            tokens[i, : len(toks)], nxt[i, : len(targets)] = toks, targets
            start[i], n_valid[i], table[i] = first, len(toks), page_row
        self.cache, out = self._score[rows, t](
            self.weights, self.cache, *self._put(tokens, start, n_valid, table, nxt)
        )
        out = to_host(out)
        return [
            (out[i, : len(toks), 0].view(np.float32), out[i, : len(toks), 1].astype(bool))
            for i, (toks, *_) in enumerate(items)
        ]

    def insert(self, slot: int, packed, length: int, sampling: SamplingState, presence: np.ndarray) -> None:
        slot, length, sampling, presence = self._put(np.int32(slot), np.int32(length), sampling, presence)
        self.state = self._insert(self.state, slot, packed, length, sampling, presence)

    def kv_bucket(self, kv_tokens: int) -> int:
        """The smallest decode KV bucket holding `kv_tokens` (every active slot's length after the
        dispatch)."""
        return next(b for b in self.ecfg.kv_buckets if b >= kv_tokens)

    def slot_bucket(self, busy_rows: int) -> int:
        """The smallest decode batch holding slots 0 .. busy_rows - 1."""
        return next(b for b in self.ecfg.slot_buckets if b >= busy_rows)

    def decode(
        self,
        page_table: np.ndarray,
        kv_tokens: int,
        busy_rows: int | None = None,
        allowed: np.ndarray | None = None,
    ):
        """Dispatch `decode_steps` steps for the active slots, all below `busy_rows` (default: all
        slots); `kv_tokens` bounds every active slot's length after the dispatch. With `allowed`
        (int32 [max_slots, mask_words]: the grammar slots' bitmasks, all ones for the others) one
        masked step instead. Returns the packed results [steps, rows, C] (rows = the slot bucket
        used), on device."""
        key = (self.slot_bucket(busy_rows or self.ecfg.max_slots), self.kv_bucket(kv_tokens))
        program = self._decode if allowed is None else self._decode_masked
        host = self._put(page_table, *(() if allowed is None else (allowed,)))
        self.cache, self.state, packed = program[key](self.weights, self.cache, self.state, *host)
        return packed

    def free(self, slot: int) -> None:
        self.state = self._free(self.state, *self._put(np.int32(slot)))

    # -- test and debug entry points (compiled on first use, never on the serving path) -------------

    @functools.cached_property
    def _prefill_logits(self):
        t = self.ecfg.prefill_buckets[-1]
        fn = functools.partial(programs.prefill, st=self.st, all_logits=True)
        return self._compile(
            f"prefill_logits[T={t}]",
            fn,
            ("cache",),
            *self._prefill_args(t),
            outputs=("cache", "packed", "logits"),
        )

    def prefill_with_logits(self, tokens, start, page_row, sampling, presence):
        """Like `prefill` (chunk padded to the largest bucket), also returning logits [n, V]."""
        n = len(tokens)
        padded = np.zeros((self.ecfg.prefill_buckets[-1],), np.int32)
        padded[:n] = tokens
        self.cache, packed, lg = self._prefill_logits(
            self.weights, self.cache, padded, np.int32(start), np.int32(n), page_row, sampling, presence
        )
        return packed, to_host(lg)[:n]

    def decode_with_logits(self, page_table: np.ndarray, kv_tokens: int):
        """Like `decode` (all slots), also returning the logits [steps, S, V] each token was drawn
        from."""
        key = (self.ecfg.max_slots, self.kv_bucket(kv_tokens))
        if key not in self._decode_logits:
            self._decode_logits[key] = self._decode_fn(*key, with_logits=True)
        self.cache, self.state, packed, lg = self._decode_logits[key](
            self.weights, self.cache, self.state, page_table
        )
        return packed, to_host(lg)


__all__ = ["Engine", "Sampled"]
