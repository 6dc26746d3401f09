"""Weight-only quantized matmul for TPU (Pallas/Mosaic): y[M, N] = x[M, K] @ dequant(W)^T in float32,
for the packed layouts `quantized_matmul.py` documents (its `quantized_matmul_reference` is this
kernel's reference too): int8 (`q8_0`) in groups of 16/32/... or per channel, with or without mins,
and 4-bit (`q4_0`, `q4_1`) in groups of 32/64/128 with GGUF's half-group nibble order. This covers
GGUF's Q8_0, Q4_0, Q4_1, Q5_x and the K-quants as `runtime/quant.py` loads them, and the
convert-time int8/int4 per-channel types.

No public TPU kernel takes these layouts (tpu-inference's quantized matmuls are per-channel or
sub-channel int8/int4 without GGUF's group-of-32 mins), so this one is ours.

Grid (M / bm, N / bn, K-tiles); the output block is the float32 accumulator (its index does not
move along K). Each step reads a weight tile [bn, tc] (tc stored columns, a multiple of 128) and
walks it 128 columns at a time: the bytes are widened to int32, split into nibbles, converted to
float32 and scaled in VMEM (the same float32 operations as `dequantize_reference`), then cast to
x's dtype and multiplied by the matching 128 columns of x on the MXU, accumulating in float32.
Scales stay in their [N, K / g] layout: a K-tile covers a multiple of 128 groups (or all of K),
so the scale block is lane-aligned; each 128-column chunk's scales are spread over its columns by
a lane gather (`take_along_axis`, Mosaic's dynamic_gather) from the 128-group vreg that holds them.
For per-channel int8 the scale multiplies the accumulator once at the end. As in the Triton
kernel, 4-bit x is split outside the kernel (a reshape) into the halves of each group that meet
the low and the high nibbles.

`unsupported` says which shapes it does not take (the runtime then uses the XLA path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
NT = (((1,), (1,)), ((), ()))  # dot_general: a [m, k] x b [n, k] -> [m, n]
VMEM_BUDGET = 12 * 2**20  # below every TPU generation's default scoped VMEM limit (16 MiB)


def _layout(k: int, kind: str, block: int, has_mins: bool):
    """(stored columns per row, columns per group, per-channel: one scale per row, no mins)."""
    four_bit = kind != "q8_0"
    cols = k // 2 if four_bit else k
    gcols = block // 2 if four_bit else block
    return cols, gcols, (not four_bit and block == k and not has_mins)


def unsupported(n: int, k: int, kind: str, block: int, has_mins: bool) -> str | None:
    """Why the kernel cannot take this weight (None: it can)."""
    cols, gcols, per_channel = _layout(k, kind, block, has_mins)
    if cols % LANES:
        return f"{cols} stored columns per row (a multiple of {LANES})"
    if n % LANES and (n % 8 or n > 2048):
        return f"{n} output rows (a multiple of {LANES}, or of 8 up to 2048)"
    if not per_channel and block != k and gcols & (gcols - 1):
        return f"group size {block} (a power of two)"
    return None


def _tiles(m: int, n: int, cols: int, gcols: int, grouped: bool, x_bytes: int, x_parts: int):
    """(bm, bn, tc): rows of x, rows of W and stored columns of W per grid step."""
    bn = 256 if n % 256 == 0 else LANES if n % LANES == 0 else n
    unit = LANES * gcols if grouped and gcols < cols else LANES  # tc: whole 128-group scale blocks
    if cols % unit:
        tc = cols  # one K-tile; its scale block is all of K (rounded up to 128 groups)
    else:
        tc = unit
        while cols % (2 * tc) == 0 and 2 * tc <= max(2048, unit):
            tc *= 2
    bm = 16 if m <= 16 else min(256, -(-m // 16) * 16)

    def vmem(bm, bn):  # double-buffered x parts, weights and output
        return 2 * (bm * tc * x_bytes * x_parts + bn * tc + bm * bn * 4)

    while vmem(bm, bn) > VMEM_BUDGET and bm > 16:
        bm //= 2
    while vmem(bm, bn) > VMEM_BUDGET and bn > LANES and bn % 2 == 0 and (bn // 2) % LANES == 0:
        bn //= 2
    return bm, bn, tc


def _kernel(x_lo_ref, x_hi_ref, w_ref, d_ref, m_ref, o_ref, *, kind, gcols, per_channel, asym):
    """One (rows, cols, K-tile) step. x_lo/x_hi [bm, tc] (for int8 x_hi is unused); w [bn, tc]
    int8; d, m [bn, groups of the tile rounded up to 128] float (per channel: d [1, bn])."""
    kt = pl.program_id(2)
    bn, tc = w_ref.shape
    four_bit = kind != "q8_0"

    @pl.when(kt == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    def product(x, w):
        return jax.lax.dot_general(x, w.astype(x.dtype), NT, preferred_element_type=jnp.float32)

    def spread(s, c, v):
        """s [bn, 128] (groups 128v ..) or [bn, 1] -> [bn, 128]: the scale of each column of chunk c."""
        if s.shape[1] == 1:
            return jnp.broadcast_to(s, (bn, LANES))
        col = c * LANES + jax.lax.broadcasted_iota(jnp.int32, (bn, LANES), 1)
        idx = jax.lax.shift_right_logical(col, gcols.bit_length() - 1) - v * LANES
        return jnp.take_along_axis(s, idx, axis=1, mode="promise_in_bounds")

    def chunk(c, v, d, m):
        span = pl.ds(pl.multiple_of(c * LANES, LANES), LANES)
        w = w_ref[:, span]
        if not four_bit:
            w = w.astype(jnp.float32)
            if not per_channel:
                w = w * spread(d, c, v)
                if asym:
                    w = w + spread(m, c, v)
            return product(x_lo_ref[:, span], w)
        wi = w.astype(jnp.int32)
        lo = (wi & 0x0F).astype(jnp.float32)
        hi = (jax.lax.shift_right_logical(wi, 4) & 0x0F).astype(jnp.float32)
        dc = spread(d, c, v)
        if kind == "q4_0":
            lo, hi = dc * (lo - 8.0), dc * (hi - 8.0)
        else:
            mc = spread(m, c, v)
            lo, hi = lo * dc + mc, hi * dc + mc
        return product(x_lo_ref[:, span], lo) + product(x_hi_ref[:, span], hi)

    chunks = tc // LANES
    if per_channel:
        acc = jax.lax.fori_loop(0, chunks, lambda c, a: a + chunk(c, 0, None, None), o_ref[...])
        o_ref[...] = acc
    else:
        # scale vreg v (groups 128v .. 128v+127) serves chunks [v * gcols, (v + 1) * gcols)
        groups = tc // gcols if gcols <= tc else 1
        acc = o_ref[...]
        for v in range(-(-groups // LANES) if groups > 1 else 1):
            width = LANES if groups > 1 else 1  # the scale block is whole vregs (rounded up)
            d = d_ref[:, pl.ds(v * LANES, width)].astype(jnp.float32)
            m = m_ref[:, pl.ds(v * LANES, width)].astype(jnp.float32) if m_ref is not None else None
            first, last = (v * gcols, min((v + 1) * gcols, chunks)) if groups > 1 else (0, chunks)
            acc = jax.lax.fori_loop(first, last, lambda c, a, v=v, d=d, m=m: a + chunk(c, v, d, m), acc)
        o_ref[...] = acc

    if per_channel:

        @pl.when(kt == pl.num_programs(2) - 1)
        def _():
            o_ref[...] = o_ref[...] * d_ref[...].astype(jnp.float32)


def scale_block(groups: int, cols: int, gcols: int, tc: int, bn: int):
    """(block shape, index map (j, kt) -> block index) of grouped scales (or mins) [N, groups] for
    weight tiles [bn, tc] of W's `cols` stored columns, `gcols` per group."""
    per_tile = tc // gcols if gcols <= tc else 1
    if per_tile == 1:
        return (bn, 1), lambda j, kt: (j, jax.lax.div(kt * tc, gcols))
    if tc == cols:  # all of K in one tile: the scale block is all groups (partial block)
        return (bn, -(-groups // LANES) * LANES), lambda j, kt: (j, 0)
    return (bn, per_tile), lambda j, kt: (j, kt)


@functools.partial(jax.jit, static_argnames=("kind", "block", "interpret"))
def quantized_matmul(x, data, scale, mins, *, kind: str, block: int, interpret: bool | None = None):
    """x [M, K] @ dequant(W)^T -> [M, N] float32; arguments as `quantized_matmul.quantized_matmul`
    (W as data, scale, mins of `kind` in groups of `block`; mins None unless q4_1 or asymmetric
    int8)."""
    m, k = x.shape
    n = data.shape[0]
    four_bit = kind != "q8_0"
    assert k == data.shape[1] * (2 if four_bit else 1), (x.shape, data.shape, kind)
    why = unsupported(n, k, kind, block, mins is not None)
    assert why is None, why
    cols, gcols, per_channel = _layout(k, kind, block, mins is not None)
    asym = not four_bit and mins is not None
    bm, bn, tc = _tiles(m, n, cols, gcols, not per_channel, x.dtype.itemsize, 2 if four_bit else 1)
    mp = -(-m // bm) * bm
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    if four_bit:
        xg = x.reshape(mp, k // block, block)
        x_lo = xg[..., : block // 2].reshape(mp, cols)
        x_hi = xg[..., block // 2 :].reshape(mp, cols)
    else:
        x_lo = x_hi = x
    data = jax.lax.bitcast_convert_type(data, jnp.int8) if data.dtype == jnp.uint8 else data
    x_spec = pl.BlockSpec((bm, tc), lambda i, j, kt: (i, kt))
    in_specs = [x_spec, x_spec if four_bit else None, pl.BlockSpec((bn, tc), lambda i, j, kt: (j, kt))]
    if per_channel:
        scale, mins = scale.reshape(1, n), None
        in_specs += [pl.BlockSpec((1, bn), lambda i, j, kt: (0, j)), None]
    else:
        shape, at = scale_block(k // block, cols, gcols, tc, bn)
        g_spec = pl.BlockSpec(shape, lambda i, j, kt: at(j, kt))
        in_specs += [g_spec, g_spec if mins is not None else None]
    kernel = functools.partial(_kernel, kind=kind, gcols=gcols, per_channel=per_channel, asym=asym)
    out = pl.pallas_call(
        kernel,
        grid=(mp // bm, n // bn, cols // tc),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kt: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=jax.default_backend() == "cpu" if interpret is None else interpret,
        name=f"xlaserve_quantized_matmul_{kind}",
    )(x_lo, x_hi if four_bit else None, data, scale, mins)
    return out[:m]
