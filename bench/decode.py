"""`xlaserve bench decode`: how close compiled decode and prefill come to the device's roofline.

    xlaserve bench decode --model smollm2 --batch-sizes 1,8,32 --context-lengths 128,512 --compare hf
    xlaserve bench decode --preset llama3-8b --batch-sizes 1,8,32,64 --context-lengths 512,2048,8192

A real model (`--model`: alias, .gguf or HF directory) or a preset (`--preset`: random weights with a
real model's shapes) is built into one engine holding a decode program for every (batch, context)
and a prefill program per prompt length. Then, in order:

- copy bandwidth: the best of several passes of dst = src + 1 over large arrays, (bytes read +
  written) / time: what a memory-bound program can reach on this device, measured first;
- prefill: TTFT of one prompt of each length (its chunks through `Engine.prefill`, then the first
  token on the host) and its useful FLOP/s, 2 x matmul params x tokens + causal attention, against
  the datasheet peak;
- decode: the compiled decode program driven directly (`Engine.decode`, not the scheduler) with
  `batch` active slots whose sequences reach exactly `context` tokens at the last timed step.
  Reported: step time (median over rounds of `--steps` back-to-back dispatches), tok/s =
  batch / step time, and bytes/s = (weight bytes + KV bytes a step reads) / step time, as % of the
  measured copy bandwidth and of the datasheet. A step reads every weight once (an untied
  embedding table only at the batch's rows) and the K/V of `context` tokens per sequence (the XLA
  path attends densely over the KV bucket; the Pallas kernels stop at each sequence's length, so
  there the figure is an upper bound by at most `steps` tokens).

The KV cache keeps its initial zeros: a step's time does not depend on the values, while prefilling
batch x context tokens first would dominate a CPU run.

`--compare llamacpp` runs llama.cpp on the same GGUF (bench/llamacpp.py: llama-bench for a prompt,
llama-batched-bench for batch x context decode), alternating with ours in the same way.

`--compare hf` runs HF transformers (bench/hf.py) on the same GGUF (loaded as bench/compare_hf.py
loads it; for a preset, a LlamaForCausalLM of the same shapes with random weights, built on the
device) with the same prompt token ids and the same (batch, context) steps, alternating with ours
round by round (ours, HF, ours, HF, ...); medians are reported. HF's TTFT is a forward over the
prompt with logits_to_keep=1; its decode step is a forward of one token per sequence over a KV cache
holding context - steps tokens, then argmax. On CUDA HF gets its strongest configuration (bf16,
static cache, torch.compile mode="reduce-overhead"); elsewhere fp32 with its default dynamic cache,
as in compare_hf.py.

This file holds the flags, the run and its record. The model under test and our engine's driver
are in bench/ours.py, HF's in bench/hf.py; the datasheet, copy bandwidth and FLOP/byte accounting
in bench/roofline.py; the presets' shapes in runtime/models/presets.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

from xlaserve.bench import ours, report
from xlaserve.bench.ours import QUANT_ALIASES
from xlaserve.bench.roofline import copy_bandwidth, datasheet, peak_memory, prefill_flops, step_bytes
from xlaserve.runtime.attention import token_bytes
from xlaserve.runtime.config import EngineConfig
from xlaserve.runtime.models.presets import PRESETS


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="alias, .gguf file or HF directory (default: smollm2)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="random weights with this model's shapes")
    p.add_argument(
        "--quant",
        choices=["native", "none", "q8_0", "q4_0", "q4_1", *QUANT_ALIASES],
        help="checkpoints: native (as stored, default) or none (dequantized); presets: none (dense, "
        "default) or q8_0/int8, q4_0/int4, q4_1",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: f32 CPU, bf16 else")
    p.add_argument("--batch-sizes", type=ints, default=[1, 8, 32])
    p.add_argument("--context-lengths", type=ints, default=[128, 512], help="KV tokens per sequence")
    p.add_argument("--prompt-lengths", type=ints, help="prefill lengths (default: the context lengths)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="longest prefill program (chunk)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per round")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps per configuration")
    p.add_argument("--repeats", type=int, default=3, help="rounds per configuration (median)")
    p.add_argument("--copy-mib", type=int, help="copy-bandwidth array size (default 1024; CPU 256)")
    p.add_argument(
        "--compare",
        choices=["hf", "llamacpp"],
        help="also run HF transformers, or llama.cpp on the same GGUF (bench/llamacpp.py), alternately",
    )
    p.add_argument("--mesh", help="tp=N: shard the model over N devices")
    p.add_argument("--attention-impl", choices=["auto", "pallas", "xla", "native"], default="auto")
    p.add_argument("--matmul-impl", choices=["auto", "pallas", "xla", "native"], default="auto")
    p.add_argument("--compile-cache", default="", help="JAX compilation cache ('' = off: true compile times)")
    p.add_argument("--memory-fraction", type=float, help="share of device memory to plan for (0.9)")
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "int8", "fp8"],
        default="auto",
        help="K/V cache storage (fp8: GPU/TPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(report.RESULTS), help="output directory (default: bench/results)")


def command_line(args) -> str:
    """The command with the options that differ from their defaults."""
    return report.command_line(
        "xlaserve bench decode", add_arguments, args, skip=("model",) if args.preset else ()
    )


def model_name(args) -> list[str]:
    """The parts of a result's file name that name the model: the preset or checkpoint, and a
    preset's quantization."""
    return [args.preset or Path(args.model).stem] + (
        [args.quant] if args.preset and args.quant not in (None, "none") else []
    )


