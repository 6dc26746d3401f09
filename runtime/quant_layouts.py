"""Quantized matrices (`runtime/quant.py`'s QuantArray) in the layout CPU matmuls read, made once
when the engine places its weights (`for_backend`): for XLA's path one value per byte with float32
scales (`unpack`); for our native kernel (cpu_kernels/quant_gemv.cc) 4-bit blocks of 32 in its lane
order (`to_lanes`) and int8 one value per byte, scales as stored. Every layout holds the same values
(tested); GPU and TPU keep GGUF's packing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime.quant import QuantArray, stored_values


def unpack(w: QuantArray) -> QuantArray:
    """The CPU layout: one value per byte, float32 scales (exact: f16 -> f32 loses nothing)."""
    if not w.packed:
        return w
    if isinstance(w.data, jax.Array):  # restored onto devices: unpack there, shards stay put
        return _unpack_on_device(w)
    data = w.data if w.kind == "q8_0" else np.asarray(stored_values(w, np)).reshape(w.shape)
    f32 = lambda a: None if a is None else np.asarray(a, np.float32)
    return QuantArray(data=data, scale=f32(w.scale), min=f32(w.min), kind=w.kind, block=w.block, packed=False)


@jax.jit
def _unpack_on_device(w: QuantArray) -> QuantArray:
    data = w.data if w.kind == "q8_0" else stored_values(w, jnp).reshape(w.shape)
    f32 = lambda a: None if a is None else a.astype(jnp.float32)
    return QuantArray(data=data, scale=f32(w.scale), min=f32(w.min), kind=w.kind, block=w.block, packed=False)


def to_lanes(w: QuantArray) -> QuantArray:
    """A 4-bit matrix with blocks of 32 in the native CPU kernel's lane order: byte 4i + c of a
    block holds values 8c + i and 8c + i + 4 (low, high nibble), so the kernel extracts each run of
    8 values from the block's four 32-bit words with a mask alone (cpu_kernels/quant_gemv.cc). 0.5
    bytes a weight and the scales as stored (GGUF's float16), as GGUF stores them; the values are
    unchanged (tested)."""
    xp = np if isinstance(w.data, np.ndarray) else jnp
    *lead, k = w.shape
    v = stored_values(w, xp).reshape(*lead, k // 32, 4, 2, 4)  # [..., nb, c, e, i]
    b = v[..., 0, :] | (v[..., 1, :] << np.uint8(4))  # [..., nb, c, i]
    data = xp.swapaxes(b, -1, -2).reshape(*lead, k // 2)  # [..., nb, i, c]
    return QuantArray(data=data, scale=w.scale, min=w.min, kind=w.kind, block=32, lanes=True)


_to_lanes_on_device = jax.jit(to_lanes)  # restored onto a device: converted there, compiled once


def _cpu_layout(w: QuantArray, native_kernel: bool) -> QuantArray:
    if native_kernel and w.kind != "q8_0" and w.block == 32 and not w.lanes:
        return to_lanes(w) if isinstance(w.data, np.ndarray) else _to_lanes_on_device(w)
    if native_kernel and w.kind == "q8_0":  # one byte a value either way; the kernel reads the
        return dataclasses.replace(w, packed=False)  # scales as stored (float16: fewer bytes)
    return w if w.lanes else unpack(w)


def for_backend(tree, backend: str, matmul: str = "xla", sharded: bool = False):
    """Quantized matrices in the layout the matmul wants: on CPU unpacked for XLA, 4-bit blocks of
    32 in lane order for the native kernel (one device: with a mesh the XLA path runs), else packed."""
    if backend != "cpu" or matmul == "pallas":
        return tree
    native_kernel = matmul == "native" and not sharded
    return jax.tree.map(
        lambda a: _cpu_layout(a, native_kernel) if isinstance(a, QuantArray) else a,
        tree,
        is_leaf=lambda a: isinstance(a, QuantArray),
    )
