"""Quantized weights as a pytree type, and the one matmul entry point that dispatches on it.

A `QuantArray` holds a matrix W[..., N, K] (N outputs, K inputs) quantized in blocks of `block`
consecutive K elements, exactly as GGUF stores it:

    q8_0: data int8  [..., N, K]       w = d * q
    q4_0: data uint8 [..., N, K // 2]  w = d * (q - 8)
    q4_1: data uint8 [..., N, K // 2]  w = d * q + m

q8_0 may also carry a min (asymmetric int8: w = d * q + m). For the 4-bit kinds byte j of a block
holds element j in its low nibble and element j + block/2 in its high nibble (GGUF order). `scale` (d)
and `min` (m) are [..., N, K // block], float16 as GGUF stores them for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, or
float32 where GGUF derives them (a K-quant's d * sub-block scale; `checkpoints/ggml_types.py` lists
what each GGUF type loads as) and for per-channel int8. `block` is 16, 32 or larger (K for one scale
per row).

`packed=False` is the CPU layout made by `quant_layouts.unpack`: one 4-bit value per byte (uint8
[..., N, K]) and float32 scales. It takes 1.25 bytes per weight instead of 0.625, but XLA:CPU
dequantizes it with plain vector code (~10 G weights/s) while a nibble interleave along K does not
vectorize; decode on CPU reads 3x fewer bytes than with float32 weights. Either way the
dequantization performs the same float32 operations in the same order as `gguf.quants.dequantize`,
so the weights it produces are bit-identical (tested).

On CPU, `linear` of few rows (decode) goes to our C++ kernel (cpu_kernels/quant_gemv.cc) where
kernels.matmul == "native": it reads the weights without dequantizing them into memory (the stored
values exactly, the sums in factored form: cpu_kernels/quant_gemv.py), 4-bit blocks of 32 in its
lane order (`to_lanes`: 0.5 bytes a weight), int8 and other blocks one value per byte, the scales
as stored (float16 from GGUF: decode reads GGUF's bytes for Q4_0/Q4_1/Q8_0). A
layer-stacked matrix is handed to it as `LayerOf(stack, i)` so that the scan over layers does not
copy each layer out of the stack.

Model code never branches on quantization: it calls `linear` and `take_rows`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.cpu_kernels import quant_gemv as native
from xlaserve.pallas_kernels import tpu_matmul
from xlaserve.pallas_kernels.quantized_matmul import quantized_matmul
from xlaserve.runtime.config import XLA_KERNELS, Kernels

KINDS = ("q8_0", "q4_0", "q4_1")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantArray:
    data: jax.Array | np.ndarray
    scale: jax.Array | np.ndarray
    min: jax.Array | np.ndarray | None
    kind: str = dataclasses.field(metadata=dict(static=True), default="q8_0")
    block: int = dataclasses.field(metadata=dict(static=True), default=32)
    packed: bool = dataclasses.field(metadata=dict(static=True), default=True)
    # 4-bit blocks of 32 packed in the native CPU kernel's lane order (`to_lanes`), not GGUF's
    lanes: bool = dataclasses.field(metadata=dict(static=True), default=False)

    @property
    def shape(self) -> tuple[int, ...]:
        k = self.data.shape[-1] * (2 if self.packed and self.kind != "q8_0" else 1)
        return (*self.data.shape[:-1], k)

    @property
    def arrays(self) -> tuple:
        """(data, scale, min): what a kernel takes, beside `layout`."""
        return self.data, self.scale, self.min

    @property
    def layout(self) -> dict:
        """The static description a kernel takes: kind and block."""
        return {"kind": self.kind, "block": self.block}

    @property
    def nbytes(self) -> int:
        return sum(
            int(np.prod(a.shape)) * a.dtype.itemsize
            for a in (self.data, self.scale, self.min)
            if a is not None
        )


def stored_values(w: QuantArray, xp):
    """The stored integers as [..., N, nb, block] (unsigned nibbles for the 4-bit kinds)."""
    *lead, k = w.shape
    nb = k // w.block
    if w.kind == "q8_0" or not w.packed:
        return w.data.reshape(*lead, nb, w.block)
    if w.lanes:  # byte 4i + c of a block: value 8c + i (low nibble), 8c + i + 4 (high nibble)
        b = w.data.reshape(*lead, nb, 4, 4)  # [..., nb, i, c]
        v = xp.stack([b & np.uint8(0x0F), b >> np.uint8(4)], axis=-1)  # [..., nb, i, c, e]
        return xp.moveaxis(v, -3, -1).reshape(*lead, nb, w.block)  # [..., nb, c, e, i]: 8c + 4e + i
    packed = w.data.reshape(*lead, nb, w.block // 2)
    return xp.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)


def _scaled(w: QuantArray, q):
    """Dequantize integer blocks q [..., nb, block] with w's scales: the gguf.quants arithmetic."""
    d = w.scale.astype(np.float32)[..., None]
    if w.kind == "q8_0":
        w8 = q.astype(np.float32) * d
        return w8 if w.min is None else w8 + w.min.astype(np.float32)[..., None]  # asymmetric int8
    if w.kind == "q4_0":
        return d * (q.astype(np.int8) - np.int8(8)).astype(np.float32)
    return d * q.astype(np.float32) + w.min.astype(np.float32)[..., None]


