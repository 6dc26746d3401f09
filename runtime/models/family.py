"""What a model family declares. Everything generic (stacking layers, checkpoint I/O, shardings,
quantization, the engine's programs) is driven by these declarations and never names a family.

A family module builds one `Family` and the registry (`runtime/models/__init__.py`) lists it:

- `param_info(cfg)`: a pytree shaped like the family's `Weights` whose leaves are `ParamInfo`s
  (shape, logical axes, matrix or not). Per-layer arrays are stacked on a leading "layers" axis.
- `hf_names` / `gguf_names`: weight name ("layers.wq", the dotted pytree path) -> the tensor's name
  in an HF safetensors file / a GGUF file, with "{i}" standing for the layer index.
- `gguf_permute`: weights whose rows llama.cpp's converter permuted for its interleaved RoPE, with
  the `ModelConfig` field that holds their head count (the loader undoes it).
- `forward(weights, cache, tokens, positions, valid, page_table, kv_len, *, cfg, block, dtype,
  kernels)` -> (hidden [B, T, D] after the final norm, cache) and `logits(weights, hidden, kernels,
  cfg, specs)` -> float32 [..., V].
- `features`: the optional `ModelConfig` fields (see `FEATURES` there) the family implements; a
  checkpoint that sets any other one is refused with an error naming it, never silently run wrong.
- `kv_spec(cfg)`: what the paged KV cache needs: kv heads, head dim, per-layer attention window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from xlaserve.runtime.config import FEATURES, ModelConfig


@dataclass(frozen=True)
class KVSpec:
    """The paged KV cache of one model: [layers, pages, page_size, kv_heads, head_dim] for K and V.
    `windows[i]`: layer i attends to the last `windows[i]` positions only (None: all of them)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]


def default_kv_spec(cfg: ModelConfig) -> KVSpec:
    """Every layer alike: the config's kv heads and head dim, its sliding window on every layer."""
    return KVSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, (cfg.sliding_window,) * cfg.num_layers)


@dataclass(frozen=True)
class Family:
    name: str
    hf_architectures: tuple[str, ...]  # config.json "architectures" entries
    hf_model_types: tuple[str, ...]  # config.json "model_type"
    gguf_architectures: tuple[str, ...]  # GGUF "general.architecture"
    param_info: Callable
    forward: Callable
    logits: Callable
    hf_names: Mapping[str, str]
    gguf_names: Mapping[str, str]
    gguf_permute: Mapping[str, str] = field(default_factory=dict)
    features: frozenset[str] = frozenset()
    kv_spec: Callable[[ModelConfig], KVSpec] = default_kv_spec

    def check(self, cfg: ModelConfig, source: str = "") -> None:
        """Refuse a config that sets an optional feature this family does not implement."""
        where = f"{source}: " if source else ""
        for name, default in FEATURES.items():
            value = getattr(cfg, name)
            if value != default and name not in self.features:
                done = ", ".join(sorted(self.features)) or "none"
                raise ValueError(
                    f"{where}{name}={value!r} is not implemented for the {self.name} family "
                    f"(optional features it implements: {done})"
                )
