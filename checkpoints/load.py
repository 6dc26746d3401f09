"""One entry point: a path -> (ModelConfig, host weights, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from xlaserve.checkpoints.gguf import load_gguf
from xlaserve.checkpoints.hf import load_hf_dir
from xlaserve.checkpoints.loaded import CheckpointError, Loaded
from xlaserve.checkpoints.orbax import is_checkpoint, load_checkpoint


def load_model(path, *, dequantize: bool = True, dtype="float32", mesh=None) -> Loaded:
    """A .gguf file, an HF directory or an xlaserve (orbax) checkpoint directory. Quantized matrices
    stay quantized unless `dequantize`; everything dense is cast to `dtype` (for an xlaserve checkpoint
    None keeps the dtype it was saved in). An xlaserve checkpoint
    is restored onto `mesh` (None: the default device) as jax arrays; the others load to host."""
    path = Path(path)
    if is_checkpoint(path):  # dtype None: as saved
        return load_checkpoint(path, mesh=mesh, dtype=dtype, dequantize=dequantize)
    dtype = jnp.dtype(dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                path,
                "directory has no config.json (expected an HF checkpoint directory) and no xlaserve.json "
                "(an xlaserve checkpoint)",
            )
        return load_hf_dir(path, dtype=dtype)
    if not path.exists():
        raise CheckpointError(path, "file not found")
    return load_gguf(path, dequantize=dequantize, dtype=dtype)
