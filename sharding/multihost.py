"""Multi-host initialisation: join JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same programs in the same order (SPMD), each on its own devices of one global
mesh; `xlaserve.runtime.leader` replays process 0's engine calls on the others.

    # on every host (process_id 0 .. N-1):
    xlaserve serve --coordinator host0:9876 --num-processes N --process-id I --mesh tp=8 ...
"""

from __future__ import annotations

import jax


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join the cluster; call before anything touches a device. On CPU, collectives use gloo."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
