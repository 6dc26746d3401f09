"""Logical axes -> mesh axes: one rules table, partition specs for every weight, the KV cache, and
weights placed straight into their shards.

Model code names logical axes (`runtime/llama.py` declares them per weight); RULES maps each to a
mesh axis. With tp on the "tp" axis this gives column-parallel q/k/v/gate/up (their output axis
is split), row-parallel o/down (their input axis is split; XLA adds one all-reduce after each),
and a vocab-parallel embedding / lm_head. An axis is split only where it divides evenly at its
granule (whole heads for q/k/v, whole quantization blocks for a quantized input axis); otherwise
that axis is replicated, e.g. SmolLM2's 3 kv heads and 9 query heads at tp=2 or 4.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.llama import ParamInfo, Weights, is_info, param_info
from xlaserve.runtime.quant import QuantArray

RULES: dict[str, str | None] = {
    "layers": None,
    "embed": None,
    "q_heads": "tp",
    "kv_heads": "tp",
    "ffw": "tp",
    "vocab": "tp",
}


def check_rules(rules: dict[str, str | None]) -> None:
    """Every array must map its logical axes to distinct mesh axes."""
    for info in jax.tree.leaves(param_info(_probe()), is_leaf=is_info):
        used = [rules.get(a) for a in info.axes if rules.get(a) is not None]
        if len(used) != len(set(used)):
            raise ValueError(f"rules map two logical axes of {info.axes} to one mesh axis: {used}")


def _probe() -> ModelConfig:
    return ModelConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
    )


def _granule(cfg: ModelConfig, axis: str | None) -> int:
    return cfg.head_dim if axis in ("q_heads", "kv_heads") else 1


def axis_spec(cfg: ModelConfig, info: ParamInfo, mesh: Mesh, rules=RULES, block: int = 1) -> P:
    """The PartitionSpec of one declared array. `block`: the quantization block along the last
    (input) axis, which must not be cut inside a block."""
    spec = []
    for i, (size, axis) in enumerate(zip(info.shape, info.axes, strict=True)):
        mesh_axis = rules.get(axis) if axis else None
        n = mesh.shape.get(mesh_axis, 1) if mesh_axis else 1
        unit = _granule(cfg, axis) * (block if i == len(info.shape) - 1 else 1)
        spec.append(mesh_axis if n > 1 and size % unit == 0 and (size // unit) % n == 0 else None)
    return P(*spec)


def matrix_spec(cfg: ModelConfig, info: ParamInfo, mesh: Mesh, block: int = 1, rules=RULES) -> tuple:
    """(output axis, input axis) mesh axes of a matrix's last two dims: ("tp", None) column-parallel,
    (None, "tp") row-parallel, (None, None) replicated."""
    return tuple(axis_spec(cfg, info, mesh, rules, block))[-2:]


def _shard_spec_for(array, info: ParamInfo, cfg, mesh, rules) -> object:
    """A NamedSharding (or, for a QuantArray, a QuantArray of them) for one weight."""
    if not isinstance(array, QuantArray):
        return NamedSharding(mesh, axis_spec(cfg, info, mesh, rules))
    # data/scale/min share the leading axes; their last axis is K, K/2 or K/block.
    spec = axis_spec(cfg, info, mesh, rules, block=array.block)
    ns = NamedSharding(mesh, spec)
    return dataclasses.replace(array, data=ns, scale=ns, min=None if array.min is None else ns)


def weight_shardings(cfg: ModelConfig, weights: Weights, mesh: Mesh, rules=RULES) -> Weights:
    """A pytree shaped like `weights` whose leaves are NamedShardings."""
    infos = param_info(cfg)
    return jax.tree.map(
        lambda info, arr: _shard_spec_for(arr, info, cfg, mesh, rules),
        infos,
        weights,
        is_leaf=lambda x: is_info(x) or isinstance(x, QuantArray),
    )


def cache_spec(cfg: ModelConfig, mesh: Mesh) -> P:
    """[L, N, P, H, D]: kv heads across tp when they divide; otherwise replicated."""
    tp = mesh.shape.get("tp", 1)
    return P(None, None, None, "tp" if tp > 1 and cfg.num_kv_heads % tp == 0 else None, None)


def place(weights: Weights, shardings: Weights) -> Weights:
    """Host (numpy) weights onto devices: each device receives only its own slice. Device arrays
    are resharded in place (a no-op when a checkpoint was restored with these shardings)."""

    def put(host, sharding):
        if isinstance(host, jax.Array):  # already on devices (a restored checkpoint): reshard there
            return jax.device_put(host, sharding)
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    leaves, treedef = jax.tree.flatten(weights)
    specs = treedef.flatten_up_to(shardings)
    return jax.tree.unflatten(treedef, [put(h, s) for h, s in zip(leaves, specs, strict=True)])
