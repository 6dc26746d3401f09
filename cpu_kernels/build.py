"""Compile our kernels (`quant_gemv.cc`, `paged_attention.cc`) once per (sources, flags, jaxlib) into
one library in a cache and register their handlers.

    library() -> Path      # ~/.cache/xlaserve/cpu_kernels/<hash>/kernels.so, built if missing
    unavailable() -> str | None   # why the kernels cannot run here, or None
    register()             # load the library, register its targets (TARGETS) for XLA:CPU (once)

XLASERVE_CPU_KERNELS overrides the cache folder; CXX the compiler (default g++, else c++). The
build writes to a temporary file and renames it, so processes building at once all end up with a
whole library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = [Path(__file__).with_name(n) for n in ("quant_gemv.cc", "paged_attention.cc")]
HEADERS = [Path(__file__).with_name(n) for n in ("parallel.h", "quant_gemv_avx512.h", "quant_gemm_avx512.h")]
TARGET = "xlaserve_quant_gemv"
ATTENTION_TARGET = "xlaserve_paged_attention"
TARGETS = {TARGET: "XlaserveQuantGemv", ATTENTION_TARGET: "XlaservePagedAttention"}  # target -> symbol
# AVX2 + FMA code (the kernel's intrinsics); unfused float arithmetic except its explicit FMAs, so
# each dequantized weight is the exact value gguf's float32 arithmetic gives.
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w"]
CACHE = Path(os.environ.get("XLASERVE_CPU_KERNELS", Path.home() / ".cache" / "xlaserve" / "cpu_kernels"))
REQUIRED_CPU_FLAGS = {"avx2", "fma", "f16c"}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where there is none); read once, as
    `quant_gemv.many_rows` asks for every matrix a program traces."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (frozenset(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")),
                frozenset(),
            )
    except OSError:
        return frozenset()


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "g++", "c++") if c and shutil.which(c)), None)


@functools.cache
def unavailable() -> str | None:
    """Why the native kernel cannot run on this host (None: it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the native CPU kernels are x86-64 code; this host is {platform.machine()}"
    missing = REQUIRED_CPU_FLAGS - cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))} (the native CPU kernels need AVX2, FMA and F16C)"
    if _compiler() is None:
        return "no C++ compiler on PATH (g++ or c++, or set CXX) to build the native CPU kernels"
    return None


def library() -> Path:
    """The compiled library, built into CACHE if this source/flags/jaxlib has not been built."""
    import jax
    import jaxlib

    include = jax.ffi.include_dir()
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(unavailable())
    key = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), " ".join(FLAGS), jaxlib.__version__, cxx):
        key.update(part.encode() if isinstance(part, str) else part)
    out = CACHE / key.hexdigest()[:16] / "kernels.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        part = Path(tmp.name)
    try:
        cmd = [cxx, *FLAGS, "-I", include, *map(str, SOURCES), "-o", str(part)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"building the CPU kernels failed ({' '.join(cmd)}):\n{run.stderr[-4000:]}")
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


@functools.cache
def register() -> None:
    """Load the library and register its handlers as XLA:CPU custom-call targets (once a process)."""
    import jax

    why = unavailable()
    if why:
        raise RuntimeError(why)
    lib = ctypes.cdll.LoadLibrary(str(library()))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
