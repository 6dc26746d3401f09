"""Pallas kernels, one file each: kernel, jitted wrapper, pure-jnp reference (interpret mode on CPU)."""
