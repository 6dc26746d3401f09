"""Mixture-of-experts families (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE) against HF transformers on tiny random
checkpoints transformers builds (tests/tiny_moe.py): from the HF directory and from the GGUF
llama.cpp's converter writes (stacked experts; Q8_0 experts kept quantized; convert-time int8), on
one device and with the experts split over 8 simulated devices (ep=4, tp=2,ep=2, dp=2,ep=2); the
three expert paths (sorted ragged_dot, gathered, dense reference) agree; routing ties break as
torch.topk breaks them; what is not supported is refused naming the value and its limit.

Logits are compared over a teacher-forced sequence, the prompt then HF's greedy continuation: equal
argmaxes there are equal greedy tokens. Compiles are kept few (`tiny_moe.run_logits` compiles two
programs instead of an engine's dozen); one end-to-end engine run covers the serving path."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_families as tf
import tiny_moe as tm
from helpers import LOGIT_ATOL, TINY_ENGINE, hf_greedy, hf_logits
from tiny_gguf import tokenizer_meta

from xlaserve.checkpoints.load import load_model
from xlaserve.checkpoints.loaded import CheckpointError
from xlaserve.runtime import models, placement
from xlaserve.runtime.config import Kernels, ModelConfig
from xlaserve.runtime.models import moe
from xlaserve.runtime.models.params import named
from xlaserve.runtime.quant import QuantArray, dequantize, quantize
from xlaserve.sharding.mesh import MeshSpec, parse_mesh

PROMPT = [5, 17, 300, 42, 7, 99, 1000, 3, 11, 64, 12, 250, 1500, 77]
STEPS = 6  # greedy tokens after the prompt, each run as a decode-shaped pass


# -- the expert paths and routing, on small arrays ------------------------------------------------


def _experts(rng, e=8, f=24, d=16, quant=False):
    mats = [rng.normal(size=s).astype(np.float32) * 0.3 for s in ((e, f, d), (e, f, d), (e, d, f))]
    return (
        [quantize(m, "q8_0", m.shape[-1], np.float32) for m in mats]
        if quant
        else [jnp.asarray(m) for m in mats]
    )


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("n, k", [(1, 2), (5, 3), (40, 2)])
def test_the_three_expert_paths_agree_whole_and_split_over_ep(n, k, quant):
    rng = np.random.default_rng(n + k)
    gate, up, down = _experts(rng, quant=quant)
    x = jnp.asarray(rng.normal(size=(n, 16)), jnp.float32)
    router = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    cfg = ModelConfig(64, 16, 24, 1, 2, 2, 8, num_experts=8, num_experts_per_tok=k, norm_topk_prob=True)
    weights, ids = moe.route(x, router, cfg)
    want = moe.dense(x, ids, weights, gate, up, down)
    for impl in (moe.grouped, moe.gathered):
        np.testing.assert_allclose(impl(x, ids, weights, gate, up, down), want, atol=1e-5, rtol=1e-5)
        # ep=4: each device's 2 experts, contributions summed (what the psum adds)
        cut = lambda m, i: (
            jax.tree.map(lambda a: a[2 * i : 2 * i + 2], m)
            if isinstance(m, QuantArray)
            else m[2 * i : 2 * i + 2]
        )
        parts = [impl(x, ids, weights, *(cut(m, i) for m in (gate, up, down)), e0=2 * i) for i in range(4)]
        np.testing.assert_allclose(sum(parts), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("quant", [None, "q8_0", "q4_1"])
def test_the_grouped_path_runs_the_pallas_kernels_when_asked_and_matches_ragged_dot(platform, quant):
    """Kernels(matmul="pallas"): the three projections of `grouped` run the grouped matmul kernel
    (Triton's or Mosaic's, interpreted) on the experts as stored, and agree with ragged_dot."""
    rng = np.random.default_rng(7)
    mats = [rng.normal(size=(4, 256, 256)).astype(np.float32) * 0.1 for _ in range(3)]  # E=4, F=D=256
    gate, up, down = [
        jax.tree.map(jnp.asarray, quantize(m, quant, 32)) if quant else jnp.asarray(m) for m in mats
    ]
    x = jnp.asarray(rng.normal(size=(24, 256)), jnp.float32)
    cfg = ModelConfig(64, 256, 256, 1, 2, 2, 8, num_experts=4, num_experts_per_tok=2)
    weights, ids = moe.route(x, jnp.asarray(rng.normal(size=(4, 256)), jnp.float32), cfg)
    mm = moe.grouped_matmul(Kernels(matmul="pallas", interpret=True, platform=platform))
    run = lambda x, mm: moe.grouped(x, ids, weights, gate, up, down, mm=mm)
    jaxpr = str(jax.make_jaxpr(run, static_argnums=1)(x, mm))
    assert jaxpr.count("jit[name=grouped_matmul") == 3 and "pallas_call" in jaxpr
    np.testing.assert_allclose(run(x, mm), run(x, moe.ragged_dot), atol=2e-5, rtol=1e-5)
    assert moe.grouped_matmul(Kernels()) is moe.ragged_dot


def test_routing_ties_take_the_lower_expert_where_torch_topk_takes_its_sorts_choice():
    """Routers whose rows repeat in pairs give exactly equal probabilities (in torch and in JAX).
    Where a tie does not straddle the k-th place, our experts and weights are HF's exactly (order
    within the top k aside, which changes no output). Where it does, we take the lower expert index
    (`jax.lax.top_k`, deterministic on every backend); torch.topk on CPU takes whatever its
    nth_element/partial_sort leaves there, which is not index order (ones(8), k=3 -> [6, 5, 4]), so
    on such an exact tie the two differ in which of the tied experts runs, never in the weights."""
    import torch

    assert torch.topk(torch.ones(1, 8), 3).indices.tolist() == [[6, 5, 4]]  # neither lowest nor highest first
    rng = np.random.default_rng(0)
    router = np.repeat(rng.normal(size=(4, 16)).astype(np.float32), 2, axis=0)  # rows 2j = 2j + 1
    x = rng.normal(size=(32, 16)).astype(np.float32)
    for k, norm in ((1, False), (2, True), (3, True), (4, False), (5, False)):
        cfg = ModelConfig(64, 16, 24, 1, 2, 2, 8, num_experts=8, num_experts_per_tok=k, norm_topk_prob=norm)
        weights, ids = moe.route(jnp.asarray(x), jnp.asarray(router), cfg)
        probs = torch.softmax(torch.from_numpy(x) @ torch.from_numpy(router).T, dim=-1, dtype=torch.float)
        assert (probs[:, 0::2] == probs[:, 1::2]).all()
        hf_w, hf_ids = torch.topk(probs, k, dim=-1)
        if norm:
            hf_w = hf_w / hf_w.sum(-1, keepdim=True)
        np.testing.assert_allclose(np.sort(weights, -1), np.sort(hf_w.numpy(), -1), atol=1e-6, rtol=0)
        ours, theirs = np.sort(np.asarray(ids), -1), np.sort(hf_ids.numpy(), -1)
        straddles = k % 2 == 1  # pairs tie, so an odd k always cuts one pair
        assert straddles or (ours == theirs).all()
        if straddles:  # the cut pair contributes its lower expert: pairs as HF's, members by index
            assert (ours // 2 == theirs // 2).all() and (np.asarray(ids)[:, -1] % 2 == 0).all()


def test_a_decode_step_reads_only_the_routed_experts():
    """Qwen3-30B-A3B's shapes: one token reads 8 of 128 experts, 1/16 of the expert bytes a pass
    over all of them reads; a batch of 32 reads at most all of them."""
    from xlaserve.runtime.models.presets import PRESETS

    cfg = PRESETS["qwen3-30b-a3b"]
    read, dense = moe.routed_bytes(cfg, tokens=1, bytes_per_weight=2)
    assert read * 16 == dense
    assert moe.routed_bytes(cfg, tokens=32, bytes_per_weight=2)[0] == dense
    olmoe = PRESETS["olmoe-1b-7b"]  # OLMoE's paper: 6.9B parameters, 1.3B active
    assert (
        round(olmoe.param_count() / 1e9, 1) == 6.9 and round(olmoe.param_count(active=True) / 1e9, 1) == 1.3
    )
    assert moe.pick(1 * 8, 128, "gpu") == "gathered" and moe.pick(32 * 8, 128, "gpu") == "grouped"


def test_the_expert_path_follows_the_backend_and_the_experts_on_one_device():
    """Fewer pairs than local experts: gathered everywhere; else grouped on GPU/TPU and dense on
    CPU, where ragged_dot is a masked dense dot over every expert (bench/moe.py measures both)."""
    assert [moe.pick(p, 128, "cpu") for p in (8, 127, 128, 4096)] == ["gathered"] + ["gathered"] + [
        "dense"
    ] * 2
    assert [moe.pick(p, 128, b) for p in (127, 128) for b in ("gpu", "tpu")] == ["gathered"] * 2 + [
        "grouped"
    ] * 2
    assert moe.pick(64, 16, "cpu") == "dense"  # ep=8 of 128 experts: 16 on a device, not 128


# -- what is refused ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, needle",
    [
        (dict(num_experts=8, num_experts_per_tok=9), r"num_experts_per_tok=9 must be in \[1, 8\]"),
        (dict(num_experts=8, num_experts_per_tok=0), r"num_experts_per_tok=0 must be in \[1, 8\]"),
        (dict(num_experts=-1), "num_experts=-1 must be ≥ 0"),
        (dict(num_experts_per_tok=2), "need num_experts ≥ 1"),
    ],
)
def test_an_expert_count_or_top_k_out_of_range_is_refused(fields, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(64, 16, 24, 1, 2, 2, 8, architecture="mixtral", **fields)


def test_the_ep_mesh_axis_parses_and_must_divide_the_experts():
    assert parse_mesh("ep=4") == MeshSpec(ep=4) and parse_mesh("tp=2,ep=2") == MeshSpec(tp=2, ep=2)
    assert parse_mesh("dp=2,ep=2").devices == 4 and str(parse_mesh("tp=2,ep=2")) == "dp=1,tp=2,ep=2"
    cfg = ModelConfig(64, 16, 24, 1, 2, 2, 8, architecture="mixtral", num_experts=8, num_experts_per_tok=2)
    mesh = lambda ep: type("M", (), {"shape": {"ep": ep, "tp": 1}})()
    placement.check_mesh(cfg, mesh(4))
    with pytest.raises(ValueError, match=r"ep=3 does not divide num_experts=8"):
        placement.check_mesh(cfg, mesh(3))
    with pytest.raises(ValueError, match="ep=2 needs a mixture-of-experts model"):
        placement.check_mesh(ModelConfig(64, 16, 24, 1, 2, 2, 8), mesh(2))


def test_a_dense_family_refuses_experts():
    cfg = ModelConfig(64, 16, 24, 1, 2, 2, 8, num_experts=8, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="num_experts=8 is not implemented for the llama family"):
        models.of(cfg).check(cfg)


# -- the tiny checkpoints ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta(model_path):
    return tokenizer_meta(model_path)


@pytest.fixture(scope="module")
def built(meta, tmp_path_factory):
    """family -> (HF directory, its F32 GGUF, HF's model, teacher-forced sequence, HF's logits)."""
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            hf = tm.build(family, root / family, tf.tiny_tokenizer(meta))
            tm.write_gguf(root / family, root / f"{family}.gguf", meta)
            seq = PROMPT + hf_greedy(hf, PROMPT, STEPS)
            made[family] = (root / family, root / f"{family}.gguf", hf, seq, hf_logits(hf, seq))
        return made[family]

    return get


def check_logits(got, want, seq):
    """Logits within LOGIT_ATOL everywhere, and the greedy continuation's argmaxes."""
    assert np.abs(got - want).max() <= LOGIT_ATOL
    n = len(PROMPT)
    assert got[n - 1 : -1].argmax(-1).tolist() == seq[n:]


