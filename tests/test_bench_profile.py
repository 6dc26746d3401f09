"""bench/profile.py traces decode steps and tells where their time goes (on CPU here: XLA's thunks;
on a GPU the CUDA streams' kernels and copies, as its H200 run in bench/results shows)."""

from __future__ import annotations

import gzip
import json

from xlaserve.bench import profile


def test_profile_of_a_tiny_preset(tmp_path):
    argv = ["--preset", "tiny", "--quant", "int4", "--batch-sizes", "1", "--context-lengths", "64"]
    result = profile.main([*argv, "--prompt-lengths", "64", "--out", str(tmp_path)])
    path = next(tmp_path.glob("cpu-profile-tiny-int4-*.json"))
    written, folder = json.loads(path.read_text()), path.with_suffix("")
    assert written == json.loads(json.dumps(result)) and written["batch"] == 1 and written["step_ms"] > 0
    ops = {r["op"]: r for r in written["ops"]}
    assert ops and written["device_busy_ms_per_step"] > 0
    # every per-layer op runs once per layer and step: tiny has 2 layers
    assert any(r["calls_per_step"] == 2.0 for r in ops.values()), ops
    assert "while" in (folder / "decode.hlo.txt").read_text()  # the layers' scan, as compiled
    trace = json.loads(gzip.decompress((folder / "perfetto_trace.json.gz").read_bytes()))
    assert trace["traceEvents"]
    assert "| op | calls/step | us/step |" in path.with_suffix(".md").read_text()
