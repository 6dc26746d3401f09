"""Grouped matmul for TPU (Pallas/Mosaic): `grouped_matmul.grouped_matmul`'s contract (rows of lhs
[M, K] sorted by group, group g's rows times rhs[g]^T, rhs [G, N, K] stored [out, in], float32
[M, N], zeros past sum(group_sizes)); `grouped_matmul_reference` is this kernel's reference too.

Dense (float32/bfloat16) rhs runs megablox's `gmm` itself (jax.experimental.pallas.ops.tpu
.megablox, `transpose_rhs=True` reads our [out, in] layout as stored).

Quantized rhs (the packed layouts of quantized_matmul.py) runs megablox's design with our
quantized tile: megablox's `make_group_metadata` lists the (group, row tile) visits, scalar-
prefetched so that the block index maps pick each visit's rows of x and its group's weight and
scale tiles; grid (N / bn, visits, K-tiles), its visit count known only at run time. Each step is
`tpu_matmul`'s tile step (bytes widened, nibbles split, scaled in VMEM, multiplied on the MXU)
accumulating into a float32 VMEM scratch; after the last K-tile the rows of the visit's group are
stored into the output tile, which stays resident while consecutive visits share its row tile (a
tile straddling a group boundary is visited once per group). Rows no visit covers (past
sum(sizes)) are zeroed by XLA afterwards.

`unsupported` says which shapes neither takes (the runtime then uses jax.lax.ragged_dot).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm, make_group_metadata

from . import tpu_matmul
from .tpu_matmul import LANES


def unsupported(n: int, k: int, kind: str | None, block: int | None, has_mins: bool, dtype) -> str | None:
    """Why the kernels cannot take this rhs (None: they can)."""
    if kind is not None:
        return tpu_matmul.unsupported(n, k, kind, block, has_mins)
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"{jnp.dtype(dtype).name} experts (megablox takes float32 or bfloat16)"
    return None


def _tile(size: int) -> int:
    """A megablox tile along K or N: whole when small or not lane-aligned, else ≤ 512 lanes."""
    if size <= 512 or size % LANES:
        return size
    return next(t for t in (512, 256, 128) if size % t == 0)


def _kernel(
    offsets_ref, gids_ref, mids_ref, x_lo_ref, x_hi_ref, w_ref, d_ref, m_ref, o_ref, acc_ref, *, step
):
    """One (column tile, visit, K-tile) step: `step` (tpu_matmul's) accumulates into acc [bm, bn]."""
    step(x_lo_ref, x_hi_ref, w_ref, d_ref, m_ref, acc_ref)
    visit = pl.program_id(1)  # read outside pl.when: interpret mode has no program ids inside a cond

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        g, bm = gids_ref[visit], acc_ref.shape[0]
        rows = mids_ref[visit] * bm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mine = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])
        o_ref[...] = jnp.where(mine, acc_ref[...], o_ref[...])


def _quantized(x, data, group_sizes, scale, mins, *, kind, block, interpret):
    m, k = x.shape
    g, n = data.shape[:2]
    four_bit = kind != "q8_0"
    cols, gcols, per_channel = tpu_matmul._layout(k, kind, block, mins is not None)
    x_parts = 2 if four_bit else 1
    bm, bn, tc = tpu_matmul._tiles(min(m, 128), n, cols, gcols, not per_channel, x.dtype.itemsize, x_parts)
    mp = -(-m // bm) * bm
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    if four_bit:
        xg = x.reshape(mp, k // block, block)
        x_lo, x_hi = xg[..., : block // 2].reshape(mp, cols), xg[..., block // 2 :].reshape(mp, cols)
    else:
        x_lo, x_hi = x, None
    data = jax.lax.bitcast_convert_type(data, jnp.int8) if data.dtype == jnp.uint8 else data
    meta, visits = make_group_metadata(
        group_sizes=group_sizes,
        m=mp,
        tm=bm,
        start_group=jnp.int32(0),
        num_nonzero_groups=g,
        visit_empty_groups=False,
    )
    offsets, gids, mids = meta
    x_spec = pl.BlockSpec((bm, tc), lambda j, v, kt, offs, gids, mids: (mids[v], kt))
    w_spec = pl.BlockSpec((None, bn, tc), lambda j, v, kt, offs, gids, mids: (gids[v], j, kt))
    if per_channel:
        scale, mins = scale.reshape(g, 1, n), None
        s_spec = pl.BlockSpec((None, 1, bn), lambda j, v, kt, offs, gids, mids: (gids[v], 0, j))
    else:
        shape, at = tpu_matmul.scale_block(k // block, cols, gcols, tc, bn)
        s_spec = pl.BlockSpec((None, *shape), lambda j, v, kt, offs, gids, mids: (gids[v], *at(j, kt)))
    step = functools.partial(
        tpu_matmul._kernel,
        kind=kind,
        gcols=gcols,
        per_channel=per_channel,
        asym=not four_bit and mins is not None,
    )
    out = pl.pallas_call(
        functools.partial(_kernel, step=step),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(n // bn, visits, cols // tc),
            in_specs=[
                x_spec,
                x_spec if four_bit else None,
                w_spec,
                s_spec,
                s_spec if mins is not None else None,
            ],
            out_specs=pl.BlockSpec((bm, bn), lambda j, v, kt, offs, gids, mids: (mids[v], j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name=f"xlaserve_grouped_matmul_{kind}",
    )(offsets, gids, mids, x_lo, x_hi, data, scale, mins)
    return out[:m]


@functools.partial(jax.jit, static_argnames=("kind", "block", "interpret"))
def grouped_matmul(lhs, rhs, group_sizes, scale=None, mins=None, *, kind=None, block=None, interpret=None):
    """As `grouped_matmul.grouped_matmul`: lhs [M, K] sorted by group, rhs [G, N, K] dense or packed
    (kind, block, scale, mins) -> [M, N] float32."""
    m, k = lhs.shape
    n = rhs.shape[1]
    why = unsupported(n, k, kind, block, mins is not None, rhs.dtype)
    assert why is None, why
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    group_sizes = group_sizes.astype(jnp.int32)
    if kind is None:
        tm = 16 if m <= 16 else min(128, -(-m // 16) * 16)
        mp = -(-m // tm) * tm
        x = jnp.pad(lhs, ((0, mp - m), (0, 0)))
        tiling = (tm, _tile(k), _tile(n))
        out = gmm(x, rhs, group_sizes, jnp.float32, tiling, transpose_rhs=True, interpret=interpret)
        out = out[:m]
    else:
        out = _quantized(lhs, rhs, group_sizes, scale, mins, kind=kind, block=block, interpret=interpret)
    covered = jnp.arange(m) < group_sizes.sum()  # rows past every group: no visit wrote them
    return jnp.where(covered[:, None], out, 0.0)
