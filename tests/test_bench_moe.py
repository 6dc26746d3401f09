"""bench/moe.py end to end at its smoke size (E=8, k=2, one timed call per figure) on 8 simulated
devices, in a process of its own (its devices must be set before JAX starts): every formulation and
path agrees with the dense reference, the rows are the ones the benchmark promises, and it writes its
JSON and markdown where --out says."""

from __future__ import annotations

import json
import sys

import background
import pytest

from xlaserve.bench import moe

SMOKE = background.Job(
    lambda folder: [sys.executable, "-m", "xlaserve.bench.moe", "--smoke", "--out", str(folder)],
    fixture="smoke",
    timeout=900,
)


@pytest.fixture
def smoke():
    """The benchmark's run and its --out folder (run in the background: tests/background.py)."""
    return SMOKE.result(), SMOKE.folder


def test_moe_benchmark_smoke(smoke):
    run, out = smoke
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = out.glob("cpu-moe-smoke-*.json")
    assert path.with_suffix(".md").is_file()
    result = json.loads(path.read_text())
    assert result["kind"] == "moe" and result["smoke"] and result["device"]["count"] >= moe.DEVICES
    assert result["command"] == "python -m xlaserve.bench.moe --smoke"
    c = moe.SMOKE
    assert result["config"]["experts"] == c.num_experts and result["config"]["top_k"] == c.num_experts_per_tok

    rows = result["expert_parallel"]
    cells = [(r["mesh"], r["batch"], r["formulation"]) for r in rows]
    forms = (*moe.FORMULATIONS, "ragged_all_to_all")
    assert cells == [(m, b, f) for m in moe.MESHES for b in moe.SMOKE_BATCHES for f in forms]
    for r in rows:
        ep, tp = moe.MESHES[r["mesh"]]
        assert r["bytes_sent_per_device"] == moe.exchange_bytes(r["tokens"], ep, tp, c)[r["formulation"]]
        if r["formulation"] == "ragged_all_to_all":  # not on XLA:CPU: bytes only
            assert r["seconds"] is None and "not implemented" in r["note"]
        else:
            assert r["seconds"] > 0 and r["max_abs_err"] < 1e-5, r

    paths = result["expert_paths"]
    assert [(r["tokens"], r["path"]) for r in paths] == [
        (n, p) for n in moe.SMOKE_TOKENS for p in moe.moe.IMPLS
    ]
    for n in moe.SMOKE_TOKENS:
        mine = [r for r in paths if r["tokens"] == n]
        (picked,) = [r["path"] for r in mine if r["picked"]]
        assert picked == moe.moe.pick(n * c.num_experts_per_tok, c.num_experts, "cpu")
        for r in mine:
            assert r["seconds"] > 0 and r["max_abs_err"] < 1e-5
            assert r["bytes_read"] <= r["bytes_dense"] and r["bytes_read_bound"] <= r["bytes_dense"]
    assert {r["path"] for r in paths if r["picked"]} == {"gathered", "dense"}  # 2 and 8 pairs of 8 experts