@pytest.mark.slow
@pytest.mark.parametrize("family", tm.FAMILIES)
def test_the_hf_directory_matches_hf_and_its_gguf_loads_the_same(family, built):
    directory, gguf, _, seq, want = built(family)
    ours = load_model(directory)
    assert ours.config.architecture == family and ours.config.num_experts == tm.EXPERTS
    check_logits(tm.run_logits(ours.config, ours.weights, seq, prefill=len(PROMPT)), want, seq)
    other = load_model(gguf)
    same = lambda x, y: x == y or (isinstance(x, float) and np.float32(x) == np.float32(y))  # GGUF: float32
    for field in ModelConfig.__dataclass_fields__:  # all but what a GGUF does not carry
        if field not in ("name", "eos_token_ids", "max_position_embeddings"):
            assert same(getattr(other.config, field), getattr(ours.config, field)), field
    a, b = named(ours.weights), named(other.weights)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)


def hf_state(cfg: ModelConfig, weights) -> dict[str, np.ndarray]:
    """Our weights (quantized ones dequantized) under HF's names: layers and experts unstacked."""
    family, out = models.of(cfg), {}
    for name, w in named(weights).items():
        w = np.asarray(dequantize(w) if isinstance(w, QuantArray) else w, np.float32)
        template = family.hf_names[name]
        for i in range(cfg.num_layers) if "{i}" in template else [None]:
            layer = w[i] if i is not None else w
            for e in range(cfg.num_experts) if "{e}" in template else [None]:
                out[template.format(i=i, e=e)] = np.ascontiguousarray(layer if e is None else layer[e])
    return out


