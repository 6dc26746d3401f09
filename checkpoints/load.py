"""One entry point: a path -> (ModelConfig, host weights, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from xlaserve.checkpoints.base import CheckpointError, Loaded
from xlaserve.checkpoints.gguf import load_gguf
from xlaserve.checkpoints.hf import load_hf_dir


def load_model(path, *, dequantize: bool = True, dtype="float32") -> Loaded:
    """A .gguf file or an HF directory. Quantized GGUF matrices stay quantized unless `dequantize`;
    everything dense is cast to `dtype`."""
    path = Path(path)
    dtype = jnp.dtype(dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(path, "directory has no config.json (expected an HF checkpoint directory)")
        return load_hf_dir(path, dtype=dtype)
    if not path.exists():
        raise CheckpointError(path, "file not found")
    return load_gguf(path, dequantize=dequantize, dtype=dtype)
