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
        # mixtures of experts: 30.5B parameters, 3.3B read per token (8 of 128 experts of 768)
        ("qwen3-30b-a3b", (151936, 2048, 6144, 48, 32, 4, 128), dict(architecture="qwen3_moe",
            rope=RopeConfig(theta=1e6), max_position_embeddings=40960, rms_norm_eps=1e-6,
            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True)),
        # 46.7B parameters, 12.9B per token (2 of 8 experts of 14336)
        ("mixtral-8x7b", (32000, 4096, 14336, 32, 32, 8, 128), dict(architecture="mixtral",
            rope=RopeConfig(theta=1e6), max_position_embeddings=32768, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True)),
        # OLMoE-1B-7B: 6.9B parameters, 1.3B per token (8 of 64 experts of 1024)
        ("olmoe-1b-7b", (50304, 2048, 1024, 16, 16, 16, 128), dict(architecture="olmoe",
            max_position_embeddings=4096, num_experts=64, num_experts_per_tok=8)),
    ]
}  # fmt: skip
