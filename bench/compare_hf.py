"""Decode tok/s and TTFT of xlaserve against HF transformers on the same model, prompts and batch
sizes, in the same run. Runs alternate (ours, HF, ours, HF, ...) and medians are reported, because
a shared machine's speed drifts; the ratio is what to read.

    python -m xlaserve.bench.compare_hf --batch-sizes 1,8 --new-tokens 128 --repeats 3

HF runs `model.generate` (greedy, fp32, its default dynamic KV cache) with min_new_tokens so both
sides produce exactly --new-tokens tokens. TTFT for HF is the time of generate(max_new_tokens=1).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

from xlaserve.bench import hf, report

PROMPTS = [
    "The history of the printing press begins",
    "Explain, step by step, how a hash table handles collisions, and compare open addressing with chaining.",
    'def merge_sort(items):\n    """Return a sorted copy of items."""\n',
    "Write a short letter to a friend describing a walk along the river on an autumn morning, "
    "mentioning the colours of the trees, the sound of the water and the smell of the air.",
]


def batch_prompts(b: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})") for i in range(b)]


def run_ours(llm, prompts, n):
    from xlaserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    ttft = statistics.median(o.timings["ttft_s"] for o in outs)
    # decode rate: tokens after the first, over the time from the last first-token to the end
    return {
        "wall_s": wall,
        "ttft_s": ttft,
        "tokens": sum(len(o.token_ids) for o in outs),
        "decode_tok_s": statistics.median(o.timings["decode_tokens_per_s"] for o in outs),
        "throughput_tok_s": sum(len(o.token_ids) for o in outs) / wall,
    }


def run_hf(model, tokenizer, prompts, n):
    import torch

    enc = hf.left_padded(tokenizer, prompts)
    with torch.no_grad():
        t0 = time.perf_counter()
        hf.greedy(model, tokenizer, enc, 1, exact=False)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = hf.greedy(model, tokenizer, enc, n)
        wall = time.perf_counter() - t0
    produced = (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)
    return {
        "wall_s": wall,
        "ttft_s": ttft,
        "tokens": produced,
        "decode_tok_s": (n - 1) / max(wall - ttft, 1e-9),
        "throughput_tok_s": produced / wall,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=1)
    p.add_argument(
        "--out", default=None, help="JSON path (default: bench/results/<backend>-compare-hf-<date>.json)"
    )
    args = p.parse_args(argv)

    import jax
    import torch
    import transformers

    from xlaserve import LLM
    from xlaserve.checkpoints import registry

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    path = registry.resolve(args.model)
    llm = LLM(str(path), max_slots=max(sizes), decode_steps=args.decode_steps)
    hf_model, hf_tok = hf.load_model(path), hf.load_tokenizer(path)

    rows = []
    for b in sizes:
        prompts = batch_prompts(b)
        run_ours(llm, prompts, 8)  # warm-up (nothing compiles: programs were compiled at start-up)
        run_hf(hf_model, hf_tok, prompts, 8)
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(run_ours(llm, prompts, args.new_tokens))
            theirs.append(run_hf(hf_model, hf_tok, prompts, args.new_tokens))
        med = lambda runs, k: statistics.median(r[k] for r in runs)
        row = {"batch": b, "new_tokens": args.new_tokens}
        for k in ("ttft_s", "decode_tok_s", "throughput_tok_s"):
            row[f"xlaserve_{k}"], row[f"hf_{k}"] = med(ours, k), med(theirs, k)
        row["decode_speedup"] = row["xlaserve_decode_tok_s"] / row["hf_decode_tok_s"]
        row["throughput_speedup"] = row["xlaserve_throughput_tok_s"] / row["hf_throughput_tok_s"]
        row["ttft_speedup"] = row["hf_ttft_s"] / row["xlaserve_ttft_s"]
        rows.append(row)
        print(
            f"batch {b:3d}: decode {row['xlaserve_decode_tok_s']:7.1f} vs HF "
            f"{row['hf_decode_tok_s']:7.1f} tok/s "
            f"({row['decode_speedup']:.2f}x); throughput {row['xlaserve_throughput_tok_s']:7.1f} vs "
            f"{row['hf_throughput_tok_s']:7.1f} tok/s ({row['throughput_speedup']:.2f}x); "
            f"TTFT {row['xlaserve_ttft_s'] * 1e3:6.1f} vs {row['hf_ttft_s'] * 1e3:6.1f} ms",
            flush=True,
        )

    result = {
        "benchmark": "compare_hf",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "model": str(path.name),
        "engine": {
            "dtype": llm.engine_config.dtype,
            "quantized": llm.engine_config.quantized,
            "decode_steps": llm.engine_config.decode_steps,
            "max_slots": llm.engine_config.max_slots,
        },
        "hf": {"dtype": "float32", "generate": "greedy, dynamic cache"},
        "repeats": args.repeats,
        "rows": rows,
    }
    report.write(result, report.result_path(args.out, "compare-hf"))
    return result


if __name__ == "__main__":
    main()
