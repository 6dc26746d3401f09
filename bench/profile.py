"""Where a decode step's time goes: one (batch, context) point of `xlaserve bench decode`, traced.

    python -m xlaserve.bench.profile --preset llama3-8b --quant int4 --batch-sizes 1 --context-lengths 512
    python -m xlaserve.bench.profile --model smollm2 --batch-sizes 1 --context-lengths 128 --out DIR

The engine is built as `bench decode` builds it (same flags); after a warm-up, `--steps` back-to-back
decode dispatches run under `jax.profiler.trace`. Written: `<DIR>/<device>-profile-<model>-<date>`
.json and .md, the wall time per step and, per op name on the device's timelines, calls and
microseconds per step, the largest first; and in the folder of that name (not committed, see
.gitignore) the Perfetto trace (`perfetto_trace.json.gz`) and the decode program's optimized HLO
(`decode.hlo.txt`: fusions, copies, loops, custom calls as XLA compiled them). On a GPU the device
timelines are the CUDA streams (kernels, copies); on CPU, XLA's thunks on the host threads.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import shutil
import sys
import time

from xlaserve.bench import decode, ours, report


def device_ops(trace: dict, steps: int) -> tuple[list[dict], float]:
    """Per-name totals of the complete events on device timelines (processes named /device:...;
    on CPU, XLA's threads), per step; and the busy microseconds per step (the sum of those events)."""
    events = trace["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    gpu = {pid for pid, name in procs.items() if name.startswith("/device:")}

    def on_device(e) -> bool:
        if gpu:
            return e.get("pid") in gpu
        # XLA:CPU: the thunks on its own threads, less the thread pool's bookkeeping
        name = e["name"]
        return threads.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLA") and not (
            name.startswith(("end: ", "ThreadpoolListener", "ThunkExecutor"))
        )

    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and on_device(e):
            total[e["name"]] += e.get("dur", 0.0)
            calls[e["name"]] += 1
    rows = [
        {"op": name, "calls_per_step": calls[name] / steps, "us_per_step": us / steps}
        for name, us in total.most_common()
    ]
    return rows, sum(total.values()) / steps


def run(args) -> dict:
    import jax

    from xlaserve.runtime.engine import Engine

    path = report.result_path(args.out, "profile-" + report.slug("-".join(decode.model_name(args))))
    out = path.with_suffix("")  # the trace and the HLO
    out.mkdir(parents=True, exist_ok=True)
    batch, context = args.batch_sizes[0], args.context_lengths[0]
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    model = ours.load(args, dtype, print)
    engine = Engine(model.cfg, model.weights, decode.engine_config(args, dtype), progress=print)
    model.weights = None
    mine = ours.Decoder(engine)
    mine.decode(batch, context, args.warmup)
    (out / "decode.hlo.txt").write_text(engine._decode[(batch, engine.kv_bucket(context))].as_text())
    wall = mine.decode(batch, context, args.steps)  # untraced: the step time without the profiler
    with jax.profiler.trace(out / "trace", create_perfetto_trace=True):
        mine.decode(batch, context, args.steps)
    found = sorted((out / "trace").rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    ops, busy = [], 0.0
    if found:
        ops, busy = device_ops(json.loads(gzip.decompress(found[-1].read_bytes())), args.steps)
        found[-1].rename(out / "perfetto_trace.json.gz")
    shutil.rmtree(out / "trace", ignore_errors=True)  # the raw XSpace: large, and in the trace above
    result = {
        "kind": "profile",
        "command": "python -m xlaserve.bench.profile " + " ".join(sys.argv[1:]),
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "model": model.name,
        "quant": model.quant,
        "batch": batch,
        "context": context,
        "step_ms": wall * 1e3,
        "device_busy_ms_per_step": busy / 1e3,
        "ops": ops[:60],
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"{model.name} ({model.quant}) batch {batch} context {context} on {result['device']}: "
        f"{wall * 1e3:.2f} ms/step, device busy {busy / 1e3:.2f} ms/step",
        "",
        "| op | calls/step | us/step |",
        "|---|---|---|",
    ]
    lines += [f"| {r['op'][:90]} | {r['calls_per_step']:.1f} | {r['us_per_step']:.1f} |" for r in ops[:40]]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    decode.add_arguments(p)
    args = p.parse_args(argv)
    args.steps = min(args.steps, 8)  # a trace of a few steps is enough and stays small
    return run(args)


if __name__ == "__main__":
    main()
