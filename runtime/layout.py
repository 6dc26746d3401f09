"""The programs an engine compiles, described without allocating a single array: the one list that
both the Engine (which compiles it at start-up) and `xlaserve lower` (which lowers it for platforms
this machine need not have, runtime/lower.py) walk, so a program added here is compiled and lowered
alike.

`Layout.build` resolves the engine configuration for a backend (the one the programs are for, not
necessarily this machine's), sizes it to the device's memory (runtime/memory.py), picks the kernels
that backend runs, and holds abstract arguments (ShapeDtypeStructs with their shardings) for the
weights, the KV cache and the decode state. `Layout.programs()` lists, in compile order:

    prefill[T], prefill_masked[T]           per prefill bucket T
    prefill_batch[B=r,T=t]                  per bucket t and batch r > 1 (prefill_calls.Batched)
    score[B=b,T=t]                          per bucket t and batch b (`score_rows`), with scoring on
    score_packed[N=n,S=s]                   instead of score where packed, per packed bucket n and
                                            positions read s (`score_sel`)
    prefill_packed[R=r,N=n]                 instead of prefill_batch, per packed bucket n and r
                                            sequences (prefill_calls.Packed, Layout.packed)
    decode[S,k,kv], decode_masked[S,k=1,kv] per slot bucket S and KV bucket kv
    verify[S,K,kv]                          per S, kv and guess count K (`speculative_k`)
    insert[R], free                         insert per prefill batch R (a row of its result)
    copy_page                               one KV page into another (a prefix shared within a page)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xlaserve.runtime import memory, models, placement, programs, quant_layouts
from xlaserve.runtime.attention import KVCache
from xlaserve.runtime.config import EngineConfig, Kernels, ModelConfig
from xlaserve.runtime.grammar import mask_words
from xlaserve.runtime.prefill_calls import packed_buckets, packed_rows, prefill_rows
from xlaserve.runtime.programs import DecodeState, Statics
from xlaserve.runtime.sampling import SamplingState

# Tokens per batched scoring call (rows x chunk bucket): see `score_rows`.
SCORE_TOKENS = 256
# Candidate next tokens the scoring program scores at each position (its own next token and up to
# SCORE_TARGETS - 1 others from the same logits: the choices of a multiple-choice question).
SCORE_TARGETS = 8


def abstract(tree, default_sharding=None):
    """Shapes, dtypes and shardings of a pytree (device arrays keep theirs; host arrays and
    ShapeDtypeStructs without one get `default_sharding`)."""

    def one(a):
        sharding = a.sharding if isinstance(a, jax.Array) else getattr(a, "sharding", None)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding or default_sharding)

    return jax.tree.map(one, tree)


def score_rows(ecfg: EngineConfig, t: int) -> tuple[int, ...]:
    """Batch sizes the scoring program is compiled for at chunk bucket t: 1, and as many rows as fit
    SCORE_TOKENS tokens (at most max_slots). One call over many short sequences costs little more
    than over one on CPU, and it keeps a GPU busy."""
    most = min(ecfg.max_slots, max(1, SCORE_TOKENS // t))
    return (1,) if most == 1 else (1, most)


def score_few(t: int) -> int:
    """Positions per row of the `score_few` programs at chunk bucket t (batched calls whose rows
    each score at most this many: a multiple-choice row scores its answer, not its question)."""
    return max(1, t // 4)


def score_sel(n: int) -> tuple[int, ...]:
    """Positions read (logits computed) by the `score_packed` programs of n tokens: a quarter of
    them (the answers of multiple-choice questions, not their contexts), or all (a text's perplexity)."""
    return tuple(sorted({max(1, n // 4), n}))


def score_tokens(ecfg: EngineConfig) -> int:
    """Tokens of the largest scoring call (0 without scoring)."""
    return max((r * t for t in ecfg.prefill_buckets for r in score_rows(ecfg, t)), default=0) * ecfg.scoring


@dataclass(frozen=True)
class Program:
    """One device program: `fn` jitted with `donate` and `out_shardings`, for `args` (abstract).
    `kind` and `key` say where the engine keeps it (kind "decode", key (rows, kv tokens)).
    `routed`: its last output is the tokens routed per layer and expert [L, E] (programs.py)."""

    kind: str
    key: object
    name: str
    fn: Callable
    donate: tuple[str, ...]
    args: tuple
    out_shardings: object
    routed: bool = False

    def jit(self):
        return jax.jit(self.fn, donate_argnames=self.donate, out_shardings=self.out_shardings)


@dataclass(frozen=True)
class Layout:
    cfg: ModelConfig
    ecfg: EngineConfig  # resolved for `backend` and sized to memory
    backend: str  # "cpu", "gpu" or "tpu": the programs' target
    mesh: Mesh | None
    st: Statics
    weights: object  # abstract weights (the layout `backend`'s matmul wants), with shardings
    cache: KVCache  # abstract [L, N, P, H, D] each
    state: DecodeState  # abstract
    plan: memory.MemoryPlan | None  # None: no device memory to plan for
    # decode and verify also return the target's states before the final norm (for a draft head,
    # runtime/draft_head.py); static, so an engine without a head runs programs without that output
    features: bool = False

    @classmethod
    def build(
        cls,
        cfg: ModelConfig,
        weights,
        engine_cfg: EngineConfig,
        *,
        backend: str,
        mesh: Mesh | None = None,
        device: tuple[int, str] | None = None,
        draft: tuple[int, int] = (0, 0),
        features: bool = False,
    ) -> Layout:
        """weights: the family's weights, arrays or ShapeDtypeStructs (as loaded: packed quantized
        matrices); device: (bytes per device, where the figure comes from) to plan for, or None;
        draft: a draft model's `footprint()` that the plan counts too (runtime/draft.py); features:
        decode and verify return the states a draft head reads (programs.py)."""
        family = models.of(cfg)
        family.check(cfg)
        matmul = engine_cfg.resolve(cfg, backend).matmul_impl
        sharded = mesh is not None and mesh.size > 1
        host = jax.eval_shape(
            lambda w: quant_layouts.for_backend(w, backend, matmul, sharded), abstract(weights)
        )
        repl = cache_sharding = None
        if mesh is not None:
            shardings = placement.weight_shardings(cfg, host, mesh)
            host = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), host, shardings
            )
            repl, cache_sharding = NamedSharding(mesh, P()), placement.cache_sharding(cfg, mesh)
        kv = family.kv_spec(cfg)
        tp = mesh.size if sharded else 1

        def cache_of(ecfg: EngineConfig, pages: int) -> KVCache:
            shape = (kv.num_layers, pages, ecfg.page_size, kv.num_kv_heads, kv.head_dim)
            return KVCache.abstract(shape, ecfg.dtype, ecfg.kv_cache_dtype, cache_sharding)

        def make_plan(ecfg: EngineConfig) -> memory.MemoryPlan:
            page = cache_of(ecfg, 1)
            return memory.plan(cfg, ecfg, host, page, device, tp, score_tokens(ecfg), draft)

        if device is None:
            ecfg, plan = engine_cfg.resolve(cfg, backend), None
        else:
            ecfg, plan = memory.size(cfg, engine_cfg, backend, make_plan)
        kernels = Kernels(
            attention=ecfg.attention_impl,
            matmul=ecfg.matmul_impl,
            interpret=backend == "cpu",
            mesh=mesh if sharded else None,
            matrix_specs=placement.matrix_specs(cfg, host, mesh if sharded else None),
            platform="tpu" if backend == "tpu" else "gpu",  # the target's kernels, not this machine's
            backend=backend,
        )
        st = Statics(
            cfg=cfg, block=ecfg.attn_block, dtype=ecfg.dtype, max_top=ecfg.max_logprobs, kernels=kernels
        )
        cache = cache_of(ecfg, ecfg.total_pages)
        state = abstract(jax.eval_shape(lambda: DecodeState.zeros(ecfg.max_slots, cfg.vocab_size)), repl)
        return cls(cfg, ecfg, backend, mesh, st, host, cache, state, plan, features)

    # -- the programs ---------------------------------------------------------------------------

    def footprint(self) -> tuple[int, int]:
        """(weight bytes, K/V bytes of one page) per device."""
        pages = memory.shard_bytes(self.cache.per_token())
        return memory.shard_bytes(self.weights), pages // self.cache.num_pages

    @property
    def repl(self):
        return None if self.mesh is None else NamedSharding(self.mesh, P())

    @property
    def mask_words(self) -> int:
        """int32 words of one grammar bitmask (the model's vocabulary, 32 tokens a word)."""
        return mask_words(self.cfg.vocab_size)

    def spec(self, shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.repl)

    def _outputs(self, parts: tuple[str, ...]):
        """out_shardings: the cache keeps its sharding, "state" its own, everything else replicated."""
        if self.mesh is None or not parts:
            return None
        table = {
            "cache": jax.tree.map(lambda a: a.sharding, self.cache),
            "state": jax.tree.map(lambda a: a.sharding, self.state),
        }
        shardings = tuple(table.get(p, self.repl) for p in parts)
        return shardings if len(parts) > 1 else shardings[0]

    def program(self, kind, key, name, fn, donate, args, outputs=()) -> Program:
        routed = bool(outputs) and outputs[-1] == "routed"
        return Program(kind, key, name, fn, donate, tuple(args), self._outputs(outputs), routed)

    def prefill(self, t: int, masked: bool = False, all_logits: bool = False) -> Program:
        """One chunk of bucket t of one sequence (masked: with the grammar's bitmask; all_logits:
        the test entry point returning every position's logits)."""
        st = dataclasses.replace(self.st, block=self.ecfg.attn_block_for(t)) if not all_logits else self.st
        i32 = self.spec((), jnp.int32)
        args = (
            self.weights,
            self.cache,
            self.spec((t,), jnp.int32),
            i32,
            i32,
            self.spec((self.ecfg.pages_per_seq,), jnp.int32),
            abstract(SamplingState.zeros(1), self.repl),
            self.spec((self.cfg.vocab_size,), bool),
        ) + ((self.spec((self.mask_words,), jnp.int32),) if masked else ())
        kind = "prefill_logits" if all_logits else "prefill_masked" if masked else "prefill"
        fn = functools.partial(programs.prefill, st=st, all_logits=all_logits)
        outputs = ("cache", "packed", "logits", "routed") if all_logits else ("cache", "packed", "routed")
        return self.program(kind, t, f"{kind}[T={t}]", fn, ("cache",), args, outputs)

    def prefill_batch(self, rows: int, t: int) -> Program:
        """One chunk of bucket t of each of `rows` sequences (programs.prefill_batch)."""
        st = dataclasses.replace(self.st, block=self.ecfg.attn_block_for(t))
        i32 = lambda *shape: self.spec(shape, jnp.int32)
        args = (
            self.weights,
            self.cache,
            i32(rows, t),
            i32(rows),
            i32(rows),
            i32(rows, self.ecfg.pages_per_seq),
            abstract(SamplingState.zeros(rows), self.repl),
            self.spec((rows, self.cfg.vocab_size), bool),
        )
        fn = functools.partial(programs.prefill_batch, st=st)
        name = f"prefill_batch[B={rows},T={t}]"
        outputs = ("cache", "packed", "routed")
        return self.program("prefill_batch", (rows, t), name, fn, ("cache",), args, outputs)

    @property
    def packed(self) -> bool:
        """Whether generation chunks go packed (prefill_calls.Packed): where attention reads each
        query's pages in place, the native CPU kernel (attention._native_takes); elsewhere a row per
        token would gather its context (XLA) or miss the kernels' tiles (Pallas)."""
        f32, k = jnp.dtype(jnp.float32), self.st.kernels
        floats = self.cache.k.dtype == f32 and jnp.dtype(self.ecfg.dtype) == f32
        return k.attention == "native" and k.mesh is None and not self.cache.quantized and floats

    def prefill_packed(self, rows: int, n: int) -> Program:
        """Chunks of `rows` sequences packed into n tokens (programs.prefill_packed)."""
        i32 = lambda *shape: self.spec(shape, jnp.int32)
        args = (
            *(self.weights, self.cache, i32(n), i32(n), i32(n), i32()),
            *(i32(rows, self.ecfg.pages_per_seq), i32(rows), abstract(SamplingState.zeros(rows), self.repl)),
            self.spec((rows, self.cfg.vocab_size), bool),
        )
        fn = functools.partial(programs.prefill_packed, st=self.st)
        name, outputs = f"prefill_packed[R={rows},N={n}]", ("cache", "packed", "routed")
        return self.program("prefill_packed", (rows, n), name, fn, ("cache",), args, outputs)

    def score(self, rows: int, t: int, few: int | None = None) -> Program:
        """few: the `score_few` variant, logits at `few` selected positions per row only."""
        st = dataclasses.replace(self.st, block=self.ecfg.attn_block_for(t))
        i32 = lambda *shape: self.spec(shape, jnp.int32)
        w = self.ecfg.pages_per_seq
        targets = i32(rows, few or t, SCORE_TARGETS)
        args = (self.weights, self.cache, i32(rows, t), i32(rows), i32(rows), i32(rows, w), targets)
        fn = functools.partial(programs.score, st=st)
        if few is None:
            return self.program(
                "score",
                (rows, t),
                f"score[B={rows},T={t}]",
                fn,
                ("cache",),
                args,
                ("cache", "scores", "routed"),
            )
        name = f"score_few[B={rows},T={t},S={few}]"
        return self.program(
            "score_few",
            (rows, t),
            name,
            fn,
            ("cache",),
            (*args, i32(rows, few)),
            ("cache", "scores", "routed"),
        )

    def score_packed(self, n: int, s: int) -> Program:
        """Scoring chunks of up to max_slots sequences packed into n tokens, logits at s of them
        (programs.score_packed)."""
        i32 = lambda *shape: self.spec(shape, jnp.int32)
        args = (
            *(self.weights, self.cache, i32(n), i32(n), i32(n), i32()),
            *(i32(self.ecfg.max_slots, self.ecfg.pages_per_seq), i32(s), i32(s, SCORE_TARGETS)),
        )
        fn = functools.partial(programs.score_packed, st=self.st)
        name, outputs = f"score_packed[N={n},S={s}]", ("cache", "scores", "routed")
        return self.program("score_packed", (n, s), name, fn, ("cache",), args, outputs)

    def decode(self, rows: int, kv_tokens: int, with_logits: bool = False, masked: bool = False) -> Program:
        """`decode_steps` steps (masked: one) of the first `rows` slots attending over `kv_tokens`."""
        ecfg = self.ecfg
        steps = 1 if masked else ecfg.decode_steps
        fn = functools.partial(
            programs.decode,
            st=self.st,
            steps=steps,
            kv_pages=kv_tokens // ecfg.page_size,
            rows=rows,
            with_logits=with_logits,
            features=self.features and not masked and not with_logits,
        )
        args = (
            self.weights,
            self.cache,
            self.state,
            self.spec((ecfg.max_slots, ecfg.pages_per_seq), jnp.int32),
        )
        if masked:
            args += (self.spec((ecfg.max_slots, self.mask_words), jnp.int32),)
        kind = "decode_logits" if with_logits else "decode_masked" if masked else "decode"
        outputs = ("cache", "state", "packed") + (("logits",) if with_logits else ())
        outputs += ("features",) * fn.keywords["features"] + ("routed",)
        name = f"{kind}[S={rows},k={steps},kv={kv_tokens}]"
        return self.program(kind, (rows, kv_tokens), name, fn, ("cache", "state"), args, outputs)

    def verify(self, rows: int, kv_tokens: int, k: int) -> Program:
        """A speculative step of the first `rows` slots, K = k guesses each, attending over
        `kv_tokens` (programs.verify)."""
        ecfg = self.ecfg
        kv_pages = kv_tokens // ecfg.page_size
        fn = functools.partial(
            programs.verify, st=self.st, kv_pages=kv_pages, rows=rows, features=self.features
        )
        args = (
            self.weights,
            self.cache,
            self.state,
            self.spec((ecfg.max_slots, ecfg.pages_per_seq), jnp.int32),
            self.spec((ecfg.max_slots, k), jnp.int32),
            self.spec((ecfg.max_slots,), jnp.int32),
        )
        name = f"verify[S={rows},K={k},kv={kv_tokens}]"
        return self.program(
            "verify",
            (rows, kv_tokens, k),
            name,
            fn,
            ("cache", "state"),
            args,
            ("cache", "state", "packed") + ("features",) * self.features + ("routed",),
        )

    def programs(self) -> list[Program]:
        """Every program the engine compiles at start-up, in order."""
        ecfg, out = self.ecfg, []
        batches = {t: prefill_rows(ecfg.max_slots, ecfg.prefill_buckets, t) for t in ecfg.prefill_buckets}
        packed = {n: packed_rows(ecfg.max_slots, n) for n in packed_buckets(ecfg.prefill_buckets)}
        for t in ecfg.prefill_buckets:
            out += [self.prefill(t), self.prefill(t, masked=True)]
            out += [self.prefill_batch(rows, t) for rows in batches[t][1:] if not self.packed]
            if ecfg.scoring and not self.packed:
                out += [self.score(rows, t) for rows in score_rows(ecfg, t)]
                out += [self.score(rows, t, score_few(t)) for rows in score_rows(ecfg, t) if rows > 1]
        if self.packed:
            if ecfg.scoring:
                out += [self.score_packed(n, s) for n in packed for s in score_sel(n)]
            out += [self.prefill_packed(rows, n) for n, all_rows in packed.items() for rows in all_rows]
            batches = packed
        grid = [(rows, kv) for rows in ecfg.slot_buckets for kv in ecfg.kv_buckets]
        out += [self.decode(rows, kv) for rows, kv in grid]
        out += [self.decode(rows, kv, masked=True) for rows, kv in grid]
        out += [self.verify(rows, kv, k) for rows, kv in grid for k in ecfg.speculative_k]
        i32 = self.spec((), jnp.int32)
        row = abstract(SamplingState.zeros(1), self.repl)
        presence = self.spec((self.cfg.vocab_size,), bool)
        for r in sorted({r for rows in batches.values() for r in rows}):
            packed = self.spec((r, 2 + 2 * ecfg.max_logprobs), jnp.int32)
            args = (self.state, i32, packed, i32, i32, row, presence)
            name = "insert" if r == 1 else f"insert[R={r}]"  # R: rows of the prefill result taken
            out.append(self.program("insert", r, name, programs.insert, ("state",), args, ("state",)))
        out.append(
            self.program("free", None, "free", programs.free, ("state",), (self.state, i32), ("state",))
        )
        args, cache = (self.cache, i32, i32), ("cache",)
        out.append(self.program("copy_page", None, "copy_page", programs.copy_page, cache, args, cache))
        return out