def hf_holding(directory, state, tmp_path):
    """HF's model of `directory` with the weights `state` (saved in a copy and read back, so that
    transformers fuses the per-expert tensors as it fuses a checkpoint's)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM

    copy = tmp_path / "hf_holding"
    shutil.copytree(directory, copy)
    save_file(state, copy / "model.safetensors")
    return AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32).eval()


@pytest.mark.slow
def test_q8_0_experts_stay_quantized_and_serve_hfs_greedy_tokens(built, meta, tmp_path):
    """A Q8_0 GGUF (routers F32, as llama.cpp keeps them): the experts and the shared expert load as
    QuantArrays [L, E, F, D]; through the engine (prefill, decode) the greedy tokens are those of HF
    holding the file's dequantized weights."""
    from xlaserve import LLM, SamplingParams

    directory, *_ = built("qwen2_moe")
    path = tmp_path / "q8.gguf"
    tm.write_gguf(directory, path, meta, kind="Q8_0")
    loaded = load_model(path, dequantize=False)
    experts = loaded.weights.layers.moe
    assert isinstance(experts.gate, QuantArray) and experts.gate.shape == (2, tm.EXPERTS, 32, 64)
    assert isinstance(experts.shared_down, QuantArray) and not isinstance(experts.router, QuantArray)
    hf = hf_holding(directory, hf_state(loaded.config, loaded.weights), tmp_path)
    llm = LLM(str(path), **{**TINY_ENGINE, "prefill_buckets": (16,), "scoring": False})
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, PROMPT, 8)


