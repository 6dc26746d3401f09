"""Sharding: the rules and mesh specs (here), SmolLM2 on tensor- and data-parallel meshes of
simulated CPU devices (in tests/sharding_worker.py, a process of its own with 8 devices), and two
processes under jax.distributed giving the same output as one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import background
import pytest
from helpers import LOGIT_ATOL, default_model, free_port
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from xlaserve.runtime import models
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models.params import declared
from xlaserve.runtime.placement import param_spec
from xlaserve.sharding.mesh import MeshSpec, parse_mesh
from xlaserve.sharding.rules import RULES, check_rules

SMOL = ModelConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)


def test_parse_mesh():
    assert parse_mesh("tp=4") == MeshSpec(1, 4) and parse_mesh("dp=2,tp=4") == MeshSpec(2, 4)
    assert parse_mesh(None) == parse_mesh("") == MeshSpec(1, 1)
    for bad, message in [
        ("tp=0", "positive integer"),
        ("pp=2", "not one of dp, tp"),
        ("tp=2,tp=2", "given twice"),
        ("tp=x", "positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_mesh(bad)


def spec(name: str, tp: int, block: int = 1) -> P:
    infos = declared(models.declare(SMOL))
    leaf = infos.get(f"layers.{name}") or infos[name]
    return param_spec(SMOL, leaf, AbstractMesh((tp,), ("tp",)), block=block)


def test_column_row_and_vocab_parallel_specs():
    # tp=3 divides SmolLM2's 9 query and 3 kv heads: q/k/v column-parallel, o row-parallel.
    assert spec("wq", 3) == P(None, "tp", None) and spec("wk", 3) == P(None, "tp", None)
    assert spec("wo", 3) == P(None, None, "tp")
    assert spec("w_up", 3) == P(None, "tp", None) and spec("w_down", 3, block=32) == P(None, None, "tp")
    assert spec("embed", 3) == P("tp", None)
    # tp=2 and tp=4 cut no head in half: attention stays replicated, the FFN and vocab are split.
    for tp in (2, 4):
        assert spec("wq", tp) == spec("wk", tp) == P(None, None, None) and spec("wo", tp) == P(
            None, None, None
        )
        assert spec("w_gate", tp) == P(None, "tp", None) and spec("embed", tp) == P("tp", None)
    # A quantized input axis is split only at whole blocks: 1536 / 32 = 48 blocks, not divisible by 5.
    assert spec("w_down", 5, block=32) == P(None, None, None)


def test_rules_refuse_two_logical_axes_on_one_mesh_axis():
    axes = [info.axes for info in declared(models.declare(SMOL)).values()]
    check_rules(axes, RULES)
    with pytest.raises(ValueError, match="two logical axes"):
        check_rules(axes, {**RULES, "embed": "tp"})


WORKER = background.Job(
    lambda folder: [
        sys.executable,
        str(Path(__file__).parent / "sharding_worker.py"),
        default_model(),
        str(folder),
    ],
    fixture="results",
    timeout=2400,
)


@pytest.fixture(scope="module")
def results(model_path):
    """The worker's measurements (it runs in the background from the start of the session:
    tests/background.py)."""
    run = WORKER.result()
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.parametrize("mesh", ["tp=2", "tp=3", "tp=4", "dp=2,tp=2"])
def test_greedy_output_identical_to_one_device(results, mesh):
    assert results["devices"] == 8
    row = results[mesh]
    assert row["quantized"]  # the default: Q4_1 kept quantized, its blocks split consistently
    assert row["tokens"] == results["base"]
    assert row["logit_max_diff"] < LOGIT_ATOL


@pytest.mark.parametrize("mesh, per_layer", [("tp=2", 1), ("tp=3", 2), ("tp=4", 1)])
def test_decode_program_collectives(results, mesh, per_layer):
    """Per layer: one all-reduce after the MLP's row-parallel down projection, and one after the
    attention output projection where the heads are split (tp=3; at 2 and 4 they stay whole)."""
    row = results[mesh]
    assert row["layer_all_reduce"] == per_layer
    for shape in row["all_gather_shapes"]:
        assert shape not in row["weight_shapes"], f"a weight is all-gathered: {shape}"


@pytest.mark.parametrize("mesh, tp", [("tp=2", 2), ("tp=3", 3), ("tp=4", 4)])
def test_each_device_holds_only_its_slice(results, mesh, tp):
    row = results[mesh]
    assert row["per_device"] == [row["expected_per_device"]] * tp
    share = row["expected_per_device"] / row["total"]
    assert share < (0.45 if tp == 3 else 0.65)  # ≈ 1/tp, plus what stays replicated (norms; heads at tp 2, 4)


def test_checkpoint_restored_onto_meshes(results):
    """An xlaserve checkpoint restored straight onto tp=1, 2 and 3 meshes: the same greedy tokens as
    the GGUF it came from, and each device holding only its slice."""
    restored = results["restored"]
    for mesh in ("tp=1", "tp=2", "tp=3"):
        assert restored[mesh]["tokens"] == results["base"], mesh
    tp3 = restored["tp=3"]
    assert (
        tp3["per_device"] == [tp3["expected_per_device"]] * 3
        and tp3["expected_per_device"] < 0.45 * tp3["total"]
    )
    # requantized at convert time (int4 groups of 64): its own tokens, identical on every mesh
    assert restored["int4 tp=1"]["tokens"] == restored["int4 tp=3"]["tokens"] != results["base"]


def test_pallas_kernels_wrapped_in_shard_map(results):
    assert results["pallas tp=3"]["tokens"] == [t[:6] for t in results["base"][:2]]


DISTRIBUTED_PROMPTS = ["The capital of France is", "def add(a, b):"]


def _two_processes(folder: Path) -> list[list[str]]:
    """`xlaserve generate` at tp=4 over two processes with two CPU devices each (XLA_FLAGS below)."""
    flags = ["--model", default_model(), "--mesh", "tp=4", "--max-slots", "2", "--max-model-len", "256"]
    flags += ["--prefill-buckets", "32", "--coordinator", f"127.0.0.1:{free_port()}"]
    flags += ["--num-processes", "2", "--output", "json", "--max-tokens", "12", "--ignore-eos"]
    cmd = [sys.executable, "-m", "xlaserve.cli", "generate", *flags]
    return [[*cmd, "--process-id", "0", *DISTRIBUTED_PROMPTS], [*cmd, "--process-id", "1", "unused"]]


DISTRIBUTED = background.Job(
    _two_processes,
    fixture="distributed",
    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    timeout=900,
)


@pytest.fixture
def distributed():
    return DISTRIBUTED.result()


def test_two_processes_under_jax_distributed_equal_one(llm, distributed):
    """tp=4 over two processes with two CPU devices each; process 0 leads, process 1 replays."""
    from xlaserve import SamplingParams

    leader, follower = distributed
    assert leader.returncode == 0, leader.stderr[-3000:]
    assert follower.returncode == 0, follower.stderr[-3000:]
    assert "following process 0 on dp=1,tp=4 over 4 cpu devices" in follower.stderr
    # (gloo, the CPU collectives library, prints its own connection lines to stdout)
    got = [json.loads(line)["token_ids"] for line in leader.stdout.splitlines() if line.startswith("{")]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert got == [o.token_ids for o in llm.generate(DISTRIBUTED_PROMPTS, params)]
