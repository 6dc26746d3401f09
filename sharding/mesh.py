"""Mesh specs ("tp=4", "dp=2,tp=4", "ep=4", "tp=2,ep=2", "dp=2,ep=2") and the device groups they
describe.

tp splits one model replica over devices (tensor parallel, one jit program with collectives). dp
runs that many replicas side by side, each on its own tp group, each with its own slots, pages and
scheduler; requests go to the least busy replica. Replicas never synchronize, so a dp replica is as
fast as a lone engine, and a slow request on one never holds up the others. ep splits a mixture of
experts' experts over devices (expert parallelism) inside one replica: a replica is then an
("ep", "tp") mesh of ep * tp devices; without ep it stays the 1-D ("tp",) mesh.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("dp", "tp", "ep")


@dataclass(frozen=True)
class MeshSpec:
    dp: int = 1
    tp: int = 1
    ep: int = 1

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.ep

    def __str__(self) -> str:
        return f"dp={self.dp},tp={self.tp}" + (f",ep={self.ep}" if self.ep > 1 else "")


def parse_mesh(spec: str | MeshSpec | None) -> MeshSpec:
    """'tp=4', 'dp=2,tp=4', 'tp=2,ep=2', '' or None (one device). ValueError names what is wrong."""
    if spec is None or spec == "":
        return MeshSpec()
    if isinstance(spec, MeshSpec):
        return spec
    sizes = {}
    for part in str(spec).split(","):
        name, _, value = part.strip().partition("=")
        if name not in AXES:
            raise ValueError(
                f"mesh axis {name!r} is not one of {', '.join(AXES)} (e.g. --mesh dp=2,tp=4 or tp=2,ep=2)"
            )
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} is given twice")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh axis {name}={value!r} must be a positive integer")
        sizes[name] = int(value)
    return MeshSpec(**sizes)


def device_groups(spec: MeshSpec, devices=None) -> list[Mesh]:
    """One mesh per dp replica, over consecutive devices: 1-D ("tp",), or ("ep", "tp") with ep > 1
    (a tp group's devices adjacent)."""
    devices = list(jax.devices() if devices is None else devices)
    if spec.devices > len(devices):
        raise ValueError(f"mesh {spec} needs {spec.devices} devices; {len(devices)} are available")
    grid = np.array(devices[: spec.devices], dtype=object).reshape(spec.dp, spec.ep, spec.tp)
    if spec.ep == 1:
        return [Mesh(group[0], ("tp",)) for group in grid]
    return [Mesh(group, ("ep", "tp")) for group in grid]