@pytest.mark.slow
def test_convert_time_int8_experts_match_hf_on_their_dequantized_weights(built, tmp_path):
    from xlaserve.checkpoints.convert import quantize_weights

    directory, *_ = built("mixtral")
    src = load_model(directory)
    weights = quantize_weights(src.config, src.weights, "int8", "sym", 32, np.float32)
    assert isinstance(weights.layers.moe.down, QuantArray) and weights.layers.moe.down.block == 64
    assert not isinstance(weights.layers.moe.router, QuantArray)  # routers are vectors: never quantized
    hf = hf_holding(directory, hf_state(src.config, weights), tmp_path)
    seq = PROMPT + hf_greedy(hf, PROMPT, STEPS)
    check_logits(tm.run_logits(src.config, weights, seq, prefill=len(PROMPT)), hf_logits(hf, seq), seq)


@pytest.mark.slow
def test_experts_split_over_8_simulated_devices_match_hf(built, tmp_path):
    """One worker process for every family and mesh: ep=4, tp=2,ep=2 and dp=2,ep=2's second replica;
    Qwen3-MoE at tp=2,ep=2 also with the grouped matmul kernel under the shard_map."""
    specs, wants = [], {}
    for family in tm.FAMILIES:  # dp=2,ep=2 (an ep=2 replica) for the family with a shared expert
        directory, _, _, seq, want = built(family)
        meshes = ["ep=4", "tp=2,ep=2"] + (["dp=2,ep=2"] if family == "qwen2_moe" else [])
        meshes += ["tp=2,ep=2 pallas"] if family == "qwen3_moe" else []  # the grouped kernel per shard
        specs.append({"path": str(directory), "seq": seq, "prefill": len(PROMPT), "meshes": meshes})
        wants[directory.name] = (want, seq)
    (tmp_path / "spec.json").write_text(json.dumps(specs))
    tests = Path(__file__).parent
    run = subprocess.run(
        [sys.executable, str(tests / "moe_worker.py"), str(tmp_path / "spec.json"), str(tmp_path)],
        cwd=tests, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for name, (want, seq) in wants.items():
        arrays = np.load(tmp_path / f"{name}.npz")
        assert {"ep=4", "tp=2,ep=2"} <= set(arrays)
        for mesh in arrays:
            check_logits(arrays[mesh], want, seq)


def test_missing_expert_tensors_and_dense_layers_are_refused(built, tmp_path):
    from safetensors.numpy import load_file, save_file

    directory, *_ = built("qwen3_moe")
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight is missing"
    ):
        load_model(broken)
    shutil.copy(directory / "model.safetensors", broken / "model.safetensors")
    config = json.loads((broken / "config.json").read_text())
    for change, needle in (
        ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
        ({"mlp_only_layers": [0]}, r"mlp_only_layers=\[0\]"),
        ({"num_experts_per_tok": 9}, r"num_experts_per_tok=9 must be in \[1, 8\]"),
        ({"clip_qkv": 8.0}, r"clip_qkv=8.0 is not supported \(supported: null"),  # OLMoE's clamping
    ):
        (broken / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=needle):
            load_model(broken)


