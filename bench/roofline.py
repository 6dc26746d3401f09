"""The yardsticks benchmarks measure against: what the device can do and what a model step costs.

- `DATASHEET` / `datasheet`: memory bandwidth and dense matmul peak of known devices;
- `copy_bandwidth`: the bandwidth a memory-bound program reaches on this device, measured;
- `peak_memory`: the peak memory of the devices (or of the process on CPU);
- `prefill_flops` / `step_bytes`: useful FLOPs of a prefill and bytes one decode step reads.
"""

from __future__ import annotations

import resource
import time

from xlaserve.runtime.config import ModelConfig

# Datasheet figures, matched in order against the lower-cased jax device_kind (first match wins):
# memory bandwidth (bytes/s) and dense matmul peak (FLOP/s) by compute dtype.
DATASHEET = [
    ("h100 pcie", "NVIDIA H100 PCIe", 2.0e12, {"bfloat16": 756e12, "float32": 51e12}),
    ("h100", "NVIDIA H100 SXM", 3.35e12, {"bfloat16": 989e12, "float32": 67e12}),
    ("h200", "NVIDIA H200", 4.8e12, {"bfloat16": 989e12, "float32": 67e12}),
    ("a100-sxm4-40gb", "NVIDIA A100 40GB", 1.555e12, {"bfloat16": 312e12, "float32": 19.5e12}),
    ("a100", "NVIDIA A100 80GB", 2.0e12, {"bfloat16": 312e12, "float32": 19.5e12}),
    ("tpu v5 lite", "TPU v5e", 819e9, {"bfloat16": 197e12}),
    ("tpu v5e", "TPU v5e", 819e9, {"bfloat16": 197e12}),
    ("tpu v5", "TPU v5p", 2.76e12, {"bfloat16": 459e12}),
    ("tpu v4", "TPU v4", 1.2e12, {"bfloat16": 275e12}),
]


def datasheet(device_kind: str) -> dict | None:
    kind = device_kind.lower()
    for key, name, bandwidth, flops in DATASHEET:
        if key in kind:
            return {"name": name, "bandwidth_Bps": bandwidth, "flops": flops}
    return None


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """(bytes read + written) / s of dst = src + 1 over float32 arrays of `nbytes`, best of
    `repeats`. dst is donated, so the output reuses its buffer: a fresh output would be timed
    faulting in new pages on CPU (5x slower there)."""
    import jax
    import jax.numpy as jnp

    src = jnp.ones((nbytes // 4,), jnp.float32)
    dst = jnp.zeros_like(src)
    fn = jax.jit(lambda s, d: s + 1.0, donate_argnums=1, keep_unused=True)
    dst = fn(src, dst).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst = fn(src, dst).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def peak_memory(devices) -> tuple[int, str]:
    stats = [d.memory_stats() or {} for d in devices]
    if all("peak_bytes_in_use" in s for s in stats):
        return sum(s["peak_bytes_in_use"] for s in stats), "device.memory_stats() peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS peak (getrusage ru_maxrss)"


def prefill_flops(cfg: ModelConfig, n: int) -> int:
    """Useful FLOPs of prefilling n tokens: the layers' matmuls, causal attention (q.k and p.v over
    each token's prefix) and the logits of the last token."""
    d, k = cfg.hidden_size, cfg.head_dim
    matmul = d * k * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size
    attention = 4 * cfg.num_heads * k * n * (n + 1) // 2
    return cfg.num_layers * (2 * matmul * n + attention) + 2 * cfg.vocab_size * d


def step_bytes(cfg: ModelConfig, weights, kv_token_bytes: int, batch: int, context: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step of `batch` sequences at `context` tokens reads;
    kv_token_bytes: one token's K and V over every layer (`attention.token_bytes`: scales included)."""
    from xlaserve.runtime.models.params import weight_bytes

    weight = weight_bytes(weights)
    if weights.lm_head is not None:  # untied: the embedding table is read at the batch's rows only
        weight += weights.embed.nbytes * batch // cfg.vocab_size - weights.embed.nbytes
    return weight, batch * context * kv_token_bytes
