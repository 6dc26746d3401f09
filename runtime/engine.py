"""Engine: owns the device state and the compiled programs; executes what the scheduler decides.

Verbs over integer slots (JetStream's contract): `prefill` a prompt chunk into pages (or
`prefill_batch` one chunk of each of several sequences in one call), `insert` a prefilled sequence
into a slot, `decode` one dispatch of k decode steps for every slot, `free` a slot. Every program is
compiled ahead of time in the constructor, so no request can trigger a compile (or, with
`compile_at="use"`, each on first use: runtime/compiled.py); JAX's persistent compilation cache
makes later start-ups fast. The programs, their abstract arguments and the kernels
are described by `Layout` (runtime/layout.py), the same list `xlaserve lower` lowers for other
platforms; before anything is placed, the memory plan (runtime/memory.py) sizes the slots and page
pool to the devices' memory or refuses a configuration that cannot fit.

Speculative decoding's `verify` scores each slot's current token and up to K guesses in one call
and emits the agreeing prefix plus one token of the model's own (runtime/speculative.py); its
programs, one per guess-count bucket `speculative_k`, are compiled with the others.

Structured output has programs of its own, compiled with the others: a masked prefill per bucket
and a masked one-step decode per (slots, KV) bucket, which take the grammar slots' token bitmasks
(runtime/grammar.py). The runner dispatches them only when a sequence with a grammar is in the
call, so requests without one run exactly the programs they ran before.

Mixture-of-experts load: the prefill, score and decode programs also return the tokens each layer
routed to each expert [L, E]; `compiled.Routed` strips that output from the verbs' results and
queues it, its copy to the host started at once, and `routed_tokens` adds up the copies that have
arrived: no extra synchronization on the serving path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from xlaserve.runtime import kv_smoothing, layout, memory, placement, prefill_calls, prefill_inputs
from xlaserve.runtime.compiled import Compiler
from xlaserve.runtime.config import EngineConfig, ModelConfig
from xlaserve.runtime.layout import Layout
from xlaserve.runtime.prefill_calls import Calls, ScoreCalls, calls_for, packed_rows, prefill_rows
from xlaserve.runtime.programs import DecodeState
from xlaserve.runtime.quant_layouts import for_backend
from xlaserve.runtime.results import Sampled, Verified
from xlaserve.runtime.sampling import SamplingState

log = logging.getLogger("xlaserve")


def to_host(x) -> np.ndarray:
    """A replicated device array as numpy, also when some of its shards live on other processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


# Tokens per batched scoring call (rows x chunk bucket): see Engine.score_rows.
SCORE_TOKENS = layout.SCORE_TOKENS


