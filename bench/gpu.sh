#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a machine lease (device time is scarce).
# Writes JSON (+ markdown, plots) under ${OUT:-bench/results}; commit them with BENCHMARKS.md.
#
#   bash bench/gpu.sh            # on an H100/H200 with the package installed (pip install -e ".[cuda,test]")
set -euo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
python - <<'PY'
import jax
print("devices:", jax.devices(), "jax", jax.__version__)
assert jax.default_backend() == "gpu", "bench/gpu.sh is for a GPU machine"
PY
# 1. Kernels compiled (interpret off): parity columns beside timings, attention bandwidth, matmul.
python -m xlaserve.bench.kernels --out "$out"
# 2. Llama-3-8B preset decode sweep in bf16, int8 (per channel) and int4 (Q4_0 g32), then against
#    HF transformers' strongest configuration (bf16, static cache, torch.compile).
sweep=(--preset llama3-8b --batch-sizes 1,8,32,64 --context-lengths 512,2048,8192 --out "$out")
for quant in none int8 int4; do
  xlaserve bench decode "${sweep[@]}" --quant "$quant"
done
xlaserve bench decode --preset llama3-8b --batch-sizes 1,64 --context-lengths 512,2048 --compare hf --out "$out"
# 3. The real model end to end against HF on the same GGUF.
xlaserve bench decode --model smollm2 --batch-sizes 1,8,64 --context-lengths 128,512 --compare hf --out "$out"
python -m xlaserve.bench.report --write-benchmarks-md
