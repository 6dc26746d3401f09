"""`xlaserve lower`: every engine program lowered on CPU for cuda and tpu, with the kernels the
engine picks there (nothing is compiled, no accelerator is needed).

The matrix (slow lane: SmolLM2 as stored and the llama3-8b preset dense and int4, at tp=1 and tp=2
on simulated CPU devices) runs the command as a user does, one background process per configuration
(tests/background.py: started when the tests are collected), with one bucket of each kind so that
each run lowers a handful of programs in seconds, and checks the Triton (cuda) and Mosaic (tpu)
kernels are inside the decode programs, and the grouped matmul kernels inside Qwen3-30B-A3B's
prefill programs. The fast lane lowers the tiny preset in this process, reports a failure
truthfully and checks the command's refusals."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import background
import pytest

from xlaserve import cli
from xlaserve.runtime import lower
from xlaserve.runtime.config import EngineConfig
from xlaserve.runtime.layout import Layout
from xlaserve.runtime.models.presets import PRESETS

# One bucket of each kind: prefill/prefill_masked/score (B=1, 2) at T=32, decode/decode_masked at
# S=2, kv=256 (= max_model_len rounded to the 256-token attention block), insert, free, copy_page.
SMALL = ["--max-model-len", "256", "--prefill-buckets", "32", "--kv-buckets", "256", "--max-slots", "2"]
SMALL += ["--slot-buckets", "2"]
CONFIGS = {
    "smollm2 tp=1": ["--model", "smollm2"],
    "smollm2 tp=2": ["--model", "smollm2", "--mesh", "tp=2"],
    "llama3-8b tp=1": ["--preset", "llama3-8b"],
    "llama3-8b tp=2": ["--preset", "llama3-8b", "--mesh", "tp=2"],
    "llama3-8b int4 tp=1": ["--preset", "llama3-8b", "--quant", "int4"],
    "llama3-8b int4 tp=2": ["--preset", "llama3-8b", "--quant", "int4", "--mesh", "tp=2"],
}
# The Pallas kernels by the name their custom call carries: Triton's (cuda) decode attention and
# quantized matmul (pallas_kernels/paged_attention.py, quantized_matmul.py), Mosaic's (tpu) by the
# names pallas_kernels/tpu_attention.py and tpu_matmul.py give them.
ATTENTION, MATMUL = "_decode_kernel", "_kernel"
TPU_ATTENTION, TPU_MATMUL = "decode_attention", "quantized_matmul"


def lower_job(*flags, fixture: str = "results") -> background.Job:
    """`xlaserve lower` as a user runs it, writing into its job's folder: started in the background
    as soon as the session's tests are collected (tests/background.py)."""
    cmd = [sys.executable, "-m", "xlaserve.cli", "lower", *SMALL, *flags]
    return background.Job(lambda folder: [*cmd, "--out", str(folder)], fixture=fixture, timeout=600)


def lowered(job: background.Job):
    """(the process, lowered.json or None) of a lowering job, once it has run."""
    done, path = job.result(), job.folder / "lowered.json"
    return done, json.loads(path.read_text()) if path.exists() else None


MATRIX = {
    name: lower_job("--platforms", "cuda,tpu", "--device-memory", "141GiB", *flags)
    for name, flags in CONFIGS.items()
}


@pytest.fixture(scope="module")
def results():
    """Per configuration: (process, lowered.json) of `lower --platforms cuda,tpu`, planned for an H200."""
    return {name: lowered(job) for name, job in MATRIX.items()}


