"""`xlaserve lower`: every program the engine would compile on a platform, lowered on this machine
(no device of that platform needed), with the kernels that platform runs.

    xlaserve lower --platforms cuda,tpu --preset llama3-8b --quant int4 --mesh tp=2 --out lowered/
    xlaserve lower --platforms cuda --model smollm2 --device-memory 141GiB --out lowered/

Writes OUT/<platform>/<program>.mlir (StableHLO) and OUT/lowered.json, prints the memory plan for
the target (with --device-memory, or when the target is this machine's backend) and a table:
program, platform, Pallas kernels found, bytes of weights and KV per step. Exits 1 when any
program failed to lower (each failure is in the table), 2 on bad input. A preset's weights are
never allocated: their shapes come from the family's declarations. A tp mesh runs on simulated CPU
devices (made here when JAX has not started yet)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from xlaserve.cli.common import Progress, _int_tuple

QUANT = {"int8": "q8_0", "int4": "q4_0"}


def _bytes(text: str) -> int:
    from xlaserve.runtime.memory import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub) -> None:
    p = sub.add_parser(
        "lower",
        help="lower every engine program for cuda/tpu here (no device needed): StableHLO, kernels, a table",
    )
    p.add_argument(
        "--platforms", default="cuda,tpu", help="comma-separated: cpu, cuda, rocm, tpu (default: %(default)s)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model", help="alias, .gguf file, HF or xlaserve checkpoint directory (default: smollm2)"
    )
    src.add_argument(
        "--preset", help="a model's shapes without its weights (runtime/models/presets.py: llama3-8b, ...)"
    )
    p.add_argument(
        "--quant",
        help="presets: none (default), int8, int4, q8_0, q4_0, q4_1; checkpoints: native (default) or none",
    )
    p.add_argument("--mesh", help="tp=N: the programs of a model sharded over N devices")
    p.add_argument("--out", required=True, help="directory for the StableHLO files and lowered.json")
    p.add_argument(
        "--device-memory", type=_bytes, help="memory per device of the target to plan for (e.g. 141GiB)"
    )
    p.add_argument(
        "--memory-fraction", type=float, help="share of device memory the engine may plan to use (0.9)"
    )
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 (float32 for cpu)"
    )
    p.add_argument(
        "--kv-cache-dtype", choices=["auto", "int8", "fp8"], help="K/V cache storage (fp8: cuda/tpu only)"
    )
    p.add_argument("--max-slots", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--page-size", type=int)
    p.add_argument("--decode-steps", type=int)
    p.add_argument("--prefill-buckets", type=_int_tuple, help="e.g. 32,128,512")
    p.add_argument("--kv-buckets", type=_int_tuple, help="decode KV lengths compiled (default: 64, 256, ...)")
    p.add_argument(
        "--slot-buckets", type=_int_tuple, help="decode batch sizes compiled (default: 1, max_slots)"
    )
    p.add_argument(
        "--num-speculative-tokens",
        dest="speculative_k",
        type=_int_tuple,
        help="verify programs' guess counts, e.g. 4",
    )
    p.add_argument(
        "--no-scoring", dest="scoring", action="store_false", help="leave out the scoring programs"
    )
    p.add_argument("--attention-impl", choices=["auto", "pallas", "xla"], help="auto: Pallas on cuda/tpu")
    p.add_argument("--matmul-impl", choices=["auto", "pallas", "xla"], help="auto: Pallas on cuda/tpu")
    p.set_defaults(func=cmd_lower)


def _simulated_devices(tp: int) -> None:
    """Ask for tp host devices before JAX starts its CPU backend (lowering needs a mesh, not the
    target's devices)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if tp > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={tp}".strip()


def _weights(args, dtype: str, progress):
    """(name, ModelConfig, weights, quantization label): a preset's abstract weights or a checkpoint."""
    from xlaserve.runtime import lower
    from xlaserve.runtime.models.presets import PRESETS

    if args.preset is not None:
        if args.preset not in PRESETS:
            raise ValueError(
                f"--preset {args.preset!r} is not a preset; allowed: {', '.join(sorted(PRESETS))}"
            )
        quant = QUANT.get(args.quant, args.quant or "none")
        if quant not in ("none", "q8_0", "q4_0", "q4_1"):
            raise ValueError(
                f"--quant {args.quant!r} for a preset; allowed: none, int8, int4, q8_0, q4_0, q4_1"
            )
        cfg = PRESETS[args.preset]
        return args.preset, cfg, lower.preset_weights(cfg, quant, dtype), quant
    from xlaserve.checkpoints import registry
    from xlaserve.checkpoints.load import load_model

    quant = args.quant or "native"
    if quant not in ("native", "none"):
        raise ValueError(
            f"--quant {quant!r} for a checkpoint; allowed: native (as stored) or none (dequantized)"
        )
    path = registry.resolve(args.model or registry.DEFAULT_MODEL, log=progress)
    loaded = load_model(path, dequantize=quant == "none", dtype=dtype)
    return path.name, loaded.config, loaded.weights, loaded.quantization if quant == "native" else "none"


def cmd_lower(args) -> int:
    from xlaserve.runtime import lower
    from xlaserve.sharding.mesh import parse_mesh

    platforms = lower.parse_platforms(args.platforms)
    spec = parse_mesh(args.mesh)
    if spec.dp > 1:
        raise ValueError(
            f"--mesh {args.mesh}: lower one model replica; give tp=N (dp replicas run the same programs)"
        )
    _simulated_devices(spec.tp)
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from xlaserve.runtime import memory
    from xlaserve.runtime.config import EngineConfig
    from xlaserve.runtime.layout import Layout

    progress = Progress()
    mesh = None
    if spec.tp > 1:
        cpus = jax.devices("cpu")
        if len(cpus) < spec.tp:
            raise ValueError(
                f"--mesh tp={spec.tp} needs {spec.tp} CPU devices, {len(cpus)} exist: set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={spec.tp} before JAX starts"
            )
        mesh = Mesh(np.array(cpus[: spec.tp]), ("tp",))
    dtype = args.dtype or ("float32" if platforms == ("cpu",) else "bfloat16")
    name, cfg, weights, quant = _weights(args, dtype, progress)
    fields = ("max_slots", "max_model_len", "page_size", "decode_steps", "prefill_buckets", "kv_buckets")
    fields += ("slot_buckets", "attention_impl", "matmul_impl", "memory_fraction", "device_memory")
    fields += ("kv_cache_dtype", "speculative_k")
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    engine_cfg = EngineConfig(**given, dtype=dtype, scoring=args.scoring, compile_cache="")
    out, rows, plans = Path(args.out), [], {}
    for platform in platforms:
        backend = lower.PLATFORMS[platform]
        device = None
        if args.device_memory:
            device = (args.device_memory, "--device-memory")
        elif backend == jax.default_backend():  # this machine's devices of the target's kind
            device = memory.device_memory(jax.devices()[: spec.tp], backend)
        layout = Layout.build(cfg, weights, engine_cfg, backend=backend, mesh=mesh, device=device)
        plan = (
            layout.plan.describe() if layout.plan else "no memory plan (give --device-memory for the target)"
        )
        kv = layout.ecfg.kv_cache_dtype
        label = layout.ecfg.dtype + (f", KV {kv}" if kv != "auto" else "")
        progress(f"{platform}: {name} ({quant}, {label}) tp={spec.tp}; {plan}")
        plans[platform] = plan
        rows += lower.lower_all(layout, platform, out, progress)
    failed = [r for r in rows if r.error]
    progress.done(f"lowered {len(rows) - len(failed)} of {len(rows)} programs into {out}")
    summary = dict(
        model=name, quant=quant, mesh=f"tp={spec.tp}", dtype=dtype, plans=plans, jax=jax.__version__
    )
    (out / "lowered.json").write_text(
        json.dumps(summary | {"programs": [r.as_dict() for r in rows]}, indent=1)
    )
    print(f"{name} ({quant}), tp={spec.tp}, jax {jax.__version__}")
    for platform, plan in plans.items():
        print(f"{platform}: {plan}")
    print(lower.table(rows))
    if failed:
        print(f"{len(failed)} program(s) failed to lower", file=sys.stderr)
    return 1 if failed else 0
