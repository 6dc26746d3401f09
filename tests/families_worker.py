"""Every registered family (and the toy one) on a tiny random config, in one process with 8
simulated CPU devices: greedy tokens and logits on a tp=2 mesh equal one device's (windowed
families with a window shorter than the 19 tokens they see).

Run by tests/test_families.py; prints one JSON line per family."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses
import json

import jax
import numpy as np
import toy_family

from xlaserve.runtime import models
from xlaserve.runtime.config import EngineConfig, RopeConfig
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.models import params
from xlaserve.runtime.models.presets import PRESETS
from xlaserve.runtime.results import Sampled
from xlaserve.runtime.sampling import SamplingState
from xlaserve.runtime.sampling_params import SamplingParams
from xlaserve.sharding.mesh import device_groups, parse_mesh

# Each program compiled on first use: `greedy` runs insert, prefill_with_logits and
# decode_with_logits, a serving engine's dozen others never (they were most of this worker's time).
ENGINE = EngineConfig(
    max_slots=2, prefill_buckets=(16,), max_model_len=64, compile_cache="", scoring=False, compile_at="use"
)
TINY = dataclasses.replace(PRESETS["tiny"], num_heads=4, num_kv_heads=2)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
SLIDING = dict(sliding_window=8, layer_types=("sliding_attention", "full_attention"))
CONFIGS = {
    "llama": TINY,
    "toy_gelu": dataclasses.replace(TINY, architecture="toy_gelu", hidden_act="gelu_pytorch_tanh"),
    "qwen2": dataclasses.replace(TINY, architecture="qwen2"),
    "qwen3": dataclasses.replace(TINY, architecture="qwen3", head_dim=32),
    "gemma2": dataclasses.replace(
        TINY,
        architecture="gemma2",
        hidden_act="gelu_pytorch_tanh",
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        query_pre_attn_scalar=24.0,
        tie_word_embeddings=True,
        **SLIDING,
    ),
    "gemma3": dataclasses.replace(
        TINY,
        architecture="gemma3",
        hidden_act="gelu_pytorch_tanh",
        rope=RopeConfig(theta=1e6, kind="linear", factor=8.0),
        rope_local=RopeConfig(theta=1e4),
        tie_word_embeddings=True,
        **SLIDING,
    ),
    "phi3": dataclasses.replace(TINY, architecture="phi3", sliding_window=8),
    # mixtures of experts (tests/test_moe.py runs them against HF and on ep meshes)
    "qwen2_moe": dataclasses.replace(
        TINY, architecture="qwen2_moe", **MOE, shared_expert_intermediate_size=96
    ),
    "qwen3_moe": dataclasses.replace(TINY, architecture="qwen3_moe", head_dim=32, **MOE, norm_topk_prob=True),
    "mixtral": dataclasses.replace(TINY, architecture="mixtral", **MOE, norm_topk_prob=True),
    "olmoe": dataclasses.replace(TINY, architecture="olmoe", **MOE),  # q/k norms over tp-split heads
}


def greedy(engine: Engine, prompt: np.ndarray, steps: int):
    """Prefill `prompt` into slot 0, then `steps` decode dispatches: (tokens, logits [steps, V])."""
    row = np.arange(engine.ecfg.pages_per_seq, dtype=np.int32)
    sampling = SamplingState.of(SamplingParams(temperature=0.0), 0)
    presence = np.zeros((engine.cfg.vocab_size,), bool)
    packed, first = engine.prefill_with_logits(prompt, 0, row, sampling, presence)
    engine.insert(0, packed, len(prompt), sampling, presence)
    table = np.zeros((engine.ecfg.max_slots, engine.ecfg.pages_per_seq), np.int32)
    table[0] = row
    tokens, logits = [int(Sampled.unpack(np.asarray(packed)).tokens[0])], [first[-1]]
    for i in range(steps):
        packed, lg = engine.decode_with_logits(table, len(prompt) + i + 1)
        tokens.append(int(Sampled.unpack(packed).tokens[0, 0]))
        logits.append(lg[0, 0])
    return tokens, np.stack(logits)


def main():
    assert jax.device_count() == 8, jax.devices()
    models.register(toy_family.FAMILY)
    prompt = np.random.default_rng(0).integers(0, TINY.vocab_size, 11).astype(np.int32)
    for name, cfg in CONFIGS.items():
        weights = jax.tree.map(
            np.asarray, params.random_weights(models.declare(cfg), seed=1, dtype=np.float32)
        )
        one = greedy(Engine(cfg, weights, ENGINE), prompt, 8)
        (mesh,) = device_groups(parse_mesh("tp=2"))
        two = greedy(Engine(cfg, weights, ENGINE, mesh=mesh), prompt, 8)
        print(
            json.dumps(
                {
                    "family": name,
                    "tokens_1": one[0],
                    "tokens_tp2": two[0],
                    "max_abs_diff": float(np.abs(one[1] - two[1]).max()),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
