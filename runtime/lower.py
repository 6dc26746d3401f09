"""Every program an engine compiles, lowered for platforms this machine need not have.

JAX lowers for any platform without its devices: `jit(f).trace(*args).lower(lowering_platforms=
(p,))` runs the whole lowering, Pallas kernels included (Pallas -> Triton for cuda, which enforces
Triton's constraints; Mosaic for tpu), and stops before compiling (PTX, the TPU compiler): what
still needs the device. The programs are `Layout.programs()`, the list the Engine compiles, built
for the target's backend, so they hold the kernels that backend would run (interpret off).

`lower_all` writes each program's StableHLO to OUT/<platform>/<program>.mlir and returns a `Row`
per program: the Pallas kernels it calls (custom calls: "triton:<kernel>" on cuda,
"mosaic:<kernel>" on tpu), the bytes of weights and KV one step moves (from the shapes), or the
error that stopped its lowering. `table` prints them.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from xlaserve.runtime import models
from xlaserve.runtime.attention import token_bytes
from xlaserve.runtime.layout import Layout, Program
from xlaserve.runtime.memory import fmt
from xlaserve.runtime.models import params

# lowering platform -> the backend name EngineConfig.resolve and the kernels go by
PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
# custom-call targets of Pallas kernels -> the label the table gives them
KERNEL_TARGETS = {"__gpu$xla.gpu.triton": "triton", "tpu_custom_call": "mosaic", "mosaic_gpu": "mosaic_gpu"}


def parse_platforms(text: str) -> tuple[str, ...]:
    """'cuda,tpu' -> ("cuda", "tpu"); ValueError naming an unknown one and what is allowed."""
    names = tuple(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    bad = next((p for p in names if p not in PLATFORMS), None)
    if bad is not None or not names:
        raise ValueError(
            f"--platforms {text!r}: {'unknown platform ' + repr(bad) if bad else 'no platform given'}; "
            f"allowed: {', '.join(PLATFORMS)} (comma-separated, e.g. cuda,tpu)"
        )
    return names


def preset_weights(cfg, quant: str, dtype: str):
    """Abstract weights (ShapeDtypeStructs) of a preset, as `bench decode --preset` would build them
    (params.random_weights / random_quantized), without allocating them. quant: none, q8_0, q4_0,
    q4_1."""
    infos, dt = models.declare(cfg), jnp.dtype(dtype)
    if quant == "none":
        return jax.eval_shape(lambda: params.random_weights(infos, 0, dt))
    return jax.eval_shape(lambda: params.random_quantized(infos, quant, dt, 0))


def kernel_calls(text: str) -> tuple[str, ...]:
    """The Pallas kernels a StableHLO module calls, "<backend>:<kernel name>", sorted (a kernel
    inside the layer scan appears once)."""
    found = set()
    for line in text.splitlines():
        call = re.search(r"custom_call @([\w$.]+)", line)
        label = call and next((v for k, v in KERNEL_TARGETS.items() if k in call.group(1)), None)
        if label:
            name = re.search(r'\b(?:kernel_name|name) = "([^"]+)"', line)
            found.add(f"{label}:{name.group(1) if name else '?'}")
    return tuple(sorted(found))


def step_bytes(layout: Layout, program: Program) -> tuple[int | None, int | None]:
    """(weight bytes, KV bytes) one step of `program` moves, all devices together: every weight
    once (an untied embedding table only at the step's token rows) and the K/V the step reads
    (decode, verify: every row's KV bucket) or writes (prefill, score: the chunk's tokens)."""
    cfg = layout.cfg
    if program.kind.startswith("decode"):
        rows, kv_tokens = program.key
        tokens, kv = rows, rows * kv_tokens
    elif program.kind == "verify":  # K+1 tokens a row
        rows, kv_tokens, k = program.key
        tokens, kv = rows * (k + 1), rows * kv_tokens
    elif program.kind.startswith(("prefill", "score")):
        tokens = kv = program.key if isinstance(program.key, int) else program.key[0] * program.key[1]
    else:
        return None, None
    weights = params.weight_bytes(layout.weights)
    by_name = params.named(layout.weights)
    if by_name.get("lm_head") is not None:  # untied: the embedding table is read at `tokens` rows
        embed = params.weight_bytes(by_name["embed"])
        weights -= embed - embed * min(tokens, cfg.vocab_size) // cfg.vocab_size
    return weights, kv * token_bytes(layout.cache)


@dataclass(frozen=True)
class Row:
    program: str
    kind: str
    platform: str
    kernels: tuple[str, ...]
    weight_bytes: int | None
    kv_bytes: int | None
    seconds: float
    path: str | None  # the StableHLO file
    error: str | None  # why lowering failed (None: it did not)

    def as_dict(self) -> dict:
        return asdict(self)


def file_name(program: str) -> str:
    """'decode[S=8,k=1,kv=512]' -> 'decode.S8.k1.kv512.mlir'."""
    return re.sub(r"[^\w.-]", "", program.replace("[", ".").replace(",", ".")) + ".mlir"


def lower_all(layout: Layout, platform: str, out: Path, progress=lambda msg: None) -> list[Row]:
    """Lower every program of `layout` for `platform`; a failure is recorded in its row, and the
    others are still lowered."""
    folder = Path(out) / platform
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for program in layout.programs():
        progress(f"lowering {program.name} for {platform}")
        t0, kernels, path, error = time.perf_counter(), (), None, None
        try:
            text = program.jit().trace(*program.args).lower(lowering_platforms=(platform,)).as_text()
            path = folder / file_name(program.name)
            path.write_text(text)
            kernels = kernel_calls(text)
        except Exception as e:  # every failure is reported in the table, not raised
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        w, kv = step_bytes(layout, program)
        seconds = time.perf_counter() - t0
        rows.append(
            Row(program.name, program.kind, platform, kernels, w, kv, seconds, path and str(path), error)
        )
    return rows


def table(rows: list[Row]) -> str:
    """A markdown table of the rows."""
    lines = [
        "| program | platform | kernels (custom calls) | weights/step | KV/step | lowered |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = lambda n: "-" if n is None else fmt(n)
        result = f"ok ({r.seconds:.1f}s)" if r.error is None else f"FAILED: {r.error[:160]}"
        kernels = ", ".join(r.kernels) or "-"
        cells = (r.program, r.platform, kernels, size(r.weight_bytes), size(r.kv_bytes), result)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
