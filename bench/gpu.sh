#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a machine lease (device time is scarce).
# Writes JSON (+ markdown, plots) under ${OUT:-bench/results}; commit them with BENCHMARKS.md.
#
#   bash bench/gpu.sh            # on an H100/H200 with the package installed (pip install -e ".[cuda,test]")
#
# Budget: one call, at most 8 minutes on an H200. The times below are estimates (no device was
# available when the script was sized; each step prints what it took: resize from those). What was
# trimmed to fit: the decode sweep runs batches 1,8,64 at contexts 512,4096 (was 1,8,32,64 at
# 512,2048,8192: 12 configurations, each a decode and a masked-decode program to compile, several
# minutes per quantization), and int8 runs only batch 1,64 at 512 (bf16 and int4 are the two that
# matter for the roofline).
set -euo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
step() { echo "[gpu.sh] $1: ${SECONDS}s elapsed" >&2; }
python - <<'PY'
import jax
print("devices:", jax.devices(), "jax", jax.__version__)
assert jax.default_backend() == "gpu", "bench/gpu.sh is for a GPU machine"
PY
# 1. Every program of the Llama-3-8B int4 engine lowered for cuda (Pallas -> Triton included), with
#    the kernels found in each and the memory plan for this device; no compile (~20 s). A failure
#    is reported in the table and lowered.json, and the run goes on to measure the rest.
xlaserve lower --platforms cuda --preset llama3-8b --quant int4 --out "$out/lowered" \
  || echo "[gpu.sh] some programs failed to lower: see the table above and $out/lowered/lowered.json" >&2
step "lowering table"
# 2. Kernels compiled (interpret off): parity columns beside timings, attention bandwidth (bf16, and
#    int8/fp8 caches at batch 64 x 8192), matmul (~1 min).
python -m xlaserve.bench.kernels --out "$out"
step "kernels"
# 3. Llama-3-8B preset decode sweep in bf16 and int4 (Q4_0 g32), int8 (per channel) at two points
#    (~1.5-2 min each for bf16 and int4, mostly compiling), then against HF transformers' strongest
#    configuration (bf16, static cache, torch.compile; ~2 min).
sweep=(--preset llama3-8b --batch-sizes 1,8,64 --context-lengths 512,4096 --out "$out")
for quant in none int4; do
  xlaserve bench decode "${sweep[@]}" --quant "$quant"
  step "decode sweep $quant"
done
xlaserve bench decode --preset llama3-8b --quant int8 --batch-sizes 1,64 --context-lengths 512 --out "$out"
step "decode int8"
# 3b. An fp8 KV cache where KV bytes dominate a step: int4 weights, batch 64 at 4096 tokens (~1 min);
#     compare with the same point of the int4 sweep above (bench/kernels.py has the kernel's parity).
xlaserve bench decode --preset llama3-8b --quant int4 --kv-cache-dtype fp8 --batch-sizes 64 \
  --context-lengths 4096 --out "$out"
step "decode int4, fp8 KV"
xlaserve bench decode --preset llama3-8b --batch-sizes 1,64 --context-lengths 512,2048 --compare hf --out "$out"
step "decode vs HF (preset)"
# 4. The real model end to end against HF on the same GGUF (~1 min).
xlaserve bench decode --model smollm2 --batch-sizes 1,8,64 --context-lengths 128,512 --compare hf --out "$out"
step "decode vs HF (smollm2)"
python -m xlaserve.bench.report --write-benchmarks-md
