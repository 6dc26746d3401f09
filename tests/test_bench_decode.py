"""`xlaserve bench decode` on the tiny preset through the command line (JSON fields, the bytes
accounting recomputed from the config, markdown and plots), and BENCHMARKS.md generation."""

from __future__ import annotations

import json

from xlaserve import cli
from xlaserve.bench import report, roofline
from xlaserve.runtime.models.presets import PRESETS


def expected_step_bytes(cfg, batch: int, context: int, itemsize: int = 4) -> tuple[int, int]:
    """(weight, KV) bytes of one float32 decode step, from the config alone: every layer matrix and
    norm, the final norm, the untied lm_head, and `batch` rows of the embedding table."""
    d, f, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    layer = d * k * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f + 2 * d
    weights = cfg.num_layers * layer + d + cfg.vocab_size * d + batch * d
    kv = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * k
    return weights * itemsize, kv * itemsize


def test_bench_decode_tiny_preset(tmp_path, capsys):
    argv = ["bench", "decode", "--preset", "tiny", "--batch-sizes", "1,2", "--context-lengths", "16,32"]
    argv += ["--steps", "3", "--warmup", "2", "--repeats", "2", "--copy-mib", "16", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    (path,) = tmp_path.glob("cpu-decode-tiny-*.json")
    r = json.loads(path.read_text())
    cfg = PRESETS["tiny"]
    assert not cfg.tie_word_embeddings  # so the untied-embedding accounting is exercised

    assert r["kind"] == "decode" and r["model"] == "tiny" and r["dtype"] == "float32"
    assert r["device"] == "cpu" and r["jax_version"] and r["date"] and "--preset tiny" in r["command"]
    assert r["datasheet"] is None and r["copy_bandwidth_Bps"] > 1e8
    assert r["compare"] is None
    assert r["peak_memory_bytes"] > 0 and "RSS" in r["peak_memory_source"]
    assert {"prefill[T=16]", "prefill[T=32]", "decode[S=2,k=1,kv=32]"} <= set(r["compile_s"])
    assert all(s > 0 for s in r["compile_s"].values())

    assert [(p["prompt_len"]) for p in r["prefill"]] == [16, 32]
    for p in r["prefill"]:
        assert p["ttft_s"] > 0 and p["pct_peak"] is None
        n, v, d = p["prompt_len"], cfg.vocab_size, cfg.hidden_size
        matmul_params = cfg.param_count() - 2 * v * d - (2 * cfg.num_layers + 1) * d  # no embed, head, norms
        attention = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * n * (n + 1) // 2
        assert p["flops"] == 2 * matmul_params * n + attention + 2 * v * d  # + the last token's logits
        assert abs(p["flops_per_s"] - p["flops"] / p["ttft_s"]) <= 1e-9 * p["flops_per_s"]

    assert sorted((d["batch"], d["context"]) for d in r["decode"]) == [(1, 16), (1, 32), (2, 16), (2, 32)]
    for d in r["decode"]:
        assert d["step_s"] > 0 and len(d["step_s_rounds"]) == 2
        assert abs(d["tok_s"] - d["batch"] / d["step_s"]) <= 1e-9 * d["tok_s"]
        weight, kv = expected_step_bytes(cfg, d["batch"], d["context"])
        assert (d["weight_bytes_per_step"], d["kv_bytes_per_step"]) == (weight, kv)
        assert d["bytes_per_step"] == weight + kv
        assert abs(d["bytes_per_s"] - (weight + kv) / d["step_s"]) <= 1e-9 * d["bytes_per_s"]
        assert abs(d["pct_copy_bw"] - 100 * d["bytes_per_s"] / r["copy_bandwidth_Bps"]) < 1e-6
        assert d["pct_datasheet"] is None

    md = path.with_suffix(".md").read_text()
    assert "| batch | context | step ms | tok/s" in md and md.count("\n| 2 | 32 |") == 1
    for png in report.plot_names(path).values():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.name in md
    assert "| batch | context |" in capsys.readouterr().out  # the table is printed too


def test_datasheet_and_presets():
    assert roofline.datasheet("NVIDIA H100 80GB HBM3")["bandwidth_Bps"] == 3.35e12
    assert roofline.datasheet("NVIDIA H100 PCIe")["bandwidth_Bps"] == 2.0e12
    assert roofline.datasheet("NVIDIA H200")["bandwidth_Bps"] == 4.8e12
    assert roofline.datasheet("NVIDIA A100-SXM4-80GB")["bandwidth_Bps"] == 2.0e12
    assert roofline.datasheet("TPU v5 lite")["bandwidth_Bps"] == 819e9
    assert roofline.datasheet("TPU v5p")["bandwidth_Bps"] == 2.76e12
    assert roofline.datasheet("TPU v4")["bandwidth_Bps"] == 1.2e12
    assert roofline.datasheet("cpu") is None
    # Parameter counts of the real models these presets copy.
    counts = {n: c.param_count() for n, c in PRESETS.items()}
    assert round(counts["llama3-8b"] / 1e9, 2) == 8.03
    assert round(counts["llama3-1b"] / 1e9, 2) == 1.24
    assert round(counts["smollm2-135m"] / 1e6, 1) == 134.5


def test_benchmarks_md_lists_every_result(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    decode_result = {
        "kind": "decode",
        "model": "m",
        "device": "cpu",
        "date": "2026-01-02T00:00:00+00:00",
        "copy_bandwidth_Bps": 1e10,
        "datasheet": None,
        "decode": [
            dict(batch=1, context=64, step_s=0.01, tok_s=100.0, bytes_per_step=10**8)
            | dict(bytes_per_s=1e10, pct_copy_bw=100.0, pct_datasheet=None)
        ],
        "prefill": [dict(prompt_len=64, ttft_s=0.1, flops_per_s=1e9, pct_peak=None)],
        "compile_s": {"generate": 1.0},
    }
    report.write(decode_result, results / "cpu-decode-m-2026-01-02.json")
    (results / "serve.json").write_text(json.dumps({"kind": "serve", "rows": [], "table": "| load |"}))
    (results / "compare.json").write_text(
        json.dumps(
            {
                "benchmark": "compare_hf",
                "date": "2025-01-01",
                "rows": [
                    dict(batch=1, xlaserve_ttft_s=0.1, hf_ttft_s=0.1, xlaserve_decode_tok_s=50.0)
                    | dict(hf_decode_tok_s=10.0, xlaserve_throughput_tok_s=40.0, hf_throughput_tok_s=9.0)
                ],
            }
        )
    )
    (results / "mystery.json").write_text(json.dumps({"kind": "new", "score": 1.5, "rows": [{"a": 1}]}))
    (results / "broken.json").write_text("{not json")
    out = report.write_benchmarks_md(results, tmp_path / "BENCHMARKS.md")
    md = out.read_text()
    for name in ("cpu-decode-m-2026-01-02.json", "serve.json", "compare.json", "mystery.json", "broken.json"):
        assert f"(results/{name})" in md
    assert "(results/cpu-decode-m-2026-01-02-tok_s.png)" in md  # plots are linked from the root
    assert "5.00x" in md and "| load |" in md and "score: 1.5" in md


def test_bench_decode_preset_against_hf(tmp_path):
    """--compare hf on a preset: HF builds a random Llama of the same shapes and runs the same
    steps; the report carries both sides' figures and their ratio."""
    argv = ["bench", "decode", "--preset", "tiny", "--batch-sizes", "2", "--context-lengths", "32"]
    argv += ["--steps", "2", "--warmup", "1", "--repeats", "1", "--copy-mib", "16", "--compare", "hf"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("cpu-decode-tiny-*.json")
    cmp = json.loads(path.read_text())["compare"]
    assert "HF transformers" in cmp["reference"]["name"]
    (row,) = cmp["decode"]
    assert row["batch"] == 2 and row["context"] == 32 and row["ref_tok_s"] > 0
    assert abs(row["speedup"] - row["xlaserve_tok_s"] / row["ref_tok_s"]) < 1e-9 * row["speedup"]