def rows(summary, platform, kind=None):
    return [
        r for r in summary["programs"] if r["platform"] == platform and (kind is None or r["kind"] == kind)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_cuda_lowers_every_program_with_kernels_in_decode(results, config):
    done, summary = results[config]
    assert summary is not None, done.stderr[-3000:]
    cuda = rows(summary, "cuda")
    assert [r["error"] for r in cuda if r["error"]] == []
    kinds = {
        "prefill",
        "prefill_masked",
        "score",
        "score_few",
        "decode",
        "decode_masked",
        "insert",
        "free",
        "copy_page",
    }
    assert {r["kind"] for r in cuda} == kinds
    quantized = "int4" in config or "smollm2" in config  # SmolLM2's Q4_1/Q8_0 blocks stay quantized
    for r in rows(summary, "cuda", "decode") + rows(summary, "cuda", "decode_masked"):
        assert f"triton:{ATTENTION}" in r["kernels"], r
        assert (f"triton:{MATMUL}" in r["kernels"]) == quantized, r
        assert "decode" in r["path"].rsplit("/", 1)[-1]
        assert r["weight_bytes"] > 0 and r["kv_bytes"] > 0
    assert all(Path(r["path"]).read_text().startswith("module @") for r in cuda)
    assert "141.00 GiB" in summary["plans"]["cuda"]
    assert f"| decode[S=2,k=1,kv=256] | cuda | triton:{ATTENTION}" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_tpu_lowers_every_program_with_kernels_in_decode(results, config):
    """Mosaic kernels inside the tpu decode programs: attention where the TPU kernel takes the
    cache (bfloat16 K/V with kv heads in pairs per device: llama3-8b's 8, not SmolLM2's 3, which
    attends on the XLA path), the quantized matmul for quantized weights."""
    done, summary = results[config]
    tpu = rows(summary, "tpu")
    assert [r["error"] for r in tpu if r["error"]] == [], done.stdout[-3000:]
    quantized = "int4" in config or "smollm2" in config
    for r in rows(summary, "tpu", "decode") + rows(summary, "tpu", "decode_masked"):
        mosaic = [k for k in r["kernels"] if k.startswith("mosaic:")]
        assert any(TPU_ATTENTION in k for k in mosaic) == ("llama3" in config), r
        assert any(TPU_MATMUL in k for k in mosaic) == quantized, r
    assert done.returncode == 0


XLA_KERNELS = lower_job(
    *["--preset", "llama3-8b", "--quant", "int4", "--mesh", "tp=2", "--platforms", "tpu"],
    *["--attention-impl", "xla", "--matmul-impl", "xla"],
    fixture="xla_kernels",
)


@pytest.fixture
def xla_kernels():
    return lowered(XLA_KERNELS)


@pytest.mark.slow
def test_tpu_lowers_everything_with_xla_kernels(xla_kernels):
    """--attention-impl xla --matmul-impl xla: every tpu program lowers (the gap is the kernels)."""
    done, summary = xla_kernels
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(summary["programs"]) == 10 and all(r["kernels"] == [] for r in summary["programs"])


# Qwen3-30B-A3B (128 experts, 8 per token): dense bfloat16 experts at tp=1, int4 (q4_0) at tp=2.
MOE_CONFIGS = {
    "qwen3-30b-a3b tp=1": ["--preset", "qwen3-30b-a3b"],
    "qwen3-30b-a3b int4 tp=2": ["--preset", "qwen3-30b-a3b", "--quant", "int4", "--mesh", "tp=2"],
}
GROUPED, TPU_GROUPED, MEGABLOX = (
    "triton:_grouped_kernel",
    "mosaic:xlaserve_grouped_matmul_q4_0",
    "mosaic:kernel",
)


MOE_MATRIX = {
    name: lower_job("--platforms", "cuda,tpu", "--device-memory", "141GiB", *flags, fixture="moe_results")
    for name, flags in MOE_CONFIGS.items()
}


@pytest.fixture(scope="module")
def moe_results():
    return {name: lowered(job) for name, job in MOE_MATRIX.items()}


@pytest.mark.slow
@pytest.mark.parametrize("config", MOE_CONFIGS)
def test_moe_prefill_programs_run_the_grouped_matmul_kernels(moe_results, config):
    """The sorted-by-expert (grouped) path of prefill and score runs the grouped matmul kernel:
    Triton's on cuda; on tpu megablox's gmm (named `kernel`) for dense experts, ours for int4.
    Decode (2 slots x 8 pairs < 128 experts) gathers its experts instead."""
    done, summary = moe_results[config]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tpu_grouped = TPU_GROUPED if "int4" in config else MEGABLOX
    for r in summary["programs"]:
        grouped = GROUPED if r["platform"] == "cuda" else tpu_grouped
        assert (grouped in r["kernels"]) == (
            r["kind"] in ("prefill", "prefill_masked", "score", "score_few")
        ), r


# -- fast lane -------------------------------------------------------------------------------------


def test_tiny_preset_lowers_for_cuda_in_process(tmp_path):
    cfg = PRESETS["tiny"]
    ecfg = EngineConfig(max_model_len=256, prefill_buckets=(32,), kv_buckets=(256,), max_slots=2)
    layout = Layout.build(cfg, lower.preset_weights(cfg, "q4_0", "bfloat16"), ecfg, backend="gpu")
    got = {r.program: r for r in lower.lower_all(layout, "cuda", tmp_path)}
    assert list(got) == [p.name for p in layout.programs()]
    assert all(r.error is None for r in got.values()), [r.error for r in got.values()]
    assert got["decode[S=2,k=1,kv=256]"].kernels == (f"triton:{ATTENTION}", f"triton:{MATMUL}")
    assert got["insert"].kernels == () and got["insert"].weight_bytes is None
    assert sorted(p.name for p in (tmp_path / "cuda").iterdir()) == sorted(
        lower.file_name(name) for name in got
    )
    assert lower.file_name("decode[S=8,k=1,kv=512]") == "decode.S8.k1.kv512.mlir"


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_kv_cache_lowers_for_cuda_and_tpu(tmp_path, kv):
    """The tiny preset with an 8-bit cache: on cuda the Triton attention reads the stored K/V and
    their scales; the TPU kernels take float K/V only, so tpu attends on the XLA path. The table's
    KV bytes count the scales."""
    cfg = PRESETS["tiny"]
    ecfg = EngineConfig(
        max_model_len=256, prefill_buckets=(32,), kv_buckets=(256,), max_slots=2, kv_cache_dtype=kv
    )
    stored = {"int8": "xi8", "fp8": "xf8E4M3FN"}[kv]
    for backend, platform in (("gpu", "cuda"), ("tpu", "tpu")):
        layout = Layout.build(cfg, lower.preset_weights(cfg, "q4_0", "bfloat16"), ecfg, backend=backend)
        got = {r.program: r for r in lower.lower_all(layout, platform, tmp_path)}
        assert all(r.error is None for r in got.values()), [r.error for r in got.values()]
        decode = got["decode[S=2,k=1,kv=256]"]
        if platform == "cuda":
            assert f"triton:{ATTENTION}" in decode.kernels
        else:
            assert not any("attention" in k for k in decode.kernels), decode.kernels
        assert stored in (tmp_path / platform / lower.file_name(decode.program)).read_text()
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 4)  # 8-bit values, f32 scales
        assert decode.kv_bytes == 2 * 256 * per_token
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' needs a GPU or TPU"):
        Layout.build(
            cfg,
            lower.preset_weights(cfg, "none", "float32"),
            dataclasses.replace(ecfg, kv_cache_dtype="fp8"),
            backend="cpu",
        )


