"""The engine's compiled programs, by kind and key: compiled all at start-up or each on first use.

`EngineConfig.compile_at="start"` (the default) compiles every program of `Layout.programs()` in
the engine's constructor, so no request ever waits for a compile and a server is ready only when
it can serve at full speed. `"use"` compiles a program the first time a verb runs it: start-up
takes only the programs a run needs (a one-shot `xlaserve generate` runs a few of the dozens a
server keeps: one prefill bucket, the decode buckets its batch and context reach), and the call
that first needs a program waits for its compile. Either way a program is compiled at most once
per engine, and JAX's persistent compilation cache serves programs compiled by earlier runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import jax

from xlaserve.runtime.layout import Program

log = logging.getLogger("xlaserve")
COMPILE_THREADS = 8  # programs compiled at once at start-up (at most the CPU count)
KINDS = ("prefill", "prefill_masked", "score", "decode", "decode_masked", "verify")  # always present


class Routed:
    """A compiled program whose last output is its routed-token counts [L, E]: called, it returns
    the other outputs (as the program would without them) and hands the counts to `sink`."""

    def __init__(self, compiled: jax.stages.Compiled, sink: Callable[[jax.Array], None]):
        self.compiled, self.sink = compiled, sink

    def __call__(self, *args):
        *out, routed = self.compiled(*args)
        self.sink(routed)
        return out[0] if len(out) == 1 else tuple(out)

    def __getattr__(self, name):  # as_text, cost_analysis, ...: the compiled program's
        return getattr(self.compiled, name)


class Compiler:
    """Compiles programs, keeping each one's compile time in `seconds` (by program name)."""

    def __init__(self, progress: Callable[[str], None], sink: Callable[[jax.Array], None]):
        self.progress, self.sink = progress, sink
        self.seconds: dict[str, float] = {}

    def __call__(self, program: Program, lowered: jax.stages.Lowered | None = None):
        self.progress(f"compiling {program.name}")
        t0 = time.perf_counter()
        compiled = (lowered or program.jit().lower(*program.args)).compile()
        self.seconds[program.name] = dt = time.perf_counter() - t0
        log.info("compiled %s in %.2fs", program.name, dt)
        return Routed(compiled, self.sink) if program.routed else compiled

    def all(self, programs: list[Program], at_start: bool) -> dict[str, Programs]:
        """`programs` as one `Programs` per kind (every kind of KINDS, empty if it has none),
        compiled now when `at_start`."""
        kinds: dict[str, dict] = {k: {} for k in KINDS}
        for p in programs:
            kinds.setdefault(p.kind, {})[p.key] = p
        out = {kind: Programs(self, by_key) for kind, by_key in kinds.items()}
        if not at_start:
            return out
        # Tracing and lowering hold the GIL: one after another. XLA compiles without it, so on an
        # accelerator the programs compile side by side (start-up on a GPU is a few dozen compiles of
        # seconds each; `seconds` are then each program's own wall time, overlapping). XLA:CPU
        # compiles on the cores that would share the work: there, one at a time (2 cores: no gain).
        lowered = [(p, p.jit().lower(*p.args)) for p in programs]
        cpu = jax.default_backend() == "cpu"
        workers = 1 if cpu else max(1, min(COMPILE_THREADS, os.cpu_count() or 1, len(lowered)))
        with ThreadPoolExecutor(workers, thread_name_prefix="compile") as pool:
            done = pool.map(lambda pl: self(*pl), lowered)
            for (program, _), exe in zip(lowered, list(done), strict=True):
                out[program.kind].done[program.key] = exe
        log.info("compiled %d programs in %.1fs", len(self.seconds), sum(self.seconds.values()))
        return out


class Programs(Mapping):
    """One kind's programs by key (every key the layout has, compiled or not): looking one up
    compiles it if it is not yet. Only the engine's thread looks programs up."""

    def __init__(self, compile_one: Compiler, programs: dict[object, Program]):
        self.compile_one, self.programs = compile_one, programs
        self.done: dict[object, object] = {}

    def __getitem__(self, key):
        if key not in self.done:
            self.done[key] = self.compile_one(self.programs[key])  # KeyError: no such program
        return self.done[key]

    def __iter__(self) -> Iterator:
        return iter(self.programs)

    def __len__(self) -> int:
        return len(self.programs)

    def __contains__(self, key) -> bool:  # Mapping's would look the key up, compiling it
        return key in self.programs
