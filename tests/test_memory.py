"""The memory plan (runtime/memory.py): weights, KV pages, activations and headroom per device from
the shapes, slots sized to what fits, and configurations that cannot fit refused with the numbers.
Planned from abstract weights (nothing allocated), for an H200's 141 GiB and smaller devices."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

from xlaserve.runtime import lower, memory, models
from xlaserve.runtime.compiled import Compiler
from xlaserve.runtime.config import EngineConfig
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.layout import Layout
from xlaserve.runtime.models import params
from xlaserve.runtime.models.presets import PRESETS

GiB = 1 << 30
LLAMA = PRESETS["llama3-8b"]
DENSE = lower.preset_weights(LLAMA, "none", "bfloat16")


def planned(engine_cfg=None, memory_gib=141, backend="gpu", mesh=None, weights=DENSE) -> Layout:
    device = (memory_gib * GiB, "test")
    return Layout.build(
        LLAMA, weights, engine_cfg or EngineConfig(), backend=backend, mesh=mesh, device=device
    )


def test_parse_bytes():
    assert memory.parse_bytes("141GiB") == 141 * GiB
    assert memory.parse_bytes("80GB") == 80 * 10**9 and memory.parse_bytes("1.5 TiB") == 3 << 39
    assert memory.parse_bytes("4096") == 4096
    for bad in ("", "12 parsecs", "-3GiB", "GiB"):
        with pytest.raises(ValueError, match="must be a positive number with a unit"):
            memory.parse_bytes(bad)


def test_plan_of_llama3_8b_on_an_h200():
    layout = planned()
    plan, ecfg = layout.plan, layout.ecfg
    assert plan.weights == LLAMA.param_count() * 2  # bf16, every weight once
    assert plan.page_bytes == 2 * 32 * 16 * 8 * 128 * 2  # K and V, 32 layers, 16 tokens, 8 heads of 128
    # max_slots left out: as many sequences of max_model_len as fit, at most 64 on an accelerator
    assert ecfg.max_slots == plan.slots == 64 and ecfg.max_model_len == 4096
    assert plan.pages == ecfg.total_pages == 64 * 4096 // 16
    assert 0 < plan.activations < 2 * GiB and plan.headroom > 0
    assert plan.budget == int(141 * GiB * 0.9)
    assert plan.weights + plan.kv + plan.activations + plan.headroom == plan.budget
    text = plan.describe()
    assert "141.00 GiB (test) x 0.9" in text and "weights 14.96 GiB" in text and "64 slots" in text


def test_tensor_parallel_halves_weights_and_pages_per_device():
    one, two = planned().plan, planned(mesh=AbstractMesh((2,), ("tp",))).plan
    assert two.devices == 2 and two.page_bytes == one.page_bytes // 2  # 8 kv heads split in two
    assert one.weights / 2 <= two.weights < one.weights / 2 + 2**20  # the norms stay whole


def test_quantized_weights_are_planned_at_their_stored_size():
    int4 = planned(weights=lower.preset_weights(LLAMA, "q4_0", "bfloat16")).plan
    assert int4.weights == params.weight_bytes(lower.preset_weights(LLAMA, "q4_0", "bfloat16"))
    assert int4.weights < planned().plan.weights / 3


def test_slots_shrink_to_what_fits_and_cpu_keeps_few():
    small = planned(memory_gib=24)
    seq = small.ecfg.pages_per_seq * small.plan.page_bytes
    assert 1 <= small.ecfg.max_slots < 64 and small.plan.headroom >= 0
    assert small.plan.headroom < seq + small.plan.activations  # one more sequence would not fit
    assert planned(backend="cpu").ecfg.max_slots == 8
    assert planned(EngineConfig(slot_buckets=(1, 4))).ecfg.slot_buckets == (1, 4, 64)


def test_what_cannot_fit_is_refused_with_the_numbers():
    with pytest.raises(ValueError) as e:
        planned(EngineConfig(max_slots=64), memory_gib=24)
    msg = str(e.value)
    assert (
        "weights 14.96 GiB + KV 32.00 GiB" in msg
        and "21.60 GiB (24.00 GiB test x memory_fraction 0.9)" in msg
    )
    assert "max_slots=64 was asked for" in msg and "max_slots ≤ 11" in msg
    with pytest.raises(ValueError, match=r"num_pages=100000 was asked for\. Allowed: num_pages ≤ 2969"):
        planned(EngineConfig(num_pages=100_000), memory_gib=24)
    with pytest.raises(ValueError, match="not even one sequence of max_model_len=4096 fits"):
        planned(memory_gib=8)
    assert planned(EngineConfig(memory_fraction=0.5), memory_gib=80).plan.budget == 40 * GiB
    with pytest.raises(ValueError, match=r"memory_fraction=1.5 must be in \(0, 1\]"):
        EngineConfig(memory_fraction=1.5).resolve(LLAMA, "gpu")


def test_engine_prints_its_plan_and_compiles_the_layouts_programs(monkeypatch):
    """The plan comes first (a config that cannot fit is refused before anything is placed), then
    every program of `Layout.programs()` is compiled (compilation stubbed out here: the list is
    what is checked)."""
    cfg = PRESETS["tiny"]
    weights = params.random_weights(models.declare(cfg), 0, jnp.float32)
    fields = dict(max_model_len=64, prefill_buckets=(16,), kv_buckets=(64,), max_slots=2)
    with pytest.raises(ValueError, match="the engine does not fit in memory"):
        Engine(cfg, weights, EngineConfig(**fields, device_memory=2**20))
    compiled = []
    monkeypatch.setattr(Compiler, "__call__", lambda self, p, lowered=None: compiled.append(p.name) or p.name)
    messages = []
    engine = Engine(cfg, weights, EngineConfig(**fields), progress=messages.append)
    assert messages[0].startswith("memory plan per device: ") and "(host RAM)" in messages[0]
    assert engine.plan.pages == engine.ecfg.total_pages and engine.plan.weights == params.weight_bytes(
        weights
    )
    assert compiled == [p.name for p in engine.layout.programs()]
    assert compiled[:3] == ["prefill[T=16]", "prefill_masked[T=16]", "score_packed[N=1,S=1]"]
    assert compiled[-4:] == ["insert", "insert[R=2]", "free", "copy_page"]
    assert "decode_masked[S=2,k=1,kv=64]" in compiled
    # float32 on CPU with the native attention kernel: prompt chunks go packed, not batched
    assert engine.layout.packed and "prefill_packed[R=2,N=4]" in compiled
    assert {"score_packed[N=16,S=4]", "score_packed[N=16,S=16]"} <= set(compiled)
    assert not any(name.startswith(("prefill_batch", "score[", "score_few")) for name in compiled)
    # compile_at="use": nothing at start-up; a program the first time it is looked up, and only then
    every, compiled[:] = list(compiled), []
    lazy = Engine(cfg, weights, EngineConfig(**fields, compile_at="use"))
    assert compiled == [] and len(lazy._decode) == sum(n.startswith("decode[") for n in every)
    lazy._decode[2, 64], lazy._decode[2, 64], lazy._insert[1]
    assert compiled == ["decode[S=2,k=1,kv=64]", "insert"]


def test_memory_fraction_flag_reaches_the_engine_config():
    from xlaserve.bench import decode
    from xlaserve.cli import build_parser
    from xlaserve.cli.common import engine_kwargs

    for command in (["generate", "hi"], ["serve"]):
        args = build_parser(command[0]).parse_args([*command, "--memory-fraction", "0.5"])
        assert engine_kwargs(args)["memory_fraction"] == 0.5
    args = build_parser("bench").parse_args(["bench", "decode", "--memory-fraction", "0.7"])
    assert decode.engine_config(args, "float32").memory_fraction == 0.7
    args = build_parser("lower").parse_args(["lower", "--out", "x", "--memory-fraction", "0.6"])
    assert args.memory_fraction == 0.6 and args.platforms == "cuda,tpu"


def test_compile_at_flag_and_no_status_line_inside_the_output(caplog):
    """--compile-at reaches the engine; once generate's status line is done (last), a compile on
    first use goes to the log, not into the text streaming on stdout."""
    import io
    import logging

    from xlaserve.cli import build_parser
    from xlaserve.cli.common import Progress, engine_kwargs

    args = build_parser("generate").parse_args(["generate", "hi", "--compile-at", "start"])
    assert engine_kwargs(args)["compile_at"] == "start"
    with pytest.raises(SystemExit):
        build_parser("serve").parse_args(["serve", "--compile-at", "later"])
    out = io.StringIO()
    progress = Progress(out)
    progress("compiling prefill[T=32]")
    progress.done("ready", last=True)
    with caplog.at_level(logging.INFO, logger="xlaserve"):
        progress("compiling decode[S=1,k=1,kv=64]")
    assert "ready" in out.getvalue() and "decode" not in out.getvalue()
    assert "compiling decode[S=1,k=1,kv=64]" in caplog.text
