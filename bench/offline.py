"""Offline batch serving: output tok/s for many prompts of mixed lengths at several slot counts,
beside HF transformers' batched `generate` on the same prompts in the same run; and, with and
without prefix caching, prefill tokens and TTFT of a shared-system-prompt workload and of chats
whose every turn resends the conversation so far (at 8 slots, or the first slot count).

    python -m xlaserve.bench.offline --num-prompts 256 --slots 1,8,32,64 --max-tokens 32

HF runs the prompts in batches of the same size as our slot count (left-padded, greedy, fp32,
exactly --max-tokens new tokens each); we run them through the slot manager, which refills a slot
as soon as its sequence ends. Prompt lengths are drawn (seeded) between 8 and 96 words.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import numpy as np

from xlaserve.bench import hf, report

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be or had not "
    "but one all their they has have when who will more no if out so said what up its about into than them "
    "can only other new some time could these two may then first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should "
    "river mountain engine market letter winter garden harbor signal lantern copper meadow thunder"
).split()


def prompts(n: int, seed: int = 0, lo: int = 8, hi: int = 96) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1)))) for _ in range(n)]


def ours(llm, texts, max_tokens: int) -> dict:
    from xlaserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(texts, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall}


def run_hf(model, tokenizer, texts, max_tokens: int, batch: int) -> dict:
    import torch

    tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = hf.left_padded(tokenizer, texts[i : i + batch])
            out = hf.greedy(model, tokenizer, enc, max_tokens)
            tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall}


def shared_prefix_ttft(llm, n: int, cache: bool) -> dict:
    from xlaserve import SamplingParams

    system = "You are a meticulous assistant. Follow these rules. " + " ".join(
        prompts(1, seed=99, lo=300, hi=300)
    )
    texts = [f"{system}\nQuestion {i}: {' '.join(prompts(1, seed=1000 + i, lo=6, hi=12))}?" for i in range(n)]
    llm.runner.scheduler.prefix_cache = cache
    before = llm.stats().prefill_tokens_computed
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    ttft = sorted(o.timings["ttft_s"] for o in outs)
    llm.runner.scheduler.prefix_cache = True
    return {
        "prefix_cache": cache,
        "requests": n,
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
        "prefill_tokens_computed": llm.stats().prefill_tokens_computed - before,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
    }


def chat_turns(llm, n: int, turns: int, cache: bool, outputs: list | None = None) -> dict:
    """n chats of `turns` user messages each; a turn's prompt is its chat so far, the model's
    answers included, so every turn after the first starts with what the last one cached (up to its
    answer's last token; the chat template's end-of-turn tokens follow). `outputs`: a list that
    takes each turn's outputs."""
    from xlaserve import SamplingParams

    chats = [[{"role": "user", "content": prompts(1, seed=2000 + i, lo=10, hi=30)[0]}] for i in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm.runner.scheduler.prefix_cache = cache
    before, prompt_tokens, later = llm.stats().prefill_tokens_computed, 0, []
    for turn in range(turns):
        outs = llm.generate(chats, params, chat=True)
        outputs is not None and outputs.append(outs)
        prompt_tokens += sum(len(o.prompt_token_ids) for o in outs)
        later += [o.timings["ttft_s"] for o in outs] if turn else []
        for i, (chat, out) in enumerate(zip(chats, outs, strict=True)):
            ask = prompts(1, seed=3000 + 100 * turn + i, lo=4, hi=12)[0]
            chat += [{"role": "assistant", "content": out.text}, {"role": "user", "content": ask}]
    llm.runner.scheduler.prefix_cache = True
    return {
        "prefix_cache": cache,
        "chats": n,
        "turns": turns,
        "prompt_tokens": prompt_tokens,
        "prefill_tokens_computed": llm.stats().prefill_tokens_computed - before,
        "later_turns_ttft_p50_s": statistics.median(later),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--slots", default="1,8,32,64")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--shared-requests", type=int, default=32)
    p.add_argument("--chats", type=int, default=16)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-throughput", action="store_true", help="only the prefix-cache workloads")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax
    import torch

    from xlaserve import LLM
    from xlaserve.checkpoints import registry

    path = registry.resolve(args.model)
    texts = prompts(args.num_prompts)
    hf_model = hf_tok = None
    if not args.skip_hf and not args.skip_throughput:
        hf_model, hf_tok = hf.load_model(path), hf.load_tokenizer(path)
    rows, shared, chats = [], [], []
    slot_counts = [int(s) for s in args.slots.split(",")]
    for slots in slot_counts:
        # Prompts here are under 160 tokens + outputs (chats: under 300): 12 pages a slot is plenty.
        llm = LLM(str(path), max_slots=slots, max_model_len=512, num_pages=max(12 * slots, 32))
        if not args.skip_throughput:
            row = {"slots": slots, "xlaserve": ours(llm, texts, args.max_tokens)}
            if hf_model is not None:
                row["hf"] = run_hf(hf_model, hf_tok, texts, args.max_tokens, slots)
                row["speedup"] = row["xlaserve"]["output_tok_s"] / row["hf"]["output_tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        if slots == (8 if 8 in slot_counts else slot_counts[0]):
            if args.shared_requests:
                shared = [shared_prefix_ttft(llm, args.shared_requests, cache) for cache in (False, True)]
            if args.chats:
                chats = [chat_turns(llm, args.chats, args.turns, cache) for cache in (False, True)]
            for s in shared + chats:
                print(json.dumps(s), flush=True)
        del llm

    result = {
        "benchmark": "offline",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "model": path.name,
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "prompt_words": "8-96, seeded",
        "throughput": rows,
        "shared_prefix_ttft": shared,
        "chat_turns": chats,
    }
    report.write(result, report.result_path(args.out, "offline"))
    return result


if __name__ == "__main__":
    main()
