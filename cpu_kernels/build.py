"""Compile `quant_gemv.cc` once per (source, flags, jaxlib) into a cache and register its handler.

    library() -> Path      # ~/.cache/xlaserve/cpu_kernels/<hash>/quant_gemv.so, built if missing
    unavailable() -> str | None   # why the kernel cannot run here, or None
    register()             # load the library, register "xlaserve_quant_gemv" for XLA:CPU (once)

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

SOURCE = Path(__file__).with_name("quant_gemv.cc")
TARGET = "xlaserve_quant_gemv"
# AVX2 + FMA code (the kernel's intrinsics); unfused float arithmetic except its explicit FMAs, so
# each dequantized weight is the exact value gguf's float32 arithmetic gives.
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w"]
CACHE = Path(os.environ.get("XLASERVE_CPU_KERNELS", Path.home() / ".cache" / "xlaserve" / "cpu_kernels"))
REQUIRED_CPU_FLAGS = {"avx2", "fma"}


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "g++", "c++") if c and shutil.which(c)), None)


@functools.cache
def unavailable() -> str | None:
    """Why the native kernel cannot run on this host (None: it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the native CPU kernels are x86-64 code; this host is {platform.machine()}"
    missing = REQUIRED_CPU_FLAGS - cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))} (the native CPU kernels need AVX2 and FMA)"
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
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(), cxx.encode()):
        key.update(part)
    out = CACHE / key.hexdigest()[:16] / "quant_gemv.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        part = Path(tmp.name)
    try:
        cmd = [cxx, *FLAGS, "-I", include, str(SOURCE), "-o", str(part)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{run.stderr[-4000:]}")
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


@functools.cache
def register() -> None:
    """Load the library and register its handler as an XLA:CPU custom-call target (once a process)."""
    import jax

    why = unavailable()
    if why:
        raise RuntimeError(why)
    lib = ctypes.cdll.LoadLibrary(str(library()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.XlaserveQuantGemv), platform="cpu")
