"""Parameter declarations and everything generic that is derived from them.

A family declares each weight once as a `ParamInfo` (shape, logical axes, whether it is a matrix
that may be quantized) in a pytree shaped like its `Weights`. From that one tree come: names
("layers.wq", the pytree path), shape checks at load, random weights for benchmarks, convert-time
quantization (matrices only), orbax save/restore targets and shardings. Nothing here knows a
family's field names.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime.quant import QuantArray


@dataclass(frozen=True)
class ParamInfo:
    """One declaration per array: its shape, its logical axes (for sharding), whether it is a
    matrix [..., out, in] that may be quantized (norms, biases and other vectors never are), and,
    for an array stacked over layers (leading axis "layers"), which of the model's layers it stacks.

    Per-layer variants are separate stacks: a family whose layers 0-1 are dense and 2-23 MoE
    declares one stack with layers (0, 1) and another with (2, ..., 23), and scans each."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    matrix: bool
    layers: tuple[int, ...] | None = None


def declare(*shape_axes: tuple[int, str | None], matrix: bool) -> ParamInfo:
    """ParamInfo from (size, logical axis) pairs: declare((V, "vocab"), (D, "embed"), matrix=True)."""
    return ParamInfo(tuple(s for s, _ in shape_axes), tuple(a for _, a in shape_axes), matrix)


def declare_stacked(layers, *shape_axes: tuple[int, str | None], matrix: bool) -> ParamInfo:
    """A per-layer array of the model layers `layers` (indices), stacked on a leading axis."""
    layers = tuple(layers)
    info = declare((len(layers), "layers"), *shape_axes, matrix=matrix)
    return ParamInfo(info.shape, info.axes, matrix, layers)


def is_info(x) -> bool:
    return isinstance(x, ParamInfo)


def is_leaf(x) -> bool:
    """A weight leaf: a QuantArray counts as one weight, not as its parts."""
    return isinstance(x, QuantArray)


def path_name(path) -> str:
    """A pytree path as a dotted weight name: "layers.wq", "embed"."""
    return ".".join(str(getattr(k, "name", getattr(k, "key", k))) for k in path)


def named(tree, leaf=is_leaf) -> dict:
    """{"embed": leaf, "layers.wq": leaf, ...} in pytree order (None leaves, e.g. a tied lm_head,
    are absent)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)[0]
    return {path_name(path): x for path, x in flat}


def declared(infos) -> dict[str, ParamInfo]:
    """The declarations by name."""
    return named(infos, is_info)


def from_named(infos, by_name: dict):
    """A weights pytree shaped like the declarations `infos`, leaves taken from `by_name`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(infos, is_leaf=is_info)
    return jax.tree.unflatten(treedef, [by_name[path_name(path)] for path, _ in flat])


def check_shapes(infos, weights, source: str) -> None:
    """Raise ValueError naming the first array whose shape differs from its declaration."""
    want, have = declared(infos), named(weights)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ValueError(f"{source}: weights {missing or extra} are {'missing' if missing else 'unexpected'}")
    for name, info in want.items():
        if tuple(have[name].shape) != info.shape:
            raise ValueError(
                f"{source}: weight {name} has shape {tuple(have[name].shape)}, expected {info.shape}"
            )


def random_weights(infos, seed: int = 0, dtype=jnp.bfloat16):
    """Random weights with the declared shapes (benchmark presets): matrices ~ N(0, 1/K), vectors
    ones."""
    leaves, treedef = jax.tree.flatten(infos, is_leaf=is_info)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def init(info: ParamInfo, key):
        if not info.matrix:
            return jnp.ones(info.shape, dtype)
        return (jax.random.normal(key, info.shape, jnp.float32) * info.shape[-1] ** -0.5).astype(dtype)

    return jax.tree.unflatten(treedef, [init(i, k) for i, k in zip(leaves, keys, strict=True)])


def random_quantized(infos, kind: str, dtype, seed: int = 0):
    """Random weights with the declared shapes, every matrix a QuantArray of `kind` in GGUF's packed
    layout (random codes, scales ~ 1/sqrt(K)): the bytes and arithmetic of a quantized checkpoint
    (the values do not change the speed, so they are not quantized from float weights)."""
    leaves, treedef = jax.tree.flatten(infos, is_leaf=is_info)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def init(info: ParamInfo, key):
        if not info.matrix:
            return jnp.ones(info.shape, dtype)
        *lead, k = info.shape
        kd, ks = jax.random.split(key)
        data = jax.random.bits(kd, (*lead, k if kind == "q8_0" else k // 2), jnp.uint8)
        if kind == "q8_0":
            data = jax.lax.bitcast_convert_type(data, jnp.int8)
        # int8 as `xlaserve convert --quant int8` writes it (one float32 scale per output channel);
        # 4-bit in GGUF's float16-scaled groups of 32
        block, span = (k, 127.0) if kind == "q8_0" else (32, 8.0)
        scale = jax.random.uniform(ks, (*lead, k // block), jnp.float32, 0.5, 1.5) * (1.7 * k**-0.5 / span)
        scale = scale if kind == "q8_0" else scale.astype(jnp.float16)
        mins = -8.0 * scale if kind == "q4_1" else None
        return QuantArray(data=data, scale=scale, min=mins, kind=kind, block=block)

    return jax.tree.unflatten(treedef, [init(i, k) for i, k in zip(leaves, keys, strict=True)])


def cast_weights(weights, dtype):
    """Dense arrays to `dtype`; quantized arrays are left as they are."""
    return jax.tree.map(lambda a: a if is_leaf(a) else a.astype(dtype), weights, is_leaf=is_leaf)


def weight_bytes(weights) -> int:
    """Bytes the weights occupy (quantized arrays at their stored size)."""
    leaves = jax.tree.leaves(weights, is_leaf=is_leaf)
    return sum(a.nbytes if is_leaf(a) else int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves)
