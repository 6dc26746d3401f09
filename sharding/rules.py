"""Logical axes -> mesh axes: one rules table, and the partition spec of one declared array.

Model code names logical axes (each family declares them per weight); RULES maps each to a mesh
axis. With tp on the "tp" axis this gives column-parallel q/k/v/gate/up (their output axis is
split), row-parallel o/down (their input axis is split; XLA adds one all-reduce after each), and a
vocab-parallel embedding / lm_head, and experts split over "ep" (expert parallelism; everything
else is replicated over ep). An axis is split only where it divides evenly at its granule
(whole heads for q/k/v, whole quantization blocks for a quantized input axis); otherwise that axis
is replicated, e.g. SmolLM2's 3 kv heads and 9 query heads at tp=2 or 4.

This module is a leaf: it takes shapes and axis names, and knows no model or weight type
(`runtime/placement.py` walks a model's declarations through it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

RULES: dict[str, str | None] = {
    "layers": None,
    "embed": None,
    "q_heads": "tp",
    "kv_heads": "tp",
    "ffw": "tp",
    "vocab": "tp",
    "experts": "ep",
}


def check_rules(axes: Iterable[tuple[str | None, ...]], rules: Mapping[str, str | None] = RULES) -> None:
    """Every array (given by its logical axes) must map its axes to distinct mesh axes."""
    for array_axes in axes:
        used = [rules.get(a) for a in array_axes if rules.get(a) is not None]
        if len(used) != len(set(used)):
            raise ValueError(f"rules map two logical axes of {array_axes} to one mesh axis: {used}")


def axis_spec(
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    mesh: Mesh,
    rules: Mapping[str, str | None] = RULES,
    granules: Mapping[str, int] | None = None,
    block: int = 1,
) -> P:
    """The PartitionSpec of one array. `granules`: the smallest unit of a logical axis that may go
    to one device (a head's head_dim for the head axes); `block`: the quantization block along the
    last (input) axis, which must not be cut inside a block."""
    spec = []
    for i, (size, axis) in enumerate(zip(shape, axes, strict=True)):
        mesh_axis = rules.get(axis) if axis else None
        n = mesh.shape.get(mesh_axis, 1) if mesh_axis else 1
        unit = (granules or {}).get(axis, 1) * (block if i == len(shape) - 1 else 1)
        spec.append(mesh_axis if n > 1 and size % unit == 0 and (size // unit) % n == 0 else None)
    return P(*spec)


def cache_spec(num_kv_heads: int, mesh: Mesh) -> P:
    """The KV cache [L, N, P, H, D]: kv heads across tp when they divide; otherwise replicated."""
    tp = mesh.shape.get("tp", 1)
    return P(None, None, None, "tp" if tp > 1 and num_kv_heads % tp == 0 else None, None)


def place(weights, shardings):
    """Host (numpy) arrays onto devices: each device receives only its own slice. Device arrays are
    resharded in place (a no-op when a checkpoint was restored with these shardings). `shardings`
    is a pytree with the structure of `weights` and NamedSharding leaves."""

    def put(host, sharding):
        if isinstance(host, jax.Array):  # already on devices (a restored checkpoint): reshard there
            return jax.device_put(host, sharding)
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    leaves, treedef = jax.tree.flatten(weights)
    specs = treedef.flatten_up_to(shardings)
    return jax.tree.unflatten(treedef, [put(h, s) for h, s in zip(leaves, specs, strict=True)])
