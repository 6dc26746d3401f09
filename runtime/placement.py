"""A model's weights and KV cache on a mesh: its declarations walked through `sharding.rules`.

The family declares every weight's logical axes (`runtime/models`); the rules table maps them to
mesh axes. Here that becomes a NamedSharding per stored array (a quantized matrix's data, scales
and mins share its spec, with whole blocks kept together on the input axis) and, for the matmul
entry point, the (output, input) mesh axes of every matrix by name.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding

from xlaserve.runtime import models
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models.params import ParamInfo, declared, is_info, named
from xlaserve.runtime.quant import QuantArray
from xlaserve.sharding import rules as sharding_rules
from xlaserve.sharding.rules import RULES


def granules(cfg: ModelConfig) -> dict[str, int]:
    """Head axes are split only at whole heads."""
    return {"q_heads": cfg.head_dim, "kv_heads": cfg.head_dim}


def param_spec(cfg: ModelConfig, info: ParamInfo, mesh: Mesh, block: int = 1, rules=RULES):
    """The PartitionSpec of one declared array (`block`: its quantization block, if any)."""
    return sharding_rules.axis_spec(info.shape, info.axes, mesh, rules, granules(cfg), block)


def _block(w) -> int:
    return w.block if isinstance(w, QuantArray) else 1


def _sharding(cfg, info: ParamInfo, array, mesh: Mesh, rules):
    """A NamedSharding (for a QuantArray, a QuantArray of them) for one weight."""
    ns = NamedSharding(mesh, param_spec(cfg, info, mesh, _block(array), rules))
    if not isinstance(array, QuantArray):
        return ns
    # data/scale/min share the leading axes; their last axis is K, K/2 or K/block.
    return dataclasses.replace(array, data=ns, scale=ns, min=None if array.min is None else ns)


def check_mesh(cfg: ModelConfig, mesh: Mesh) -> None:
    """An ep axis needs experts, and must divide their number (experts are never split)."""
    ep = mesh.shape.get("ep", 1)
    if ep > 1 and not cfg.num_experts:
        raise ValueError(f"mesh ep={ep} needs a mixture-of-experts model; {cfg.name} has no experts")
    if ep > 1 and cfg.num_experts % ep:
        raise ValueError(f"mesh ep={ep} does not divide num_experts={cfg.num_experts} (ep must divide it)")


def weight_shardings(cfg: ModelConfig, weights, mesh: Mesh, rules=RULES):
    """A pytree shaped like `weights` whose leaves are NamedShardings."""
    check_mesh(cfg, mesh)
    infos = models.declare(cfg)
    sharding_rules.check_rules((i.axes for i in declared(infos).values()), rules)
    return jax.tree.map(
        lambda info, arr: _sharding(cfg, info, arr, mesh, rules),
        infos,
        weights,
        is_leaf=lambda x: is_info(x) or isinstance(x, QuantArray),
    )


def matrix_specs(cfg: ModelConfig, weights, mesh: Mesh | None, rules=RULES) -> tuple:
    """((name, (output axis, input axis)), ...) for every matrix: ("tp", None) column-parallel,
    (None, "tp") row-parallel, (None, None) replicated. Empty without a mesh."""
    if mesh is None:
        return ()
    arrays = named(weights)
    return tuple(
        (name, tuple(param_spec(cfg, info, mesh, _block(arrays[name]), rules))[-2:])
        for name, info in declared(models.declare(cfg)).items()
        if info.matrix
    )


def place(cfg: ModelConfig, weights, mesh: Mesh):
    """Host or device weights placed into their shards on `mesh`."""
    return sharding_rules.place(weights, weight_shardings(cfg, weights, mesh))


def cache_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, sharding_rules.cache_spec(models.kv_spec(cfg).num_kv_heads, mesh))
