"""Which implementation the model's attention and quantized matmuls use: what `EngineConfig.resolve`
makes of "auto", and the values it refuses (ValueError naming the field).

- attention_impl: "pallas" (our kernels) or "xla"; auto: Pallas on GPU/TPU, XLA on CPU.
- matmul_impl: "pallas", "xla", or "native" (our C++ kernel for few rows on CPU, cpu_kernels/);
  auto: Pallas on GPU/TPU; on CPU native where it builds and runs (x86-64 with AVX2 and FMA, a C++
  compiler), else XLA.
"""

from __future__ import annotations

from xlaserve.cpu_kernels.build import unavailable


def _refuse(field: str, value, limit: str):
    raise ValueError(f"{field}={value!r} {limit}")


def resolve(attention: str, matmul: str, on_cpu: bool) -> tuple[str, str]:
    """(attention_impl, matmul_impl) with "auto" replaced by this backend's choice."""
    if attention not in ("auto", "pallas", "xla"):
        _refuse("attention_impl", attention, "must be auto, pallas or xla")
    if matmul not in ("auto", "pallas", "xla", "native"):
        _refuse("matmul_impl", matmul, "must be auto, pallas, xla or native")
    if matmul == "native" and not on_cpu:
        _refuse("matmul_impl", matmul, "native is a CPU kernel: use pallas or xla on GPU/TPU")
    why = unavailable() if on_cpu and matmul in ("auto", "native") else None
    if matmul == "native" and why:
        _refuse("matmul_impl", matmul, f"cannot run here: {why}")
    if attention == "auto":
        attention = "xla" if on_cpu else "pallas"
    if matmul == "auto":
        matmul = ("xla" if why else "native") if on_cpu else "pallas"
    return attention, matmul
