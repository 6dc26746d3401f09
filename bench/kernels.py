"""Our Pallas kernels against the XLA paths and the hardware, in one run (GPU or TPU; `--smoke` on
CPU). On TPU it runs the Mosaic kernels (`pallas_kernels/tpu_*.py`), elsewhere the Triton ones.

    python -m xlaserve.bench.kernels           # H100/H200/TPU: bench/results/<device>-kernels-<date>.json
    python -m xlaserve.bench.kernels --smoke   # tiny shapes, interpret mode: checks the script runs

- copy bandwidth: a large device-to-device copy (read + write bytes / time; `bench/roofline.py`'s),
  the yardstick;
- decode attention over the paged cache, Llama-3-8B heads (8 kv heads x 4 queries, head_dim 128,
  bf16, page 16), batch {1, 8, 32, 64} x context {512, 2k, 8k, 32k}: achieved K/V bytes read / time
  for the Pallas kernel and for the XLA path, and the kernel as % of copy bandwidth;
- quantized matmul on Llama-3-8B projection shapes at M {1, 8, 16, 64, 256, 2048}: the Pallas
  kernel (int8 per channel, Q4_0 and Q4_1 groups of 32) beside a bf16 dense dot and XLA's
  dequantize-then-dot of the same quantized weights; speed-ups over bf16 dense.

End-to-end decode with int8/int4 weights is `xlaserve bench decode --preset llama3-8b --quant ...`.
Every timing is the median of `--repeats` runs after a warm-up, each ended by block_until_ready.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.bench import report
from xlaserve.bench.roofline import copy_bandwidth

FULL = dict(
    copy_mib=1024,
    batches=(1, 8, 32, 64),
    contexts=(512, 2048, 8192, 32768),
    heads=(8, 4, 128),  # kv heads, queries per kv head, head_dim (Llama-3-8B)
    page=16,
    ms=(1, 8, 16, 64, 256, 2048),
    shapes={
        "wq/wo 4096x4096": (4096, 4096),
        "w_up 14336x4096": (14336, 4096),
        "w_down 4096x14336": (4096, 14336),
    },
)
SMOKE = dict(
    copy_mib=8,
    batches=(1, 2),
    contexts=(32, 64),
    heads=(2, 3, 64),
    page=8,
    ms=(1, 20),
    shapes={"tiny 64x128": (64, 128)},
)


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of fn(*args) after one warm-up call (which also compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_rows(cfg: dict, repeats: int, interpret: bool, copy_bw: float, tpu: bool = False) -> list[dict]:
    from xlaserve.pallas_kernels import paged_attention, tpu_attention
    from xlaserve.runtime.attention import KV_FORMATS, NO_WINDOW, KVCache, quantize_kv
    from xlaserve.runtime.attention import paged_attention as xla_attention

    h, g, d = cfg["heads"]
    page, dtype = cfg["page"], jnp.bfloat16
    rows = []
    key = jax.random.key(0)
    points = [(b, ctx, "auto") for b in cfg["batches"] for ctx in cfg["contexts"]]
    if not tpu:  # an 8-bit cache (the Mosaic kernels take float K/V only) at one long-context point
        points += [(cfg["batches"][-1], cfg["contexts"][-2], kv) for kv in KV_FORMATS]
    for b, ctx, kv in points:
        width = ctx // page  # pages per sequence; each sequence its own pages
        pages = b * width
        k1, k2, k3, key = jax.random.split(key, 4)
        k = jax.random.normal(k1, (1, pages, page, h, d), dtype)
        v = jax.random.normal(k2, (1, pages, page, h, d), dtype)
        q = jax.random.normal(k3, (b, h, g, d), dtype)
        table = jnp.arange(pages, dtype=jnp.int32).reshape(b, width)
        lengths = jnp.full((b,), ctx, jnp.int32)
        if tpu:  # Mosaic: tiles of up to 128 tokens, no split-K (one core walks the grid)
            tile = next(t for t in (8, 4, 2, 1) if width % t == 0 and t * page <= 128)
            splits = 1
            kernel = functools.partial(tpu_attention.decode_attention, pages_per_tile=tile)
        else:
            tile = 4 if width % 4 == 0 else 1
            splits = max(1, min(16, (width // tile) // 8))
            kernel = functools.partial(paged_attention.decode_attention, pages_per_tile=tile, splits=splits)
        scales = ()
        if kv != "auto":  # stored 8-bit values and a float32 scale per token and head
            (k, ks), (v, vs) = (quantize_kv(x, KV_FORMATS[kv][0]) for x in (k, v))
            scales = (ks, vs)
        pallas = jax.jit(
            lambda q, k, v, lengths, table, *sc, f=kernel: f(
                q, k, v, 0, NO_WINDOW, lengths, table, *sc, interpret=interpret
            )
        )
        block = min(ctx, 512 if not interpret else ctx)
        xla = jax.jit(
            lambda q, k, v, lengths, table, *sc, blk=block: xla_attention(
                q[:, None], KVCache(k, v, *sc), 0, table, (lengths - 1)[:, None], lengths, block=blk
            )[:, 0]
        )
        kv_bytes = sum(x.nbytes for x in (k, v, *scales))
        args = (q, k, v, lengths, table, *scales)
        try:  # a kernel that fails to compile or run is a row with its error; the rest still run
            outs = [fn(*args).astype(jnp.float32) for fn in (pallas, xla)]
            diff = float(jnp.abs(outs[0] - outs[1]).max())  # parity, compiled (bf16 inputs)
            t_pallas = timed(pallas, *args, repeats=repeats)
            t_xla = timed(xla, *args, repeats=repeats)
        except Exception as e:  # recorded in the row, not hidden
            error = f"{type(e).__name__}: {e}"[:2000]
            rows.append({"batch": b, "context": ctx, "kv_cache_dtype": kv, "error": error})
            print(json.dumps(rows[-1]), flush=True)
            continue
        rows.append(
            {
                "batch": b,
                "context": ctx,
                "kv_cache_dtype": kv,
                "splits": splits,
                "max_abs_diff_vs_xla": diff,
                "kv_bytes": kv_bytes,
                "pallas_s": t_pallas,
                "xla_s": t_xla,
                "pallas_bytes_per_s": kv_bytes / t_pallas,
                "xla_bytes_per_s": kv_bytes / t_xla,
                "pallas_pct_copy_bw": 100 * kv_bytes / t_pallas / copy_bw,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def matmul_rows(cfg: dict, repeats: int, interpret: bool, tpu: bool = False) -> list[dict]:
    from xlaserve.pallas_kernels import tpu_matmul
    from xlaserve.pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference

    matmul = tpu_matmul.quantized_matmul if tpu else quantized_matmul
    from xlaserve.runtime.quant import linear, quantize

    rng = np.random.default_rng(0)
    rows = []
    for name, (n, k) in cfg["shapes"].items():
        w = (rng.standard_normal((n, k), np.float32) * k**-0.5).astype(np.float32)
        dense = jnp.asarray(w, jnp.bfloat16)
        quants = {
            "int8": quantize(w, "q8_0", k, np.float32),
            "q4_0 g32": quantize(w, "q4_0", 32),
            "q4_1 g32": quantize(w, "q4_1", 32),
        }
        quants = {q: jax.tree.map(jnp.asarray, qa) for q, qa in quants.items()}
        del w
        for m in cfg["ms"]:
            x = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
            t_dense = timed(
                jax.jit(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32)),
                x,
                dense,
                repeats=repeats,
            )
            row = {"shape": name, "m": m, "bf16_dense_s": t_dense}
            for q, qa in quants.items():
                kernel = jax.jit(lambda x, w: matmul(x, *w.arrays, **w.layout, interpret=interpret))
                try:  # as in attention_rows: an error is recorded in the row
                    want = quantized_matmul_reference(x, *qa.arrays, **qa.layout)
                    rel = float(jnp.abs(kernel(x, qa) - want).max() / (jnp.abs(want).max() + 1e-30))
                    t_kernel = timed(kernel, x, qa, repeats=repeats)
                    t_xla = timed(jax.jit(lambda x, w: linear(x, w)), x, qa, repeats=repeats)
                except Exception as e:
                    row[f"{q} error"] = f"{type(e).__name__}: {e}"[:2000]
                    continue
                row |= {
                    f"{q} max_rel_err_vs_reference": rel,
                    f"{q} pallas_s": t_kernel,
                    f"{q} xla_dequant_dot_s": t_xla,
                    f"{q} speedup_vs_bf16": t_dense / t_kernel,
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (interpret mode on CPU): does it run")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 20; smoke 1)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    for name in ("batches", "contexts", "ms"):  # trims a machine lease: e.g. --contexts 512,8192
        ap.add_argument(f"--{name}", type=lambda t: tuple(int(x) for x in t.split(",")), help="measured")
    args = ap.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    cfg |= {n: getattr(args, n) for n in ("batches", "contexts", "ms") if getattr(args, n)}
    repeats = args.repeats or (1 if args.smoke else 20)
    dev = report.device_info()
    interpret, tpu = dev["platform"] == "cpu", dev["platform"] == "tpu"
    copy_bw = copy_bandwidth(cfg["copy_mib"] * 2**20, repeats=max(repeats, 3))
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s", flush=True)
    result = {
        "kind": "kernels",
        "command": "python -m xlaserve.bench.kernels " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "device": dev,
        "jax_version": jax.__version__,
        "interpret": interpret,
        "kernels": "mosaic" if tpu else "triton",
        "smoke": args.smoke,
        "copy_bandwidth_Bps": copy_bw,
        "decode_attention": attention_rows(cfg, repeats, interpret, copy_bw, tpu),
        "quantized_matmul": matmul_rows(cfg, repeats, interpret, tpu),
    }
    report.write(result, report.result_path(args.out, "kernels-smoke" if args.smoke else "kernels"))
    return result


if __name__ == "__main__":
    main()
