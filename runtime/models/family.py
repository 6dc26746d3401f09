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
  kernels, routed=False)` -> (hidden [B, T, D] after the final norm, cache), and with `routed` also
  the valid tokens each layer routed to each expert int32 [L, num_experts]; and `logits(weights,
  hidden, kernels, cfg, specs)` -> float32 [..., V].
- `features`: the optional `ModelConfig` fields (see `FEATURES` there) the family implements; a
  checkpoint that sets any other one is refused with an error naming it, never silently run wrong.
- `kv_spec(cfg)`: what the paged KV cache needs: kv heads, head dim, per-layer attention window.
- `rows`: weights stored fused in a checkpoint (Phi-3's qkv_proj, gate_up_proj): weight name ->
  a function of the config giving the (start, stop) rows of the named tensor that are this weight.
- `gguf_transforms`: weight name -> function undoing what llama.cpp's converter did to that tensor
  beyond the q/k permutation (Gemma's norms are stored as 1 + w).
- `gguf_config`: ModelConfig fields a GGUF file does not carry because llama.cpp fixes them per
  architecture (Gemma's activation, its sliding-layer pattern, ...): a function of the config read
  from the file's metadata returning the fields to replace.
- `layer_types(n)`: the per-layer attention kinds an HF config.json without `layer_types` implies
  (None: every layer alike).
- `moe`: the family's feed-forward is a mixture of experts. A GGUF architecture may name a dense
  family and a MoE one (llama.cpp writes Mixtral as "llama" with `llama.expert_count`): the file's
  expert count picks between them.
- `hf_config`: ModelConfig fields the family fixes whatever config.json says (Mixtral always
  renormalises its top-2): a function of the config read from config.json returning the fields.
- In `hf_names`, "{e}" stands for the expert index: the loader stacks experts 0..E-1 of a
  per-expert tensor (GGUF stores them stacked already).
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
    """The config's kv heads and head dim on every layer, each layer's window (`cfg.windows()`)."""
    return KVSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.windows())


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
    rows: Mapping[str, Callable[[ModelConfig], tuple[int, int]]] = field(default_factory=dict)
    gguf_transforms: Mapping[str, Callable] = field(default_factory=dict)
    gguf_config: Callable[[ModelConfig], dict] = lambda cfg: {}
    layer_types: Callable[[int], tuple[str, ...] | None] = lambda n: None
    moe: bool = False
    hf_config: Callable[[ModelConfig], dict] = lambda cfg: {}

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