def dequantize(w: QuantArray, dtype=jnp.float32):
    """W[..., N, K] as `dtype`. Works on numpy arrays (at load) and jax arrays (in a program)."""
    xp = np if isinstance(w.data, np.ndarray) else jnp
    out = _scaled(w, stored_values(w, xp)).reshape(w.shape)
    return out if out.dtype == dtype else out.astype(dtype)


def quantize(w: np.ndarray, kind: str, block: int, scale_dtype=np.float16) -> QuantArray:
    """Round-to-nearest quantization of W[..., N, K] (float) in blocks of `block` along K, in the
    layout `dequantize` reads (4-bit kinds packed as GGUF packs them).

    q8_0 symmetric: d = absmax / 127, q = round(w / d)                     in [-127, 127]
    q8_0 with min:  d = (max - min) / 255, q = round((w - min) / d) - 128, m = min + 128 d
    q4_0 symmetric: d = signed absmax / -8, q = round(w / d) + 8           in [0, 15]  (llama.cpp)
    q4_1:           d = (max - min) / 15, q = round((w - min) / d), m = min in [0, 15]
    Scales (and mins) are rounded to `scale_dtype` first and q is computed against the rounded
    values, so dequantization reproduces exactly what was rounded to. `kind` "q8_1" means q8_0 with
    a min (asymmetric int8)."""
    w = np.asarray(w, np.float32)
    *lead, k = w.shape
    if k % block:
        raise ValueError(f"input size {k} is not a multiple of the group size {block}")
    b = w.reshape(*lead, k // block, block)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    rnd = lambda a: np.asarray(a, scale_dtype).astype(np.float32)
    inv = lambda d: np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    m = None
    if kind == "q8_0":
        d = rnd(np.maximum(-lo, hi) / 127)
        q = np.clip(np.rint(b * inv(d)), -127, 127).astype(np.int8)
    elif kind == "q8_1":
        d = rnd((hi - lo) / 255)
        m = rnd(lo + 128 * d)
        q = np.clip(np.rint((b - m) * inv(d)), -128, 127).astype(np.int8)
    elif kind == "q4_0":
        signed = np.where(-lo > hi, lo, hi)
        d = rnd(signed / -8)
        q = np.clip(np.rint(b * inv(d)) + 8, 0, 15).astype(np.uint8)
    elif kind == "q4_1":
        d = rnd((hi - lo) / 15)
        m = rnd(lo)
        q = np.clip(np.rint((b - m) * inv(d)), 0, 15).astype(np.uint8)
    else:
        raise ValueError(f"unknown quantization kind {kind!r}; expected q8_0, q8_1, q4_0 or q4_1")
    if kind.startswith("q4"):  # element j in the low nibble, j + block/2 in the high one
        half = block // 2
        q = q[..., :half] | (q[..., half:] << np.uint8(4))
    cast = lambda a: None if a is None else a[..., 0].astype(scale_dtype)
    return QuantArray(
        data=q.reshape(*lead, -1),
        scale=cast(d),
        min=cast(m),
        kind="q8_0" if kind == "q8_1" else kind,
        block=block,
    )


def to_int8(w: QuantArray, block: int, asym: bool) -> QuantArray:
    """`w` re-expressed exactly as int8 (`q8_0`, packed) with `block` elements per scale (a divisor
    of w.block; scales repeated) and float32 scales, with a min when `asym`: dequantization gives the
    same bits (q4_0's d * (q - 8) is (q - 8) * d; a missing min becomes -0.0, which adds exactly
    nothing to any float, -0.0 included). For stacking layers stored in different layouts, such as a
    Q4_K_M file's ffn_down (Q4_K in some layers, Q6_K in others). Host (numpy) arrays."""
    if w.block % block:
        raise ValueError(f"block {block} does not divide {w.kind}'s block {w.block}")
    q = stored_values(w, np)
    q = q.astype(np.int8) - np.int8(8) if w.kind == "q4_0" else q.astype(np.int8)
    repeat = lambda a: np.repeat(np.asarray(a, np.float32), w.block // block, axis=-1)
    mins = w.min if w.min is not None or not asym else np.full(w.scale.shape, -0.0, np.float32)
    return QuantArray(
        data=q.reshape(w.shape),
        scale=repeat(w.scale),
        min=None if mins is None else repeat(mins),
        kind="q8_0",
        block=block,
    )


def map_quant(fn, w: QuantArray) -> QuantArray:
    """Apply `fn` to every stored array of `w` (each has N on axis -2), e.g. a row permutation."""
    return dataclasses.replace(
        w, data=fn(w.data), scale=fn(w.scale), min=None if w.min is None else fn(w.min)
    )


@dataclass(frozen=True)
class LayerOf:
    """Layer `index` (traced int32) of a layer-stacked QuantArray [L, N, K], not sliced out: the
    native kernel reads it in place (a custom call would be handed a copy of a dynamic slice)."""

    stack: QuantArray
    index: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack.shape[1:]

    def sliced(self) -> QuantArray:
        return map_quant(lambda a: a[self.index], self.stack)


def reads_in_place(kernels: Kernels) -> bool:
    """Whether layer-stacked matrices should reach `linear` as `LayerOf` (the native kernel's)."""
    return kernels.matmul == "native" and kernels.mesh is None


def _native(x, w: QuantArray, kernels: Kernels) -> bool:
    rows = int(np.prod(x.shape[:-1]))
    return (
        reads_in_place(kernels)
        and rows > 0
        and (rows <= native.MAX_ROWS or native.many_rows())
        and native.supported(w.kind, w.block, w.packed, w.lanes)
        and w.scale.dtype in (jnp.float32, jnp.float16)  # as the kernel reads them
    )


def _native_linears(x, stacks: list[QuantArray], layer) -> list:
    """[x @ stack[layer]^T] for stacks of one layout, in one call of the native kernel."""
    rows, first = x.reshape(-1, x.shape[-1]), stacks[0]
    ys = native.quant_gemvs(
        rows, [s.arrays for s in stacks], layer, **first.layout, packed=first.packed, lanes=first.lanes
    )
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def _dot(x, w):
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.einsum(
        "...k,nk->...n", x, w.astype(x.dtype), precision=precision, preferred_element_type=jnp.float32
    )


# Quantized matrices of more weights than this are multiplied a chunk of rows at a time, each chunk
# at most this many weights (4 MiB as float32), so each dequantized chunk stays in cache instead of
# being written out whole and read back. XLA:CPU on 2 cores: a 4096x4096 Q4_1 matrix at batch 1 in
# 30.6 ms whole, 1.7 ms in chunks of 256 rows; batch-1 decode of Qwen2.5-Coder-0.5B/1.5B 1.4x faster
# than with whole matrices below 4096 rows (bench/results/cpu-decode-chunked-dequant-ab-*.md).
CHUNK_WEIGHTS = 1 << 20


def _quant_dot(x, w: QuantArray, chunk: bool = True):
    """x[..., K] @ dequant(W)^T, W [N, K]. Dequantized values are the exact ones; only the
    summation order of the packed 4-bit path differs from a dense dot. `chunk`: dequantize large
    matrices a row chunk at a time (not when rows are split over devices)."""
    n, k = w.shape
    chunked = chunk and n * k > CHUNK_WEIGHTS
    if w.lanes:
        xs = _lanes_x(x, k)
        return _chunked(lambda part: _lanes_dot(xs, part), w, x.shape[:-1]) if chunked else _lanes_dot(xs, w)
    if not w.packed:
        product = lambda part: _dot(x, _scaled(part, stored_values(part, jnp)).reshape(part.shape))
        return _chunked(product, w, x.shape[:-1]) if chunked else product(w)
    if w.kind == "q8_0":
        return _dot(x, dequantize(w))
    # Packed nibbles: split x into the halves of each block that meet the low and the high nibbles
    # rather than interleaving nibbles along K (which XLA:CPU cannot vectorize), and add the products.
    nb, half = k // w.block, w.block // 2
    q = w.data.reshape(n, nb, half)
    lo = _scaled(w, q & np.uint8(0x0F)).reshape(n, k // 2)
    hi = _scaled(w, q >> np.uint8(4)).reshape(n, k // 2)
    xb = x.reshape(*x.shape[:-1], nb, w.block)
    x_lo = xb[..., :half].reshape(*x.shape[:-1], k // 2)
    x_hi = xb[..., half:].reshape(*x.shape[:-1], k // 2)
    return _dot(x_lo, lo) + _dot(x_hi, hi)


def chunk_count(n: int, k: int) -> int:
    """Chunks of equal rows for an [n, k] matrix: the fewest with at most CHUNK_WEIGHTS weights
    each; where n has no divisor near that count (Qwen2.5's 151936-row vocabulary is 2^7 x 1187),
    the most below it, slightly larger chunks rather than a scan of a thousand small ones."""
    fewest = -(-n * k // CHUNK_WEIGHTS)
    divisors = [c for c in range(1, n + 1) if n % c == 0]
    above = min(c for c in divisors if c >= fewest)
    return above if above <= 2 * fewest else max(c for c in divisors if c <= fewest)


def _chunked(product, w: QuantArray, lead: tuple) -> jax.Array:
    """product(part) [..., rows] for each chunk of W's rows (chunk_count), joined: [*lead, N]."""
    n, k = w.shape
    chunks = chunk_count(n, k)
    split = map_quant(lambda a: a.reshape(chunks, n // chunks, *a.shape[1:]), w)
    _, ys = jax.lax.scan(lambda _, part: (None, product(part)), None, split)  # [chunks, ..., n / chunks]
    return jnp.moveaxis(ys, 0, -2).reshape(*lead, n)


def _lanes_x(x, k: int):
    """x[..., K] in the byte order of lane-order blocks (`to_lanes`): (the x meeting the low
    nibbles, the x meeting the high ones), each [..., K/2]: byte 4i + c meets x[8c + i] and
    x[8c + i + 4]. Permuting the activations rather than the nibbles keeps XLA's dequantization
    plain vector code."""
    xb = x.reshape(*x.shape[:-1], k // 32, 4, 2, 4)  # [..., nb, c, e, i]
    half = lambda e: jnp.swapaxes(xb[..., e, :], -1, -2).reshape(*x.shape[:-1], k // 2)
    return half(0), half(1)


def _lanes_dot(xs, w: QuantArray):
    n, k = w.shape
    q = w.data.reshape(n, k // 32, 16)
    lo = _scaled(w, q & np.uint8(0x0F)).reshape(n, k // 2)
    hi = _scaled(w, q >> np.uint8(4)).reshape(n, k // 2)
    return _dot(xs[0], lo) + _dot(xs[1], hi)


def linear(
    x: jax.Array, w, *, out_dtype=None, kernels: Kernels = XLA_KERNELS, spec=(None, None)
) -> jax.Array:
    """x[..., K] @ W[N, K]^T -> [..., N]; W dense or `QuantArray`. Accumulates in float32.

    With kernels.matmul == "pallas" a packed QuantArray goes through our Pallas kernel (Triton's on
    GPU, Mosaic's on TPU, where shapes it does not take use the XLA path); on a mesh
    the kernel runs per shard under shard_map, `spec` = (output axis, input axis) of W: a split
    input axis (row-parallel) ends with a psum. With kernels.matmul == "native" (CPU, no mesh), few
    rows of x times a quantized W (or a `LayerOf`) go through our C++ kernel."""
    if isinstance(w, LayerOf):
        if _native(x, w.stack, kernels):
            return _native_linears(x, [w.stack], w.index)[0].astype(out_dtype or x.dtype)
        w = w.sliced()
    if isinstance(w, QuantArray) and w.data.ndim == 2 and _native(x, w, kernels):
        (y,) = _native_linears(x, [map_quant(lambda a: a[None], w)], 0)
    elif isinstance(w, QuantArray) and w.packed and kernels.matmul == "pallas":
        y = _pallas_linear(x, w, kernels, spec)
    elif isinstance(w, QuantArray):
        y = _quant_dot(x, w, chunk=kernels.mesh is None)
    else:
        y = _dot(x, w)
    return y.astype(out_dtype or x.dtype)


def linears(x: jax.Array, ws, *, out_dtype=None, kernels: Kernels = XLA_KERNELS, specs=None) -> list:
    """[linear(x, w) for w in ws] (specs: each w's `spec`), with the matrices the native kernel
    reads in place (`LayerOf`s of one layer) multiplied in one kernel call per layout: a layer's q,
    k and v, or gate and up, wake the CPU's threads once. Each result equals its `linear`'s."""
    specs = specs or [(None, None)] * len(ws)
    out = [None] * len(ws)
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(ws):
        if isinstance(w, LayerOf) and _native(x, w.stack, kernels):
            s = w.stack
            key = (id(w.index), s.kind, s.block, s.packed, s.lanes, s.min is None)
            groups.setdefault(key, []).append(i)
        else:
            out[i] = linear(x, w, out_dtype=out_dtype, kernels=kernels, spec=specs[i])
    for members in groups.values():
        ys = _native_linears(x, [ws[i].stack for i in members], ws[members[0]].index)
        for i, y in zip(members, ys, strict=True):
            out[i] = y.astype(out_dtype or x.dtype)
    return out


def _pallas_linear(x, w: QuantArray, kernels: Kernels, spec):
    tpu = kernels.pallas_platform == "tpu"

    def local(x, w):
        n, k = w.shape
        if tpu and tpu_matmul.unsupported(n, k, w.kind, w.block, w.min is not None):
            y = _quant_dot(x, w, chunk=kernels.mesh is None)  # a shape the Mosaic kernel does not take
        else:
            kernel = tpu_matmul.quantized_matmul if tpu else quantized_matmul
            y = kernel(x.reshape(-1, x.shape[-1]), *w.arrays, **w.layout, interpret=kernels.interpret)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return jax.lax.psum(y, "tp") if in_axis else y

    out_axis, in_axis = spec
    # A replicated matrix needs no shard_map, except for a Mosaic kernel, which XLA cannot
    # partition: every device then runs it on its whole copy.
    if kernels.mesh is None or (spec == (None, None) and not tpu):
        return local(x, w)
    from jax.sharding import PartitionSpec as P

    lead = [None] * (x.ndim - 1)
    w_spec = map_quant(lambda _: P(out_axis, in_axis), w)
    return jax.shard_map(
        local,
        mesh=kernels.mesh,
        in_specs=(P(*lead, in_axis), w_spec),
        out_specs=P(*lead, out_axis),
        check_vma=False,
    )(x, w)


def take_rows(w, ids: jax.Array, dtype) -> jax.Array:
    """Rows W[ids] (an embedding lookup) as `dtype`, dequantizing only the rows taken."""
    if isinstance(w, QuantArray):
        rows = map_quant(lambda a: jnp.take(a, ids, axis=0), w)
        return dequantize(rows, dtype)
    return jnp.take(w, ids, axis=0).astype(dtype)
