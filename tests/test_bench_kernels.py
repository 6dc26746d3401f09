"""bench/kernels.py runs end to end (tiny shapes, Pallas in interpret mode) and its parity columns
hold: it is meant to be run as-is on a GPU, so CI keeps it working."""

from __future__ import annotations

import json

from xlaserve.bench import kernels


def test_kernel_benchmark_smoke(tmp_path):
    result = kernels.main(["--smoke", "--out", str(tmp_path)])
    written = json.loads(next(tmp_path.glob("cpu-kernels-smoke-*.json")).read_text())
    assert written["kind"] == "kernels" and written["interpret"] and result["copy_bandwidth_Bps"] > 0
    attention = written["decode_attention"]
    points = [(r["batch"], r["context"], r["kv_cache_dtype"]) for r in attention]
    full = [(b, c, "auto") for b in (1, 2) for c in (32, 64)]
    assert points == [*full, (2, 32, "int8"), (2, 32, "fp8")]  # 8-bit caches at one point
    for r in attention:
        assert r["max_abs_diff_vs_xla"] < 2e-2  # bf16
        per_head = 64 * 2 if r["kv_cache_dtype"] == "auto" else 64 + 4  # bf16, or 8 bits and a scale
        assert r["kv_bytes"] == 2 * r["batch"] * r["context"] * 2 * per_head  # K+V, 2 heads
        assert r["pallas_bytes_per_s"] == r["kv_bytes"] / r["pallas_s"]
    for row in written["quantized_matmul"]:
        for q in ("int8", "q4_0 g32", "q4_1 g32"):
            assert row[f"{q} max_rel_err_vs_reference"] < 2e-2, (row["m"], q)
            assert row[f"{q} speedup_vs_bf16"] == row["bf16_dense_s"] / row[f"{q} pallas_s"]


def test_kernel_benchmark_trimmed_and_a_failing_kernel_is_a_row(tmp_path, monkeypatch):
    """--batches/--contexts/--ms trim a lease's run; a kernel that raises (as a Triton compile
    error would on a GPU) becomes a row naming the error and the run goes on."""
    from xlaserve.pallas_kernels import paged_attention

    real = paged_attention.decode_attention

    def fails_at_64(q, k, v, *args, **kw):
        if k.shape[1] * k.shape[2] // q.shape[0] == 64:  # context 64
            raise RuntimeError("no Triton for this shape")
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(paged_attention, "decode_attention", fails_at_64)
    argv = ["--smoke", "--out", str(tmp_path), "--batches", "1", "--contexts", "32,64", "--ms", "3"]
    written = kernels.main(argv)
    rows = written["decode_attention"]
    assert [(r["batch"], r["context"], r["kv_cache_dtype"]) for r in rows] == [
        (1, 32, "auto"),
        (1, 64, "auto"),
        (1, 32, "int8"),
        (1, 32, "fp8"),
    ]
    assert rows[1]["error"] == "RuntimeError: no Triton for this shape" and "pallas_s" not in rows[1]
    assert all("error" not in r and r["max_abs_diff_vs_xla"] < 2e-2 for r in rows if r["context"] == 32)
    assert [r["m"] for r in written["quantized_matmul"]] == [3]