def _all_gathers(hlo: str) -> list[tuple[str, int]]:
    """(the line, the result's element count) of every all-gather in compiled HLO text."""
    found = []
    for line in hlo.splitlines():
        shape = re.search(r"= \w+\[([\d,]*)\]\{?[\d,]*\}? all-gather\(", line)
        if shape:
            found.append((line.strip(), math.prod(int(n) for n in shape.group(1).split(",") if n)))
    return found


@pytest.mark.slow
def test_quantized_experts_over_tp_and_ep_gather_no_expert_weights_and_match_hf(built, meta, tmp_path):
    """Q8_0 experts at tp=2,ep=2: gate/up split their ffn axis (F=32) over tp, down cannot (its
    input axis is one 32-wide block). The compiled decode step all-gathers only activations, h
    [pairs, F], never an expert matrix (it gathered gate and up, [E/ep, F, D] per layer, before the
    shard_map took the experts as placed); logits and greedy tokens are HF's on the file's
    dequantized weights."""
    directory, *_ = built("qwen2_moe")
    path = tmp_path / "q8.gguf"
    tm.write_gguf(directory, path, meta, kind="Q8_0")
    loaded = load_model(path, dequantize=False)
    cfg = loaded.config
    hf = hf_holding(directory, hf_state(cfg, loaded.weights), tmp_path)
    seq = PROMPT + hf_greedy(hf, PROMPT, STEPS)
    spec = [{"path": str(path), "seq": seq, "prefill": len(PROMPT), "meshes": ["tp=2,ep=2"], "hlo": True}]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    tests = Path(__file__).parent
    run = subprocess.run(
        [sys.executable, str(tests / "moe_worker.py"), str(tmp_path / "spec.json"), str(tmp_path)],
        cwd=tests, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    check_logits(np.load(tmp_path / "q8.gguf.npz")["tp=2,ep=2"], hf_logits(hf, seq), seq)
    gathers = _all_gathers((tmp_path / "q8.gguf.tp=2,ep=2.hlo").read_text())
    expert = cfg.expert_size * cfg.hidden_size  # one expert's matrix; a layer's local ones are E/ep of them
    assert gathers and all(n < expert for _, n in gathers), gathers
    pairs = cfg.num_experts_per_tok  # one decode token
    assert any(n == pairs * cfg.expert_size and "shard_map" in line for line, n in gathers), gathers