def engine_config(args, dtype: str) -> EngineConfig:
    """One engine holding a decode program per (batch, context) and a prefill program per prompt
    length (up to --prefill-chunk)."""
    contexts, batches = args.context_lengths, args.batch_sizes
    prompts = args.prompt_lengths or contexts
    longest = -(-max(*contexts, *prompts) // 16) * 16  # whole pages
    return EngineConfig(
        max_slots=max(batches),
        slot_buckets=tuple(batches),
        kv_buckets=tuple(contexts),
        max_model_len=longest,
        attn_block=next(b for b in (256, 128, 64, 32, 16) if longest % b == 0),
        prefill_buckets=tuple(sorted({min(n, args.prefill_chunk) for n in prompts})),
        scoring=False,
        dtype=dtype,
        attention_impl=args.attention_impl,
        matmul_impl=args.matmul_impl,
        memory_fraction=args.memory_fraction,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def run(args) -> dict:
    """Measure, print the markdown report and write the result (JSON, markdown, plots)."""
    import jax

    from xlaserve.bench import hf, llamacpp
    from xlaserve.runtime.engine import Engine
    from xlaserve.runtime.models.params import weight_bytes
    from xlaserve.sharding.mesh import device_groups, parse_mesh

    if args.compare == "llamacpp":
        if args.preset:
            raise SystemExit("--compare llamacpp runs the same GGUF: give --model, not --preset")
        llamacpp.binary("llama-batched-bench")  # built? (else: the command that builds it)
    contexts, batches = args.context_lengths, args.batch_sizes
    prompts = args.prompt_lengths or contexts
    if any(c % 16 or c <= max(args.steps, args.warmup) for c in contexts):
        raise ValueError(f"context lengths must be multiples of 16 above --steps ({args.steps}) and --warmup")
    if args.compile_cache:
        from xlaserve.llm import enable_compile_cache

        enable_compile_cache(args.compile_cache)
    else:
        jax.config.update("jax_compilation_cache_dir", None)
    backend, device = jax.default_backend(), jax.devices()[0]
    load_start = os.getloadavg()[0]  # other work on the machine skews CPU figures: recorded
    spec = parse_mesh(args.mesh)
    if spec.dp > 1:
        raise ValueError("bench decode measures one model replica: give --mesh tp=N")
    mesh = device_groups(spec)[0] if spec.devices > 1 else None
    devices = list(mesh.devices.flat) if mesh is not None else [device]
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")

    copy_bytes = (args.copy_mib or (256 if backend == "cpu" else 1024)) << 20
    log(f"copy bandwidth over {copy_bytes >> 20} MiB ...")
    copy_bw = copy_bandwidth(copy_bytes) * len(devices)  # every device copies at the same rate
    sheet = datasheet(device.device_kind)
    log(f"loading {args.preset or args.model}")
    model = ours.load(args, dtype, log)
    engine = Engine(model.cfg, model.weights, engine_config(args, dtype), mesh=mesh, progress=log)
    model.weights = None  # the engine holds its own (device) copy
    mine = ours.Decoder(engine)
    tokens = {n: ours.prompt_tokens(model, n, args.seed) for n in prompts}
    configs = [(b, c) for c in contexts for b in batches]
    log("warm-up")
    for n in prompts:
        mine.ttft(tokens[n])
    for b, c in configs:
        mine.decode(b, c, args.warmup)
    peak, peak_source = peak_memory(devices)  # before the reference shares the process
    ref = None
    if args.compare == "llamacpp":
        if model.path is None or model.path.suffix != ".gguf":
            raise SystemExit(f"--compare llamacpp runs the same GGUF; {model.name} is not one")
        ref = llamacpp.Decoder(model.path)
    if args.compare == "hf":
        log("building HF Llama, same shapes" if args.preset else "loading HF transformers on the same file")
        ref = hf.Decoder(model.path, model.cfg if args.preset else None)
    if ref is not None:
        for n in prompts:
            ref.ttft(tokens[n])
        for b, c in configs:
            ref.decode(b, c, args.warmup)

    def alternate(fn_ours, fn_ref):
        a, r = [], []
        for _ in range(args.repeats):
            a.append(fn_ours())
            if ref is not None:
                r.append(fn_ref())
        return statistics.median(a), (statistics.median(r) if r else None), a

    peak_flops = (sheet or {}).get("flops", {}).get(dtype)
    prefill, decode, cmp_prefill, cmp_decode = [], [], [], []
    for n in prompts:
        t, t_ref, _ = alternate(lambda n=n: mine.ttft(tokens[n]), lambda n=n: ref.ttft(tokens[n]))
        flops = prefill_flops(model.cfg, n)
        pct_peak = 100 * flops / t / (peak_flops * len(devices)) if peak_flops else None
        prefill.append(dict(prompt_len=n, ttft_s=t, flops=flops, flops_per_s=flops / t, pct_peak=pct_peak))
        log(f"prefill {n:6d} tokens: TTFT {t * 1e3:8.1f} ms" + (f" (HF {t_ref * 1e3:.1f} ms)" if ref else ""))
        if ref is not None:
            cmp_prefill.append(dict(prompt_len=n, xlaserve_ttft_s=t, ref_ttft_s=t_ref, speedup=t_ref / t))
    for b, c in configs:
        t, t_ref, rounds = alternate(
            lambda b=b, c=c: mine.decode(b, c, args.steps), lambda b=b, c=c: ref.decode(b, c, args.steps)
        )
        w, kv = step_bytes(model.cfg, engine.weights, token_bytes(engine.cache), b, c)
        row = dict(batch=b, context=c, step_s=t, step_s_rounds=rounds, tok_s=b / t)
        row.update(weight_bytes_per_step=w, kv_bytes_per_step=kv, bytes_per_step=w + kv)
        row.update(bytes_per_s=(w + kv) / t, pct_copy_bw=100 * (w + kv) / t / copy_bw)
        row["pct_datasheet"] = 100 * (w + kv) / t / (sheet["bandwidth_Bps"] * len(devices)) if sheet else None
        decode.append(row)
        log(
            f"decode batch {b:4d} context {c:6d}: {t * 1e3:8.2f} ms/step {b / t:9.1f} tok/s "
            f"{row['pct_copy_bw']:5.1f}% of copy BW" + (f" (HF {b / t_ref:.1f} tok/s)" if ref else "")
        )
        if ref is not None:
            cmp_decode.append(
                dict(batch=b, context=c, xlaserve_step_s=t, ref_step_s=t_ref, xlaserve_tok_s=b / t)
                | dict(ref_tok_s=b / t_ref, speedup=t_ref / t)
            )

    notes = []
    if model.tokenizer is None:
        notes.append(f"preset {args.preset}: random weights with its shapes, quantization {model.quant}.")
    if sheet is None:
        notes.append(f"no datasheet figures for {device.device_kind}: % of datasheet and of peak are null.")
    if ref is not None and peak_source.startswith("process"):
        notes.append("peak memory was read before the reference was loaded into the same process.")
    result = {
        "kind": "decode",
        "device": device.device_kind,
        "backend": backend,
        "num_devices": len(devices),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        },
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(args),
        "model": model.name,
        "preset": args.preset,
        "dtype": dtype,
        "quant": model.quant,
        "param_count": model.cfg.param_count(),
        "engine": {
            "attention": engine.ecfg.attention_impl,
            "matmul": engine.ecfg.matmul_impl,
            "kv_cache_dtype": engine.ecfg.kv_cache_dtype,
        },
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "copy_bandwidth_Bps": copy_bw,
        "datasheet": sheet,
        "compile_s": dict(engine.compile_seconds),
        "compile_cache": jax.config.jax_compilation_cache_dir,
        "prefill": prefill,
        "decode": decode,
        "weight_bytes": weight_bytes(engine.weights),
        "kv_cache_bytes": weight_bytes(engine.cache),
        "peak_memory_bytes": peak,
        "peak_memory_source": peak_source,
        "compare": {"reference": ref.describe, "prefill": cmp_prefill, "decode": cmp_decode} if ref else None,
        "notes": notes,
    }
    # one file per configuration: gpu.sh runs several of one preset on one day
    name = model_name(args)
    name += [f"kv-{args.kv_cache_dtype}"] if args.kv_cache_dtype != "auto" else []
    name += [f"vs-{args.compare}"] if args.compare else []
    path = report.result_path(args.out, "decode-" + report.slug("-".join(name)))
    images = {t: p.name for t, p in report.plot_names(path).items()}
    md = report.render(result, images)
    print(md)
    report.write(result, path, md)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
