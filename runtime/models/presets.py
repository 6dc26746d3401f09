"""Real models' shapes for benchmarks and lowering (random weights; no checkpoint needed)."""

from __future__ import annotations

from xlaserve.runtime.config import ModelConfig, RopeConfig

_LLAMA3_ROPE = RopeConfig(theta=500000.0, kind="llama3", factor=32.0, original_max_position=8192)
_SHAPE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
)
PRESETS = {
    name: ModelConfig(**dict(zip(_SHAPE, shape, strict=True)), **rest, name=name)
    for name, shape, rest in [
        # name, (V, D, F, layers, heads, kv heads, head dim), the rest
        ("llama3-8b", (128256, 4096, 14336, 32, 32, 8, 128), dict(rope=RopeConfig(theta=500000.0),
            max_position_embeddings=8192)),
        ("llama3-1b", (128256, 2048, 8192, 16, 32, 8, 64), dict(rope=_LLAMA3_ROPE,
            max_position_embeddings=131072, tie_word_embeddings=True)),
        ("smollm2-135m", (49152, 576, 1536, 30, 9, 3, 64), dict(rope=RopeConfig(theta=100000.0),
            max_position_embeddings=8192, tie_word_embeddings=True)),
        ("tiny", (512, 64, 128, 2, 4, 2, 16), dict(max_position_embeddings=1024)),
    ]
}  # fmt: skip
