"""Our C++ kernels for XLA:CPU, called through `jax.ffi` (a leaf: imports nothing of ours).

Built from source with the host's C++ compiler on first use, into a cache (`build.library`), and
registered as XLA:CPU custom-call targets. Used only where `build.unavailable()` is None (x86-64
with AVX2, FMA and F16C, a compiler on PATH); elsewhere the XLA path computes the same values.
"""
