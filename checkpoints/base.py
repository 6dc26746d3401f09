"""What every checkpoint reader produces, and the one error type they raise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.llama import Layer, Weights
from xlaserve.runtime.quant import QuantArray, dequantize


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. The message names the file and what is wrong with it."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class Loaded:
    """A model ready for the engine: config, host (numpy) weights and tokenizer."""

    config: ModelConfig
    weights: Weights
    tokenizer: object  # xlaserve.checkpoints.tokenizer.Tokenizer
    source: str
    quantization: str = "none"  # e.g. "q4_1" (the dominant GGUF type) or "none"
    info: dict = field(default_factory=dict)
    # Another copy of the weights placed for a given mesh (None: the host weights serve any mesh).
    restore: Callable | None = None


def stack_layers(per_layer: list[dict], dequant: bool, dtype) -> Layer:
    """Stack per-layer arrays on a leading axis. Quantized entries stay quantized unless `dequant`, or
    unless the layers disagree on the kind (then that weight is dequantized for every layer)."""

    def stack(name: str):
        items = [layer[name] for layer in per_layer]
        kinds = {x.kind if isinstance(x, QuantArray) else "dense" for x in items}
        if kinds == {"dense"} or dequant or len(kinds) > 1:
            dense = [dequantize(x) if isinstance(x, QuantArray) else x for x in items]
            return np.stack(dense).astype(dtype)
        first = items[0]
        return QuantArray(
            data=np.stack([x.data for x in items]),
            scale=np.stack([x.scale for x in items]),
            min=None if first.min is None else np.stack([x.min for x in items]),
            kind=first.kind,
            block=first.block,
        )

    return Layer(**{name: stack(name) for name in Layer.__dataclass_fields__})


def finish_matrix(x, dequant: bool, dtype):
    """A single (unstacked) matrix: dequantized to `dtype` when asked, else as it is."""
    if isinstance(x, QuantArray):
        return dequantize(x).astype(dtype) if dequant else x
    return np.asarray(x).astype(dtype)
