"""y = x @ W[layer]^T for a quantized, layer-stacked W, by our C++ kernel (quant_gemv.cc) on XLA:CPU.

For few rows of x (decode: one per sequence), where XLA:CPU dequantizes whole matrices into memory
before a dot: the kernel converts the stored integers of each 32-weight block in registers and
computes the block's product in factored form, d * sum(x q) + m * sum(x), reading each weight once
for up to 4 rows of x. Stored values are used exactly (nothing requantized, weights or activations);
the sums round differently from a dot with the dequantized weights, and a one-hot row of x gives
back exactly gguf's dequantized weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.cpu_kernels import build

KINDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2}
# Rows of x above which XLA's GEMM (its dequantization spread over many rows) is the better path.
MAX_ROWS = 16


def supported(kind: str, block: int, packed: bool, lanes: bool = False) -> bool:
    """Whether the kernel takes this layout (runtime/quant.py's QuantArray fields): one value per
    byte, or 4-bit blocks of 32 packed in lane order (not GGUF's)."""
    if kind not in KINDS:
        return False
    if packed:
        return lanes and kind != "q8_0" and block == 32
    return block % 16 == 0 and (block <= 32 or block % 32 == 0)


def quant_gemv(x, data, scale, min, layer, *, kind: str, block: int, packed: bool, lanes: bool = False):
    """x float32 [M, K]; data [L, N, K] (uint8, int8 for q8_0) or [L, N, K/2] (packed in lane
    order), scale and min float32 [L, N, K/block] (min None: none); layer int32 scalar in [0, L).
    Returns float32 [M, N]."""
    build.register()
    m, k = x.shape
    n = data.shape[1]
    if not supported(kind, block, packed, lanes):
        raise ValueError(f"quant_gemv does not take {kind} blocks of {block} ({packed=}, {lanes=})")
    if data.shape[2] != (k // 2 if packed else k) or scale.shape != (data.shape[0], n, k // block):
        raise ValueError(f"quant_gemv: x {x.shape}, data {data.shape}, scale {scale.shape} do not match")
    call = jax.ffi.ffi_call(build.TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(
        x.astype(jnp.float32),
        data,
        scale.astype(jnp.float32),
        (scale if min is None else min).astype(jnp.float32),
        jnp.asarray(layer, jnp.int32),
        kind=np.int64(KINDS[kind]),
        block=np.int64(block),
        packed=packed,
        has_min=min is not None,
    )
