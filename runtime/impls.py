"""Which implementation the model's attention and quantized matmuls use: what `EngineConfig.resolve`
makes of "auto", and the values it refuses (ValueError naming the field).

- attention_impl: "pallas" (our kernels), "xla", or "native" (our C++ kernel over the paged cache
  on CPU, for a float32 cache on one device; cpu_kernels/); auto: Pallas on GPU/TPU, on CPU native
  where our C++ kernels build and run (x86-64 with AVX2, FMA and F16C, a C++ compiler), else XLA.
- matmul_impl: "pallas", "xla", or "native" (our C++ kernel for few rows on CPU, cpu_kernels/);
  auto: Pallas on GPU/TPU; on CPU native where it builds and runs, else XLA.
"""

from __future__ import annotations

from xlaserve.cpu_kernels.build import unavailable


def _refuse(field: str, value, limit: str):
    raise ValueError(f"{field}={value!r} {limit}")


def resolve(attention: str, matmul: str, on_cpu: bool) -> tuple[str, str]:
    """(attention_impl, matmul_impl) with "auto" replaced by this backend's choice."""
    for field, value in (("attention_impl", attention), ("matmul_impl", matmul)):
        if value not in ("auto", "pallas", "xla", "native"):
            _refuse(field, value, "must be auto, pallas, xla or native")
        if value == "native" and not on_cpu:
            _refuse(field, value, "native is a CPU kernel: use pallas or xla on GPU/TPU")
    why = unavailable() if on_cpu else None
    for field, value in (("attention_impl", attention), ("matmul_impl", matmul)):
        if value == "native" and why:
            _refuse(field, value, f"cannot run here: {why}")
    if attention == "auto":
        attention = ("xla" if why else "native") if on_cpu else "pallas"
    if matmul == "auto":
        matmul = ("xla" if why else "native") if on_cpu else "pallas"
    return attention, matmul
