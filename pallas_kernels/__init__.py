"""Pallas kernels: one file per kernel (kernel, jitted wrapper, pure-jnp reference). None yet."""