class Engine:
    # Whether the engine sizes itself to the devices' memory; a draft model's engine does not: the
    # target's plan counted it (runtime/draft.py).
    plans_memory = True

    def __init__(
        self,
        cfg: ModelConfig,
        weights,
        engine_cfg: EngineConfig,
        *,
        mesh: Mesh | None = None,
        progress: Callable[[str], None] | None = None,
        calibration=None,
        draft: tuple[int, int] = (0, 0),
        features: bool = False,
    ):
        """weights: the family's weights pytree (host or device arrays); mesh: a ("tp",) mesh to
        shard the model over (None: the default device). The configuration is sized to the devices'
        memory first (runtime/memory.py): a configuration that cannot fit is refused (ValueError)
        before anything is placed. calibration: token ids of a text to measure the key smoothing of
        a quantized KV cache on (runtime/kv_smoothing.py; None: seeded random ids). draft: the
        `Layout.footprint()` of a draft model that will share this engine's pages (runtime/draft.py),
        which the memory plan counts too. features: decode and verify also return the states before
        the final norm a draft head reads (runtime/draft_head.py); off, they do not compute them."""
        self.cfg, self.mesh = cfg, mesh
        self._progress = progress or (lambda msg: None)
        backend = jax.default_backend()
        devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
        device = (
            None
            if not self.plans_memory
            else (engine_cfg.device_memory, "device_memory")
            if engine_cfg.device_memory
            else memory.device_memory(devices, backend)
        )
        if jax.process_count() > 1 and engine_cfg.max_slots is None:
            # every process must compile the same programs: no sizing from a host's own memory
            engine_cfg = dataclasses.replace(engine_cfg, max_slots=8)
        self.layout = lay = Layout.build(
            cfg,
            weights,
            engine_cfg,
            backend=backend,
            mesh=mesh,
            device=device,
            draft=draft,
            features=features,
        )
        self.features = features
        self.ecfg, self.st, self.plan = lay.ecfg, lay.st, lay.plan
        ecfg = lay.ecfg
        if lay.plan is not None:
            (progress or log.info)(lay.plan.describe())
        sharded = mesh is not None and mesh.size > 1
        host = for_backend(weights, backend, ecfg.matmul_impl, sharded)
        self._repl = lay.repl
        if mesh is None:
            self.weights = jax.device_put(host)
        else:
            self.weights = placement.place(cfg, host, mesh)
        zeros = lambda a: jax.jit(lambda: jnp.zeros(a.shape, a.dtype), out_shardings=a.sharding)()
        self.cache = jax.tree.map(zeros, lay.cache)  # created in place, shard by shard
        if self.cache.k_smooth is not None:
            tokens = kv_smoothing.calibration_tokens(cfg.vocab_size, calibration)
            s = kv_smoothing.measure(self.st, self.weights, lay.cache.k_smooth.shape, tokens, ecfg.page_size)
            smooth = jax.device_put(s, lay.cache.k_smooth.sharding)
            self.cache = dataclasses.replace(self.cache, k_smooth=smooth)
        self.state = jax.device_put(DecodeState.zeros(ecfg.max_slots, cfg.vocab_size), self._repl)
        self._compiler = Compiler(self._progress, self._routed_sink)
        self.compile_seconds = self._compiler.seconds
        self._routed_total = np.zeros((cfg.num_layers, cfg.num_experts), np.int64)
        self._routed_pending: list[jax.Array] = []  # counts [L, E] on their way to the host
        self._decode_logits: dict[tuple[int, int], jax.stages.Compiled] = {}
        self._compile_all()

    # -- compilation ------------------------------------------------------------------------------

    def _routed_sink(self, routed: jax.Array) -> None:
        if self.cfg.num_experts:  # a dense model's counts are [L, 0]
            routed.copy_to_host_async()
            self._routed_pending.append(routed)

    def routed_tokens(self, wait: bool = False, reset: bool = False) -> np.ndarray:
        """int64 [L, E]: the real tokens each layer routed to each expert, over every program run
        so far whose counts have reached the host (wait: all of them, blocking until they have);
        reset: start counting again from zero after this. Call it from the thread that runs the
        verbs."""
        pending, self._routed_pending = self._routed_pending, []
        for routed in pending:
            if wait or routed.is_ready():
                self._routed_total += to_host(routed)
            else:
                self._routed_pending.append(routed)
        out = self._routed_total.copy()
        if reset:
            self._routed_total[:] = 0
        return out

    @property
    def mask_words(self) -> int:
        """int32 words of one grammar bitmask (the model's vocabulary, 32 tokens a word)."""
        return self.layout.mask_words

    def _compile_all(self) -> None:
        """Every program of `Layout.programs()`, kept by kind and key (compiled.py): `_prefill[t]`,
        `_prefill_masked[t]`, `_prefill_batch[rows, t]` or `_prefill_packed[rows, n]`,
        `_score[rows, t]`, `_decode[rows, kv]`, `_decode_masked[rows, kv]`, `_verify[rows, kv, k]`,
        `_insert[rows]`, `_free[None]`, `_copy_page[None]`."""
        compiled = self._compiler.all(self.layout.programs(), self.ecfg.compile_at == "start")
        self._prefill, self._prefill_masked = compiled["prefill"], compiled["prefill_masked"]
        self._prefill_batch = compiled.get("prefill_batch", {})
        self._prefill_packed = compiled.get("prefill_packed", {})
        self._score, self._score_few = compiled["score"], compiled.get("score_few", {})
        self._score_packed = compiled.get("score_packed", {})
        self._decode, self._decode_masked = compiled["decode"], compiled["decode_masked"]
        self._verify = compiled["verify"]
        self._insert, self._free, self._copy_page = (
            compiled["insert"],
            compiled["free"],
            compiled["copy_page"],
        )

    # -- verbs --------------------------------------------------------------------------------------

    def _put(self, *host):
        """Host inputs as device arrays. Needed across processes (every process supplies the same
        value for its devices); on one process the executable takes numpy directly, copied: on CPU
        it may read the caller's buffer without a copy when the (asynchronous) call runs, and the
        scheduler changes its page table (of which a prefill's page row is a view) in place."""
        if self.mesh is None or jax.process_count() == 1:
            return tuple(x.copy() if isinstance(x, np.ndarray) else x for x in host)
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

    def prefill_rows(self, t: int) -> tuple[int, ...]:
        """Batch sizes a prefill call is compiled for at chunk bucket t (prefill_calls.py)."""
        return prefill_rows(self.ecfg.max_slots, self.ecfg.prefill_buckets, t)

    @property
    def prefill_calls(self) -> Calls:
        """How `prefill_batch` makes its calls, for the scheduler to cost (prefill_calls.py)."""
        return calls_for(self.ecfg, self.layout.packed, self.prefill_rows)

    def prefill_batch(self, chunks):
        """Prefill (tokens, start, page_row, sampling, presence) chunks in one call, each as `prefill`
        would (without a grammar mask), as `prefill_calls` groups them: rows padded to the bucket of
        the longest and to a compiled batch (at most prefill_rows(bucket)[-1] chunks, of distinct
        sequences), or packed into one bucket of tokens. Batched, one chunk runs the `prefill`
        program itself. Returns the packed results [rows, C] on device, row i chunk i's (pass it
        and the row to `insert`)."""
        e, sizes = self.ecfg, [len(c[0]) for c in chunks]
        if self.layout.packed:
            n = self.prefill_calls.bucket(sum(sizes))
            rows = next((r for r in packed_rows(e.max_slots, n) if r >= len(chunks)), None)
            assert rows is not None and sum(sizes) <= n, (n, len(chunks))
            host = prefill_inputs.packed(chunks, n, rows, e.pages_per_seq, self.cfg.vocab_size)
            self.cache, packed = self._prefill_packed[rows, n](self.weights, self.cache, *self._put(*host))
            return packed
        if len(chunks) == 1:
            return self.prefill(*chunks[0])
        t = e.prefill_bucket(max(sizes))
        rows = next((r for r in self.prefill_rows(t) if r >= len(chunks)), None)
        assert rows is not None and all(0 < k <= t for k in sizes), (t, len(chunks))
        host = prefill_inputs.batched(chunks, t, rows, e.pages_per_seq, self.cfg.vocab_size)
        self.cache, packed = self._prefill_batch[rows, t](self.weights, self.cache, *self._put(*host))
        return packed

    def score_rows(self, t: int) -> tuple[int, ...]:
        """Batch sizes the scoring program is compiled for at chunk bucket t (`layout.score_rows`)."""
        return layout.score_rows(self.ecfg, t)

    @property
    def score_calls(self) -> ScoreCalls:
        """How `score_batch` makes its calls, for the scheduler and the runner to group by."""
        return prefill_calls.score_calls_for(self.ecfg, self.layout.packed, self.score_rows)

    def score_batch(self, items) -> list[tuple[np.ndarray, np.ndarray]]:
        """Prefill (tokens, start, page_row, targets[, scored_from]) chunks in one call, as
        `score_calls` groups them: rows of one prefill bucket (at most score_rows(bucket)[-1], of
        distinct sequences), or packed into one bucket of tokens. targets: the next token per chunk
        position, [n], or up to SCORE_TARGETS candidates per position, [n, K] (column 0 the next
        token; pad with any id). scored_from: the first chunk position whose results are read
        (default 0); logits are computed at those alone when a program for that few exists
        (`score_few`, `score_sel`). For each chunk, per position i (and candidate k): the log-prob
        of targets[i(, k)] and whether it was the argmax, (float32, bool), shaped as targets
        (zeros before scored_from)."""
        if not (self._score or self._score_packed):
            raise ValueError("this engine was built with scoring=False")
        items = [(toks, first, row, targets, *(read or (0,))) for toks, first, row, targets, *read in items]
        out = self._score_packed_call(items) if self.layout.packed else self._score_rows_call(items)
        return prefill_inputs.score_results(items, out)

    def _score_packed_call(self, items) -> list[np.ndarray]:
        """score_batch's packed call: per chunk, int32 [positions read, SCORE_TARGETS, 2]."""
        n = self.score_calls.bucket(sum(len(it[0]) for it in items))
        read = [len(toks) - first for toks, *_, first in items]
        s = min(s for m, s in self._score_packed if m == n and s >= sum(read))  # layout.score_sel
        host = prefill_inputs.score_packed(items, n, s, self.ecfg.max_slots, self.ecfg.pages_per_seq)
        self.cache, out = self._score_packed[n, s](self.weights, self.cache, *self._put(*host))
        return np.split(to_host(out), np.cumsum(read))[: len(items)]

    def _score_rows_call(self, items) -> list[np.ndarray]:
        """score_batch's call of rows: per chunk, int32 [positions read, SCORE_TARGETS, 2]."""
        bucket = self.ecfg.prefill_bucket
        t = bucket(max(len(tokens) for tokens, *_ in items))
        rows = next((r for r in self.score_rows(t) if r >= len(items)), None)
        assert rows is not None and all(bucket(len(it[0])) == t for it in items), (t, len(items))
        host = prefill_inputs.score_batched(items, t, rows, self.ecfg.pages_per_seq)
        tokens, start, n_valid, table, nxt = host
        firsts = np.array([first for *_, first in items] + [0] * (rows - len(items)), np.int32)
        few = layout.score_few(t)
        if (rows, t) in self._score_few and all(len(it[0]) - it[-1] <= few for it in items):
            sel = np.minimum(firsts[:, None] + np.arange(few), t - 1).astype(np.int32)  # [rows, S]
            picked = np.take_along_axis(nxt, sel[..., None], axis=1)
            self.cache, out = self._score_few[rows, t](
                self.weights, self.cache, *self._put(tokens, start, n_valid, table, picked, sel)
            )
            out = to_host(out)
            return [out[i, : len(it[0]) - it[-1]] for i, it in enumerate(items)]
        host = self._put(tokens, start, n_valid, table, nxt)
        self.cache, out = self._score[rows, t](self.weights, self.cache, *host)
        out = to_host(out)
        return [out[i, it[-1] : len(it[0])] for i, it in enumerate(items)]

    def insert(
        self, slot: int, packed, length: int, sampling: SamplingState, presence: np.ndarray, row: int = 0
    ) -> None:
        """Slot `slot` takes the sequence whose first token is row `row` of a prefill's result."""
        program = self._insert[packed.shape[0]]
        host = self._put(np.int32(slot), np.int32(row), np.int32(length), sampling, presence)
        slot, row, length, sampling, presence = host
        self.state = program(self.state, slot, packed, row, length, sampling, presence)

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
        used), on device; on an engine with `features`, unmasked, (packed, the states before the final
        norm float32 [steps, rows, D])."""
        key = (self.slot_bucket(busy_rows or self.ecfg.max_slots), self.kv_bucket(kv_tokens))
        program = self._decode if allowed is None else self._decode_masked
        host = self._put(page_table, *(() if allowed is None else (allowed,)))
        self.cache, self.state, packed, *feats = program[key](self.weights, self.cache, self.state, *host)
        return (packed, feats[0]) if feats else packed

    def verify(
        self,
        page_table: np.ndarray,
        kv_tokens: int,
        proposed: np.ndarray,
        n_proposed: np.ndarray,
        busy_rows: int | None = None,
    ) -> Verified:
        """One speculative step for the active slots, all below `busy_rows` (default: all slots):
        slot s's first n_proposed[s] guesses proposed[s] (int32 [max_slots, k ≤ max speculative_k];
        0 guesses: one plain decode step) are checked against the model, which emits the agreeing
        prefix and one token of its own. page_table holds pages for positions lengths ..
        lengths + n_proposed (after the call, pages past the new lengths may be freed); kv_tokens
        bounds lengths + n_proposed + 1 of every active slot. Returns the emitted tokens on the host
        (the next proposal needs them), with the features of every position on an engine with
        `features`."""
        k = next((b for b in self.ecfg.speculative_k if b >= proposed.shape[1]), None)
        if k is None:
            raise ValueError(f"{proposed.shape[1]} guesses: speculative_k is {self.ecfg.speculative_k}")
        padded = np.zeros((self.ecfg.max_slots, k), np.int32)
        padded[:, : proposed.shape[1]] = proposed
        key = (self.slot_bucket(busy_rows or self.ecfg.max_slots), self.kv_bucket(kv_tokens), k)
        host = self._put(page_table, padded, np.asarray(n_proposed, np.int32))
        self.cache, self.state, packed, *feats = self._verify[key](
            self.weights, self.cache, self.state, *host
        )
        return Verified.unpack(to_host(packed), k, to_host(feats[0]) if feats else None)

    def free(self, slot: int) -> None:
        self.state = self._free[None](self.state, *self._put(np.int32(slot)))

    def copy_pages(self, pairs) -> None:
        """KV page dst takes page src's contents, for each (src, dst) of `pairs`, in order."""
        for src, dst in pairs:
            self.cache = self._copy_page[None](self.cache, *self._put(np.int32(src), np.int32(dst)))

    # -- test and debug entry points (compiled on first use, never on the serving path) -------------

    @functools.cached_property
    def _prefill_logits(self):
        return self._compiler(self.layout.prefill(self.ecfg.prefill_buckets[-1], all_logits=True))

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
            self._decode_logits[key] = self._compiler(self.layout.decode(*key, with_logits=True))
        self.cache, self.state, packed, lg = self._decode_logits[key](
            self.weights, self.cache, self.state, page_table
        )
        return packed, to_host(lg)


__all__ = ["Engine", "Sampled", "Verified"]