def test_failures_are_reported_not_raised(tmp_path, monkeypatch, capsys):
    """A program that cannot be lowered is a row with its error and the others are still lowered
    (here Triton's kernels forced onto tpu: their compiler parameters are GPU-only; insert and free
    and copy_page call no kernel); the command then prints the table and exits 1."""
    cfg = PRESETS["tiny"]
    ecfg = EngineConfig(max_model_len=256, prefill_buckets=(32,), kv_buckets=(256,), max_slots=2)
    layout = Layout.build(cfg, lower.preset_weights(cfg, "none", "bfloat16"), ecfg, backend="tpu")
    triton = dataclasses.replace(layout.st.kernels, platform="gpu")
    layout = dataclasses.replace(layout, st=dataclasses.replace(layout.st, kernels=triton))
    got = lower.lower_all(layout, "tpu", tmp_path)
    ok = ["insert", "free", "copy_page"]
    assert [r.program for r in got if r.error is None] == ok
    # JAX's error names the params' platform once a module registering Mosaic GPU's rule was
    # imported (an earlier cuda lowering in this process), else its Mosaic TPU lowering asserts
    assert all(
        r.path is None and ("Compiler params" in r.error or "AssertionError" in r.error)
        for r in got
        if r.error
    )
    monkeypatch.setattr(lower, "lower_all", lambda *a, **k: got)
    assert cli.main(["lower", "--preset", "tiny", "--platforms", "tpu", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "| decode[S=2,k=1,kv=256] | tpu | - | " in out and "FAILED: " in out


def test_kernel_calls_found_by_target_and_name():
    text = (
        "%1 = stablehlo.custom_call @__gpu$xla.gpu.triton(%0) "
        '{mhlo.backend_config = {name = "_decode_kernel"}}\n'
        '%2 = stablehlo.custom_call @tpu_custom_call(%1) {backend_config = "{}", kernel_name = "attn"}\n'
        "%3 = stablehlo.custom_call @Sharding(%2) {}\n"
    )
    assert lower.kernel_calls(text) == ("mosaic:attn", "triton:_decode_kernel")


def test_unknown_platform_is_refused(tmp_path, capsys):
    assert cli.main(["lower", "--platforms", "cuda,gpu", "--preset", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown platform 'gpu'" in err and "allowed: cpu, cuda, rocm, tpu" in err


def test_preset_that_does_not_fit_the_stated_memory_is_refused(tmp_path, capsys):
    argv = ["lower", "--platforms", "cuda", "--preset", "llama3-8b", "--device-memory", "8GiB"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "weights 14.96 GiB" in err and "7.20 GiB (8.00 GiB --device-memory x memory_fraction 0.9)" in err
    assert "Allowed: device memory ≥" in err
    assert cli.main(["lower", "--preset", "llama3-9b", "--out", str(tmp_path)]) == 2
    assert f"allowed: {', '.join(sorted(PRESETS))}" in capsys.readouterr().err


def test_batched_prefill_lowers_for_cuda_with_the_quantized_matmul(tmp_path):
    """prefill_batch (several sequences' chunks a call) is in the program list `lower` walks: it
    runs the quantized matmul kernel and attends with the Pallas prefill kernel batched over its
    rows; insert takes a row of each batch size's result."""
    cfg = PRESETS["tiny"]
    ecfg = EngineConfig(max_model_len=256, prefill_buckets=(16, 32), kv_buckets=(256,), max_slots=2)
    layout = Layout.build(cfg, lower.preset_weights(cfg, "q4_0", "bfloat16"), ecfg, backend="gpu")
    got = {r.program: r for r in lower.lower_all(layout, "cuda", tmp_path)}
    assert [name for name in got if "batch" in name or "insert" in name] == [
        "prefill_batch[B=2,T=16]",
        "insert",
        "insert[R=2]",
    ]
    batch = got["prefill_batch[B=2,T=16]"]
    assert batch.error is None and set(batch.kernels) == {f"triton:{MATMUL}", "triton:_prefill_kernel"}
    assert batch.kv_bytes == 2 * got["prefill[T=16]"].kv_bytes
