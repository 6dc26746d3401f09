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
