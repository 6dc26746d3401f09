"""The model families and the registry that finds them.

Adding a family is one module in this folder (building a `Family`, see `family.py`) and one line
in `FAMILIES` below. Checkpoint readers look families up by the name their format uses (HF
`architectures`/`model_type`, GGUF `general.architecture`); the engine by `ModelConfig.architecture`.
"""

from __future__ import annotations

from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models import gemma, llama, mixtral, olmoe, phi3, qwen, qwen_moe
from xlaserve.runtime.models.family import Family, KVSpec

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        llama.FAMILY,
        qwen.QWEN2,
        qwen.QWEN3,
        gemma.GEMMA2,
        gemma.GEMMA3,
        phi3.FAMILY,
        qwen_moe.QWEN2_MOE,
        qwen_moe.QWEN3_MOE,
        mixtral.FAMILY,
        olmoe.FAMILY,
    )
}


def register(family: Family) -> None:
    """Add a family at run time (tests, plug-ins); names must be new."""
    if family.name in FAMILIES:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    FAMILIES[family.name] = family


def get(architecture: str) -> Family:
    """The family of `ModelConfig.architecture`."""
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise ValueError(
            f"architecture={architecture!r} is not a known model family (known: {', '.join(FAMILIES)})"
        ) from None


def of(cfg: ModelConfig) -> Family:
    return get(cfg.architecture)


def declare(cfg: ModelConfig):
    """The parameter declarations (a pytree of ParamInfo) of `cfg`'s family."""
    return of(cfg).param_info(cfg)


def kv_spec(cfg: ModelConfig) -> KVSpec:
    return of(cfg).kv_spec(cfg)


def for_hf(architectures: list[str] | None, model_type: str | None) -> Family | None:
    """The family of an HF config.json: by its `model_type` (as transformers picks the config
    class), or by an `architectures` entry when it has no model_type."""
    if model_type is not None:
        return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)
    return next((f for f in FAMILIES.values() if set(architectures or ()) & set(f.hf_architectures)), None)


def for_gguf(architecture: str | None, experts: bool = False) -> Family | None:
    """The family of a GGUF `general.architecture`; `experts`: the file has experts (llama.cpp's
    "llama" is Llama without them, Mixtral with them). A name only one family uses needs no flag."""
    named = [f for f in FAMILIES.values() if architecture in f.gguf_architectures]
    return next((f for f in named if f.moe == experts), named[0] if len(named) == 1 else None)


def hf_model_types() -> list[str]:
    return [t for f in FAMILIES.values() for t in f.hf_model_types]


def gguf_architectures() -> list[str]:
    return list(dict.fromkeys(a for f in FAMILIES.values() for a in f.gguf_architectures))


__all__ = [
    "FAMILIES",
    "Family",
    "KVSpec",
    "declare",
    "for_gguf",
    "for_hf",
    "get",
    "kv_spec",
    "of",
    "register",
]
