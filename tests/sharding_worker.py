"""Run by tests/test_sharding.py in its own process with 8 simulated CPU devices (the flag must be
set before JAX starts, and it slows single-device work, so the main test process does not use it).
Builds SmolLM2 (argv[1]) on one device and on several meshes, converts it to two xlaserve
checkpoints in argv[2] and restores those onto meshes, and prints one JSON object of measurements."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import numpy as np

from xlaserve import LLM, SamplingParams
from xlaserve.checkpoints import convert
from xlaserve.runtime.quant import QuantArray
from xlaserve.runtime.sampling import SamplingState

ENGINE = dict(
    max_slots=2, prefill_buckets=(32,), max_model_len=256, kv_buckets=(64,), scoring=False, compile_at="use"
)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Le chat est"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def prompt_logits(llm, ids):
    e = llm.engine
    row = np.arange(e.ecfg.pages_per_seq, dtype=np.int32)
    return e.prefill_with_logits(
        ids, 0, row, SamplingState.of(GREEDY, 0), np.zeros(llm.config.vocab_size, bool)
    )[1]


def collectives(llm) -> dict:
    """All-reduces inside the layer scan of the decode program, and every all-gather's shape."""
    hlo = llm.engine._decode[(ENGINE["max_slots"], 64)].as_text()
    layer_all_reduce, gathers = 0, []
    for line in hlo.splitlines():
        op = re.search(r"= (\S+) (all-reduce|all-gather)(?:-start)?\(", line)
        if not op:
            continue
        name = (re.search(r'op_name="([^"]+)"', line) or [None, ""])[1]
        if op.group(2) == "all-reduce" and ("/attention/" in name or "/mlp/" in name):
            layer_all_reduce += 1
        if op.group(2) == "all-gather":
            gathers.append([int(d) for d in re.findall(r"\d+", op.group(1).split("{")[0])])
    return {"layer_all_reduce": layer_all_reduce, "all_gather_shapes": gathers}


def residency(llm) -> dict:
    """Bytes each device holds vs. what the shardings imply, and the weights' per-layer shapes."""
    per_device, expected, total = {}, 0, 0
    for leaf in jax.tree.leaves(llm.engine.weights):
        total += leaf.nbytes
        split = int(np.prod([leaf.sharding.mesh.shape[a] for a in leaf.sharding.spec if a is not None]))
        expected += leaf.nbytes // split
        for sh in leaf.addressable_shards:
            per_device[sh.device.id] = per_device.get(sh.device.id, 0) + sh.data.nbytes
    shapes = sorted(
        {tuple(a.shape[1:]) for a in jax.tree.leaves(llm.engine.weights.layers)}
        | {tuple(a.shape) for a in jax.tree.leaves(llm.engine.weights.embed)}
    )
    return {
        "total": total,
        "expected_per_device": expected,
        "per_device": sorted(per_device.values()),
        "weight_shapes": [list(s) for s in shapes],
    }


def main() -> None:
    out = {"devices": jax.device_count()}
    base = LLM(sys.argv[1], **ENGINE)
    ids = base.encode(PROMPTS[0])
    out["base"] = [o.token_ids for o in base.generate(PROMPTS, GREEDY)]
    ref_logits = prompt_logits(base, ids)
    for mesh in ("tp=2", "tp=3", "tp=4", "dp=2,tp=2"):
        llm = LLM(sys.argv[1], mesh=mesh, **ENGINE)
        row = {
            "mesh": llm.describe_mesh(),
            "tokens": [o.token_ids for o in llm.generate(PROMPTS, GREEDY)],
            "logit_max_diff": float(np.abs(prompt_logits(llm, ids) - ref_logits).max()),
            "quantized": isinstance(llm.engine.weights.layers.w_up, QuantArray),
        }
        if mesh.startswith("tp"):
            row |= collectives(llm) | residency(llm)
        out[mesh] = row
    # Both Pallas kernels under shard_map (interpret mode), heads and FFN split over 3 devices.
    kernels = LLM(sys.argv[1], mesh="tp=3", attention_impl="pallas", matmul_impl="pallas", **ENGINE)
    out["pallas tp=3"] = {
        "tokens": [
            o.token_ids
            for o in kernels.generate(
                PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
            )
        ]
    }
    # xlaserve checkpoints restored onto meshes: GGUF blocks kept, and requantized to int4 g64
    keep, int4 = Path(sys.argv[2]) / "keep", Path(sys.argv[2]) / "int4"
    convert.convert(Path(sys.argv[1]), keep, quant="keep")
    convert.convert(Path(sys.argv[1]), int4, quant="int4", scheme="sym", group_size=64)
    restored = {}
    for name, path, mesh in [
        ("tp=1", keep, None),
        ("tp=2", keep, "tp=2"),
        ("tp=3", keep, "tp=3"),
        ("int4 tp=1", int4, None),
        ("int4 tp=3", int4, "tp=3"),
    ]:
        llm = LLM(str(path), mesh=mesh, **ENGINE)
        restored[name] = {"tokens": [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]}
        if mesh == "tp=3" and name == "tp=3":
            restored[name] |= residency(llm)
    out["restored"] = restored
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
