"""y = x @ W[layer]^T for a quantized, layer-stacked W, by our C++ kernel (quant_gemv.cc) on XLA:CPU.

For few rows of x (decode: one per sequence; up to MAX_ROWS), where XLA:CPU dequantizes whole
matrices into memory before a dot: the kernel converts the stored integers of each 32-weight block
in registers and computes the block's product in factored form, d * sum(x q) + m * sum(x), reading
each weight once for up to 4 rows of x. For more rows, where the CPU has AVX-512 (`many_rows`): each
weight is dequantized once a call into a buffer that stays in cache, then multiplied in register
tiles (quant_gemm_avx512.h): 1.6-2.4x XLA's dequantize-then-dot at 32 rows, 1.15-1.4x at 512 on
SmolLM2's matrices. Stored values are used exactly (nothing requantized, weights or activations);
the sums round differently from a dot with the dequantized weights (and the two paths differently
from each other), and a one-hot row of x gives back exactly gguf's dequantized weight.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.cpu_kernels import build

KINDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2}
# Which of the kernel's codes runs: "best" (AVX-512 where the CPU has it, else AVX2), or one named
# (tests compare both; naming avx512 on a CPU without it is an error, not a silent fallback).
# XLASERVE_CPU_ISA sets the default for programs traced after it is set (benchmarks compare both).
ISAS = {"best": 0, "avx2": 1, "avx512": 2}
# Rows of x up to which the factored GEMV runs; above it the GEMM path (quant_gemm_avx512.h: the
# kernel takes this as its gemv_rows), or XLA's dot where the CPU lacks AVX-512.
MAX_ROWS = 16
AVX512_FLAGS = {"avx512f", "avx512dq"}


def many_rows(isa: str | None = None) -> bool:
    """Whether calls of more than MAX_ROWS rows run the kernel (its AVX-512 GEMM path) for programs
    traced now: the CPU has AVX-512 and the code is not named avx2 (`isa` or $XLASERVE_CPU_ISA)."""
    isa = isa or os.environ.get("XLASERVE_CPU_ISA", "best")
    return isa != "avx2" and build.cpu_flags() >= AVX512_FLAGS


def supported(kind: str, block: int, packed: bool, lanes: bool = False) -> bool:
    """Whether the kernel takes this layout (runtime/quant.py's QuantArray fields): one value per
    byte, or 4-bit blocks of 32 packed in lane order (not GGUF's)."""
    if kind not in KINDS:
        return False
    if packed:
        return lanes and kind != "q8_0" and block == 32
    return block % 16 == 0 and (block <= 32 or block % 32 == 0)


def quant_gemv(
    x,
    data,
    scale,
    min,
    layer,
    *,
    kind: str,
    block: int,
    packed: bool,
    lanes: bool = False,
    isa: str | None = None,
):
    """x float32 [M, K]; data [L, N, K] (uint8, int8 for q8_0) or [L, N, K/2] (packed in lane
    order), scale and min [L, N, K/block], both float32 or both float16 (min None: none); layer
    int32 scalar in [0, L). Returns float32 [M, N]."""
    (y,) = quant_gemvs(
        x, [(data, scale, min)], layer, kind=kind, block=block, packed=packed, lanes=lanes, isa=isa
    )
    return y


def quant_gemvs(
    x, matrices, layer, *, kind: str, block: int, packed: bool, lanes: bool = False, isa: str | None = None
) -> list:
    """[x @ W[layer]^T for W in matrices] in one call of the kernel: matrices are (data, scale, min)
    as `quant_gemv` takes them, of one layout (kind, block, packing, with or without a min) and one
    K; their rows share the call's threads (a layer's q, k and v: one wake of the pool, not three).
    Each result is what `quant_gemv` gives for that matrix alone."""
    build.register()
    m, k = x.shape
    if not supported(kind, block, packed, lanes):
        raise ValueError(f"quant_gemv does not take {kind} blocks of {block} ({packed=}, {lanes=})")
    isa = isa or os.environ.get("XLASERVE_CPU_ISA", "best")
    if isa not in ISAS:
        raise ValueError(f"quant_gemv: isa (or $XLASERVE_CPU_ISA) must be one of {sorted(ISAS)}, not {isa!r}")
    if not matrices or len({mn is None for _, _, mn in matrices}) != 1:
        raise ValueError("quant_gemvs: give one or more matrices, all with a min or all without")
    operands, shapes = [], []
    for data, scale, mn in matrices:
        n = data.shape[1]
        if data.shape[2] != (k // 2 if packed else k) or scale.shape != (data.shape[0], n, k // block):
            raise ValueError(f"quant_gemv: x {x.shape}, data {data.shape}, scale {scale.shape} do not match")
        if scale.dtype not in (jnp.float32, jnp.float16) or (mn is not None and mn.dtype != scale.dtype):
            raise ValueError(
                f"quant_gemv: scale and min must be both float32 or both float16, not {scale.dtype}"
            )
        operands += [data, scale, scale if mn is None else mn]
        shapes.append(jax.ShapeDtypeStruct((m, n), jnp.float32))
    call = jax.ffi.ffi_call(build.TARGET, shapes)
    return list(
        call(
            x.astype(jnp.float32),
            jnp.asarray(layer, jnp.int32),
            *operands,
            kind=np.int64(KINDS[kind]),
            block=np.int64(block),
            packed=packed,
            has_min=matrices[0][2] is not None,
            isa=np.int64(ISAS[isa]),
            gemv_rows=np.int64(MAX_ROWS),
        )
    )
