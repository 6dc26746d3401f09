"""`xlaserve convert`: a GGUF file or HF directory -> an xlaserve (orbax) checkpoint, keeping the
source's quantization, dequantizing, or quantizing at convert time (int8 per output channel,
int4 in groups). What is a matrix (and so may be quantized) comes from the family's declarations.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from xlaserve.checkpoints import orbax
from xlaserve.checkpoints.load import load_model
from xlaserve.runtime import models
from xlaserve.runtime.models.params import declared, from_named, named
from xlaserve.runtime.quant import QuantArray, dequantize, quantize

log = logging.getLogger("xlaserve")

# --quant/--scheme -> (QuantArray kind for `quantize`, per-channel?)
SCHEMES = {
    ("int8", "sym"): ("q8_0", True),
    ("int8", "asym"): ("q8_1", True),
    ("int4", "sym"): ("q4_0", False),
    ("int4", "asym"): ("q4_1", False),
}
QUANTS = ("keep", "none", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
DTYPES = {"f32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def source_digest(src: Path) -> str:
    """sha256 of a GGUF file, or of an HF directory's files (names and contents, sorted)."""
    if src.is_file():
        with open(src, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            h.update(file.relative_to(src).as_posix().encode() + b"\0")
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def quantize_weights(
    cfg, weights, quant: str, scheme: str, group_size: int, dtype, progress: Callable | None = None
):
    """Every declared matrix quantized (`int8`: per output channel; `int4`: groups of `group_size`
    along the input axis), round-to-nearest; vectors (norms, biases) cast to `dtype`. Host numpy in
    and out."""
    kind, per_channel = SCHEMES[quant, scheme]
    infos = models.declare(cfg)
    matrix = {name: info.matrix for name, info in declared(infos).items()}
    entries = list(named(weights).items())
    done = {}
    for i, (name, leaf) in enumerate(entries):
        if progress:
            progress(i, len(entries), name)
        w = dequantize(leaf) if isinstance(leaf, QuantArray) else np.asarray(leaf, np.float32)
        if not matrix[name]:
            done[name] = w.astype(dtype)
            continue
        block = w.shape[-1] if per_channel else group_block(name, w.shape[-1], group_size)
        done[name] = quantize(w, kind, block, np.float32 if per_channel else np.float16)
    if progress:
        progress(len(entries), len(entries), "done")
    return from_named(infos, done)


def group_block(name: str, k: int, group_size: int) -> int:
    """`group_size`, or the largest smaller supported group that divides the input size `k` (as
    llama.cpp falls back for tensors its block does not fit: SmolLM2's 576 takes 64 for 128)."""
    for g in sorted((g for g in GROUP_SIZES if g <= group_size), reverse=True):
        if k % g == 0:
            if g != group_size:
                log.warning(
                    "%s: input size %d is not a multiple of %d; using groups of %d", name, k, group_size, g
                )
            return g
    raise ValueError(f"{name}: input size {k} is not a multiple of any group size <= {group_size}")


def _cast_dense(cfg, weights, dtype):
    cast = lambda leaf: leaf if isinstance(leaf, QuantArray) else np.asarray(leaf).astype(dtype)
    return from_named(models.declare(cfg), {name: cast(leaf) for name, leaf in named(weights).items()})


def convert(
    src,
    out,
    *,
    quant: str = "keep",
    scheme: str = "sym",
    group_size: int = 32,
    dtype: str = "f32",
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """A GGUF file or HF directory -> an xlaserve checkpoint at `out`; returns its metadata.

    quant: "keep" (as the source stores it: GGUF-quantized matrices stay in their blocks), "none"
    (every matrix dense in `dtype`), "int8" (per output channel) or "int4" (groups of
    `group_size`); scheme "sym" or "asym". Written to a temporary directory and renamed, so `out`
    is either complete or absent."""
    src, out = Path(src), Path(out)
    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r} must be one of {', '.join(QUANTS)}")
    if (quant, scheme) not in SCHEMES and quant in ("int8", "int4"):
        raise ValueError(f"scheme={scheme!r} must be sym or asym")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} must be one of {', '.join(map(str, GROUP_SIZES))}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be bf16 or f32")
    if out.exists() and not force:
        raise ValueError(f"out={out} already exists (pass force=True / --force to replace it)")
    np_dtype = jnp.dtype(DTYPES[dtype])
    step = progress or (lambda i, n, what: None)
    step(0, 1, f"reading {src.name}")
    loaded = load_model(src, dequantize=quant == "none", dtype=np_dtype)
    if quant in ("int8", "int4"):
        weights = quantize_weights(
            loaded.config, loaded.weights, quant, scheme, group_size, np_dtype, progress
        )
    else:
        weights = _cast_dense(loaded.config, loaded.weights, np_dtype)
    quantized = [leaf for leaf in named(weights).values() if isinstance(leaf, QuantArray)]
    kinds = sorted({leaf.kind for leaf in quantized})
    meta = {
        "format": orbax.FORMAT,
        "format_version": orbax.FORMAT_VERSION,
        "xlaserve_version": orbax.version(),
        "config": orbax.config_to_json(loaded.config),
        "dtype": DTYPES[dtype],
        "quantization": {
            "method": quant,
            "scheme": scheme if quant in ("int8", "int4") else None,
            "group_size": group_size if quant == "int4" else None,
            "kinds": kinds,
            "group_sizes_used": sorted({leaf.block for leaf in quantized}) if quant == "int4" else None,
        },
        "source": {"name": src.name, "sha256": source_digest(src), "quantization": loaded.quantization},
    }
    step(0, 1, "saving weights")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        orbax.save(tmp, weights, loaded.tokenizer, meta)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return orbax.read_meta(out)
