"""What every checkpoint reader produces (`Loaded`), the one error type they raise, and the
assembly of a family's weights pytree from named tensors, driven by the family's declarations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from xlaserve.runtime import models
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models.params import check_shapes, declared, from_named
from xlaserve.runtime.quant import QuantArray, dequantize, map_quant


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
    weights: object  # the family's Weights pytree
    tokenizer: object  # xlaserve.checkpoints.tokenizer.Tokenizer
    source: str
    quantization: str = "none"  # e.g. "q4_1" (the dominant GGUF type) or "none"
    info: dict = field(default_factory=dict)
    # Another copy of the weights placed for a given mesh (None: the host weights serve any mesh).
    restore: Callable | None = None


def family_of(cfg: ModelConfig, path) -> models.Family:
    """cfg's family, with the config checked against what the family implements."""
    family = models.of(cfg)
    try:
        family.check(cfg)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    return family


def assemble(cfg: ModelConfig, read: Callable, *, dequant: bool, dtype, path):
    """The family's weights from `read(name, layer)` (layer None for a weight outside the layer
    stacks), which returns float32 numpy or a QuantArray. Per-layer weights are stacked on a
    leading axis over the layers their declaration lists; dense arrays are cast to `dtype`;
    quantized ones stay quantized unless `dequant`, or unless the layers disagree on the layout
    (kind, block, min; then that weight is dequantized for every layer)."""
    infos = models.declare(cfg)
    family = models.of(cfg)

    def rows(name: str, layer: int | None):
        """The weight's rows of its tensor (a weight stored fused with others: `Family.rows`)."""
        x = read(name, layer)
        if name not in family.rows:
            return x
        start, stop = family.rows[name](cfg)
        if x.shape[-2] < stop:
            raise CheckpointError(path, f"{name}: the fused tensor has {x.shape[-2]} rows, expected ≥ {stop}")
        cut = lambda a: a[..., start:stop, :]
        return map_quant(cut, x) if isinstance(x, QuantArray) else cut(x)

    by_name = {}
    for name, info in declared(infos).items():
        if info.layers is not None:
            by_name[name] = _stack([rows(name, i) for i in info.layers], dequant, dtype)
        else:
            by_name[name] = _finish(rows(name, None), dequant, dtype)
    weights = from_named(infos, by_name)
    try:
        check_shapes(infos, weights, str(path))
    except ValueError as e:
        raise CheckpointError(path, str(e).split(": ", 1)[-1]) from None
    return weights


def _stack(items: list, dequant: bool, dtype):
    # layers stack as one QuantArray only when they share kind, block and whether there is a min
    kinds = {(x.kind, x.block, x.min is None) if isinstance(x, QuantArray) else "dense" for x in items}
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


def _finish(x, dequant: bool, dtype):
    """A single (unstacked) array: dequantized to `dtype` when asked, else as it is."""
    if isinstance(x, QuantArray):
        return dequantize(x).astype(dtype) if dequant else x
    return np.asarray(x).astype(dtype)
