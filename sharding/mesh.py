"""Mesh specs ("tp=4", "dp=2,tp=4") and the device groups they describe.

tp splits one model replica over devices (tensor parallel, one jit program with collectives). dp
runs that many replicas side by side, each on its own tp group, each with its own slots, pages and
scheduler; requests go to the least busy replica. Replicas never synchronize, so a dp replica is as
fast as a lone engine, and a slow request on one never holds up the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("dp", "tp")


@dataclass(frozen=True)
class MeshSpec:
    dp: int = 1
    tp: int = 1

    @property
    def devices(self) -> int:
        return self.dp * self.tp

    def __str__(self) -> str:
        return f"dp={self.dp},tp={self.tp}"


def parse_mesh(spec: str | MeshSpec | None) -> MeshSpec:
    """'tp=4', 'dp=2,tp=4', '' or None (one device). ValueError names what is wrong."""
    if spec is None or spec == "":
        return MeshSpec()
    if isinstance(spec, MeshSpec):
        return spec
    sizes = {}
    for part in str(spec).split(","):
        name, _, value = part.strip().partition("=")
        if name not in AXES:
            raise ValueError(f"mesh axis {name!r} is not one of {', '.join(AXES)} (e.g. --mesh dp=2,tp=4)")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} is given twice")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh axis {name}={value!r} must be a positive integer")
        sizes[name] = int(value)
    return MeshSpec(**sizes)


def device_groups(spec: MeshSpec, devices=None) -> list[Mesh]:
    """One 1-D ("tp",) mesh per dp replica, over consecutive devices."""
    devices = list(jax.devices() if devices is None else devices)
    if spec.devices > len(devices):
        raise ValueError(f"mesh {spec} needs {spec.devices} devices; {len(devices)} are available")
    grid = np.array(devices[: spec.devices], dtype=object).reshape(spec.dp, spec.tp)
    return [Mesh(row, ("tp",)) for row in grid]
