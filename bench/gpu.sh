#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a machine lease (device time is scarce).
# Writes JSON (+ markdown, plots) and one log per step under ${RESULTS:-bench/results}; commit them,
# then regenerate BENCHMARKS.md (python -m xlaserve.bench.report --write-benchmarks-md).
#
#   bash bench/gpu.sh                        # an H100/H200 with the package installed (pip install -e ".[cuda]")
#   GPU_BUDGET_S=520 GPU_ARCHIVE=/out/r.tgz bash bench/gpu.sh   # a lease: stop in time, archive after each step
#
# The steps run in order of what a lease must not lose: the kernels compiled with parity against the
# XLA paths (never run on a GPU before), the lowering table, then the Llama-3-8B preset decode in int4
# and bf16, then the comparisons. Each step has its own time limit and runs only if it fits in what is
# left of GPU_BUDGET_S; a failing step is logged and the next one runs. Without the `xlaserve` command
# on PATH (a bare machine with the package on PYTHONPATH) `python3 -m xlaserve.cli` stands in;
# GPU_SKIP="kernels lower" leaves out the steps named.
#
# On the H200 lease of 2026-12-04 (jax 0.11.2, the image's Python 3.12 with this checkout on PYTHONPATH
# and the wheels of gguf and llguidance, which the image lacks): env 2 s, kernels 130 s, lower 16 s,
# decode int4 39 s and bf16 48 s (programs compiled side by side), fp8 KV 25 s, int8 22 s, each
# profile ~25 s. decode-vs-hf died with SIGSEGV after 181 s, once torch.compile's CUDA graphs ran in
# the process beside JAX (not yet diagnosed). smollm2-vs-hf needs the GGUF (98 MB) in the model
# cache, more than a lease carries (64 MiB).
set -uo pipefail
out=${RESULTS:-bench/results}
budget=${GPU_BUDGET_S:-1800}
mkdir -p "$out/logs"
if command -v xlaserve >/dev/null; then xs=(xlaserve); else xs=(python3 -m xlaserve.cli); fi

# step NAME LIMIT_S CMD...: run CMD under LIMIT_S if that fits in the budget left; log to $out/logs.
step() {
  local name=$1 limit=$2 left=$((budget - SECONDS))
  shift 2
  if [[ " ${GPU_SKIP:-} " == *" $name "* ]]; then return; fi
  if ((left < limit)); then
    echo "[gpu.sh] $name: skipped, ${left}s of the budget left, it takes up to ${limit}s" | tee -a "$out/logs/steps.txt" >&2
    return
  fi
  echo "[gpu.sh] $name: start at ${SECONDS}s" >&2
  local t0=$SECONDS rc=0
  timeout -k 10 "$limit" "$@" >"$out/logs/$name.log" 2>&1 || rc=$?
  echo "[gpu.sh] $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$out/logs/steps.txt" >&2
  tail -n 25 "$out/logs/$name.log" >&2
  if [[ -n ${GPU_ARCHIVE:-} ]]; then tar czf "$GPU_ARCHIVE" -C "$(dirname "$out")" "$(basename "$out")"; fi
}

step env 60 python3 -c '
import jax, sys
print("python", sys.version.split()[0], "jax", jax.__version__, "devices", jax.devices())
assert jax.default_backend() == "gpu", "bench/gpu.sh is for a GPU machine"
import xlaserve.runtime.engine, xlaserve.pallas_kernels.paged_attention, xlaserve.pallas_kernels.quantized_matmul
print("imports ok")'
nvidia-smi >"$out/logs/nvidia-smi.txt" 2>&1 || true
# 1. Kernels compiled (interpret off): parity columns beside timings; attention K/V bandwidth (bf16,
#    int8/fp8 caches at the largest batch), quantized matmul on Llama-3-8B projection shapes. A kernel
#    that fails is a row with its error.
step kernels 180 python3 -m xlaserve.bench.kernels --out "$out" --repeats 10 \
  --batches 1,8,64 --contexts 512,4096,32768 --ms 1,8,64,2048
# 2. Every program of the Llama-3-8B int4 engine lowered for cuda (Pallas -> Triton), the kernels
#    found in each and the memory plan for this device; no compile.
step lower 60 "${xs[@]}" lower --platforms cuda --preset llama3-8b --quant int4 --out "$out/lowered"
# 3. Llama-3-8B preset decode (random weights, the real shapes) in int4 (Q4_0 g32) and bf16; if the
#    Pallas paths fail, the same in XLA alone so the run still has a figure.
sweep=(--preset llama3-8b --batch-sizes 1,8,64 --context-lengths 512,4096 --prompt-lengths 512 --repeats 3
  --out "$out")
step decode-int4 150 "${xs[@]}" bench decode "${sweep[@]}" --quant int4
if grep -q "rc=[^0]" <(grep decode-int4 "$out/logs/steps.txt"); then
  step decode-int4-xla 120 "${xs[@]}" bench decode "${sweep[@]}" --quant int4 --attention-impl xla --matmul-impl xla
fi
step decode-bf16 120 "${xs[@]}" bench decode "${sweep[@]}" --quant none
# 3b. Where a step's time goes at batch 1: kernels and copies per step from the CUDA streams, and the
#     decode program's optimized HLO beside them (~25 s each).
for quant in int4 none; do
  step "profile-$quant" 60 python3 -m xlaserve.bench.profile --preset llama3-8b --quant "$quant" \
    --batch-sizes 1 --context-lengths 512 --prompt-lengths 512 --out "$out"
done
# 4. Where the budget allows: an fp8 KV cache where K/V bytes dominate; int8 weights; HF transformers'
#    strongest configuration (bf16, static cache, torch.compile) on the same shapes.
step decode-int4-fp8kv 90 "${xs[@]}" bench decode --preset llama3-8b --quant int4 --kv-cache-dtype fp8 \
  --batch-sizes 64 --context-lengths 4096 --repeats 3 --out "$out"
step decode-int8 90 "${xs[@]}" bench decode --preset llama3-8b --quant int8 --batch-sizes 1,64 \
  --context-lengths 512 --repeats 3 --out "$out"
step decode-vs-hf 240 "${xs[@]}" bench decode --preset llama3-8b --batch-sizes 1,64 --context-lengths 512 \
  --compare hf --out "$out"
# 5. The real model end to end against HF on the same GGUF (needs the model in the model cache).
step smollm2-vs-hf 120 "${xs[@]}" bench decode --model smollm2 --batch-sizes 1,8,64 --context-lengths 128,512 \
  --compare hf --out "$out"
echo "[gpu.sh] done at ${SECONDS}s" >&2
