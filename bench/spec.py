"""Speculative decoding (n-gram guesses, a draft model's, or a trained draft head's) on vs off, side
by side in one run, on one engine:

    python -m xlaserve.bench.spec [--batches 1,8,32] [--max-tokens 128]
    python -m xlaserve.bench.spec --model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --batches 1
    python -m xlaserve.bench.spec --draft-head DIR --batches 1   # xlaserve train-draft --out DIR

For each batch size and prompt kind (copy: "repeat this text verbatim"; edit: "rename variable x
to y and output the whole function"; chat: open questions), the same greedy requests run
- off: every request opts out (`SamplingParams(speculative=False)`): plain, pipelined decoding;
- on: the engine's default policy (K by batch size, switch-off below break-even; spec_policy.py);
- forced: the same engine with its schedule set to K at every batch size and a break-even of 1
  token (`speculative_schedule=((max batch, K, 1.0),)`), so every greedy sequence guesses every
  step (what the policy protects against);
and the figures are output tok/s (all requests' tokens / wall time), the acceptance rate (guesses
kept / made) and the mean accepted length (tokens a guessing sequence emitted per verify step),
and whether the tokens equal the off run's. The modes take turns going first, so drift in a shared
machine's speed hits them alike; the load average is recorded before and after. Tok/s counts the
prompts' prefill too (no prefix cache: each mode prefills its own).

It also times one verify step (K guesses) against one decode step at each batch size on idle
slots (same bucket of KV): the cost ratio that spec_policy.VERIFY_COST stands for at batch 1; with a
draft model or head, also one propose call (K guesses a row), which its verify step costs on top.
With a head, the engine's decode and verify programs also return the target's features (all modes,
"off" included: an engine is built once).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time

import numpy as np

from xlaserve.bench import report

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil "
    "and a rag. He trimmed the wick, polished the brass, and wound the clockwork that turned the "
    "great lens. Ships passing the reef at night saw the beam sweep the water every ten seconds."
)
FUNCTION = '''def moving_average(x, window):
    """Average of each run of `window` values of x."""
    out = []
    total = 0.0
    for i in range(len(x)):
        total += x[i]
        if i >= window:
            total -= x[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
CHAT = [
    "What are three good habits for learning a new language?",
    "Explain why the sky is blue to a ten-year-old.",
    "Give me some ideas for a weekend trip near the mountains.",
    "What is the difference between a list and a tuple in Python?",
]


def prompts(kind: str, n: int) -> list[list[dict]]:
    """n chat prompts of one kind (varied so batch rows differ)."""
    out = []
    for i in range(n):
        if kind == "copy":
            text = f"({i + 1}) " + TEXT
            msg = f"Repeat this text verbatim, with nothing before or after it:\n\n{text}"
        elif kind == "edit":
            src = FUNCTION.replace("moving_average", f"moving_average_{i}")
            msg = f"Here is a function. Rename the variable x to y and output the whole function.\n\n{src}"
        else:
            msg = CHAT[i % len(CHAT)] + ("" if i < len(CHAT) else f" (answer {i // len(CHAT) + 1})")
        out.append([{"role": "user", "content": msg}])
    return out


def run(llm, reqs, params, mode: str) -> dict:
    before = llm.stats()
    t0 = time.perf_counter()
    outs = llm.generate(reqs, params, chat=True)
    seconds = time.perf_counter() - t0
    after = llm.stats()
    n = sum(len(o.token_ids) for o in outs)
    made = after.speculative_proposed - before.speculative_proposed
    kept = after.speculative_accepted - before.speculative_accepted
    hist = np.subtract(after.speculative_emitted, before.speculative_emitted)
    steps = int(hist.sum())
    return {
        "mode": mode,
        "tokens": n,
        "seconds": seconds,
        "tok_s": n / seconds,
        "proposed": made,
        "accepted": kept,
        "acceptance": kept / made if made else None,
        "mean_accepted_length": float((hist * np.arange(len(hist))).sum() / steps) if steps else None,
        "verify_steps": steps,
        "token_ids": [o.token_ids for o in outs],
    }


def step_costs(llm, batches, k: int, repeats: int = 7) -> list[dict]:
    """Median seconds of a decode and a verify step (k guesses, all rows guessing) on idle slots."""
    import jax

    from xlaserve.runtime.spec_runner import DraftProposer, EagleProposer

    engine, table, proposer = llm.engine, llm.runner.scheduler.page_table, llm.runner.spec.proposer
    kv, slots = engine.ecfg.kv_buckets[0], engine.ecfg.max_slots
    proposed = np.zeros((slots, k), np.int32)
    n = np.full((slots,), k, np.int32)
    window, zeros = np.ones((slots, 2), np.int32), np.zeros((slots,), np.int32)  # 2: draft.WINDOW
    rows = []
    for b in batches:
        timed = {}
        calls = [
            ("decode", lambda b=b: jax.block_until_ready(engine.decode(table, kv, b))),
            ("verify", lambda b=b: engine.verify(table, kv, proposed, n, b)),
        ]
        if isinstance(proposer, DraftProposer):  # every row: one window token at position 0, then k - 1 steps
            calls.append(("propose", lambda b=b: llm.draft.propose(table, kv, window, zeros, n // k, n, b)))
        elif isinstance(proposer, EagleProposer):  # one call for the batch's slot bucket (b: one)
            calls.append(("propose", lambda b=b: proposer.propose_all(np.zeros((b,), np.int32))))
        for name, call in calls:
            call()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            timed[name] = statistics.median(times)
        rows.append({"batch": b, "decode_s": timed["decode"], "verify_s": timed["verify"],
                     "ratio": timed["verify"] / timed["decode"]})  # fmt: skip
        if "propose" in timed:
            rows[-1] |= {"propose_s": timed["propose"], "draft_ratio": (timed["verify"] + timed["propose"])
                         / timed["decode"]}  # fmt: skip
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--kinds", default="copy,edit,chat")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="guesses per step (speculative_k)")
    p.add_argument("--draft-model", default=None, help="guess with this draft model (default: n-gram lookup)")
    p.add_argument(
        "--draft-head", default=None, help="guess with this trained draft head (xlaserve train-draft)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each mode per cell, taking turns (a shared machine's speed drifts by 10-30%%); "
        "the cell keeps each mode's median run by tok/s and lists every run's",
    )
    p.add_argument("--out", default=None)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)

    import jax

    from xlaserve import LLM, SamplingParams

    batches = [int(b) for b in args.batches.split(",")]
    load = [os.getloadavg()]
    slots = max(batches)
    llm = LLM(
        args.model,
        max_slots=slots,
        slot_buckets=tuple(sorted(set(batches))),
        max_model_len=512,
        prefill_buckets=(128, 512),
        kv_buckets=(256, 512),
        scoring=False,
        prefix_cache=False,  # each mode prefills its prompts itself
        speculative={"method": "ngram", "num_speculative_tokens": args.k}
        | ({"method": "draft", "model": args.draft_model} if args.draft_model else {})
        | ({"method": "eagle", "head": args.draft_head} if args.draft_head else {}),
    )
    engine, policy = llm.engine, llm.engine.ecfg
    forced = dataclasses.replace(policy, speculative_schedule=((slots, args.k, 1.0),))
    costs = step_costs(llm, batches, args.k)
    print(json.dumps({"step_costs": costs}), flush=True)
    greedy = dict(temperature=0.0, max_tokens=args.max_tokens)
    cells = []
    for b in batches:
        for kind in args.kinds.split(","):
            reqs = prompts(kind, b)
            llm.generate(reqs[:1], SamplingParams(temperature=0.0, max_tokens=4), chat=True)  # warm up
            cell = {"batch": b, "kind": kind, "modes": {}}
            modes = ("off", "on", "forced")
            runs = {mode: [] for mode in modes}
            for r in range(args.repeats):
                turn = (len(cells) + r) % 3
                for mode in modes[turn:] + modes[:turn]:  # each goes first in turn
                    engine.ecfg = forced if mode == "forced" else policy
                    params = SamplingParams(**greedy, speculative=mode != "off")
                    runs[mode].append(run(llm, reqs, params, mode))
            engine.ecfg = policy
            ref = runs["off"][0]["token_ids"]
            for mode, done in runs.items():
                same = all(m.pop("token_ids") == ref for m in done)
                cell["modes"][mode] = sorted(done, key=lambda m: m["tok_s"])[len(done) // 2]
                cell["modes"][mode] |= {"identical": same, "tok_s_runs": [m["tok_s"] for m in done]}
            cell["speedup_on"] = cell["modes"]["on"]["tok_s"] / cell["modes"]["off"]["tok_s"]
            cell["speedup_forced"] = cell["modes"]["forced"]["tok_s"] / cell["modes"]["off"]["tok_s"]
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    load.append(os.getloadavg())
    result = {
        "kind": "spec",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": report.device_info(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": load},
        "versions": {"jax": jax.__version__},
        "model": args.model,
        "draft_model": args.draft_model,
        "draft_head": args.draft_head,
        "k": args.k,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "policy": {"schedule": policy.speculative_schedule},
        "step_costs": costs,
        "cells": cells,
        "command": report.command_line("python -m xlaserve.bench.spec", add_arguments, args),
    }
    name = f"spec-{report.slug(args.model)}" + (
        f"-draft-{report.slug(args.draft_model)}" if args.draft_model else "-eagle" if args.draft_head else ""
    )
    report.write(result, report.result_path(args.out, name), markdown(result))
    return result


def markdown(r: dict) -> str:
    f = report.fmt
    proposer = f"draft model {r['draft_model']}" if r.get("draft_model") else "n-gram"
    proposer = f"draft head {r['draft_head']}" if r.get("draft_head") else proposer
    lines = [
        f"# Speculative decoding ({proposer}, K={r['k']}): {r['model']}, "
        f"{r['max_tokens']} greedy tokens a request",
        "",
        f"{r['date']}; {r['device']['kind']} ({r['machine']['cpus']} CPUs); load average before "
        f"{', '.join(f(x, 2) for x in r['machine']['loadavg'][0])}, after "
        f"{', '.join(f(x, 2) for x in r['machine']['loadavg'][1])}. `{r['command']}`",
        "",
        f"Policy (on): schedule {r['policy']['schedule']} (most sequences, K, break-even tokens a step). "
        "forced: every greedy sequence guesses every step."
        + (
            f" Each mode ran {r['repeats']} times a cell, taking turns; tok/s is its median run."
            if r.get("repeats", 1) > 1
            else ""
        ),
        "",
        "| batch | prompts | off tok/s | on tok/s | forced tok/s | on / off | forced / off "
        "| acceptance (forced) | mean accepted length (forced) | same tokens (on, forced) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r["cells"]:
        m = c["modes"]
        lines.append(
            f"| {c['batch']} | {c['kind']} | {f(m['off']['tok_s'])} | {f(m['on']['tok_s'])} | "
            f"{f(m['forced']['tok_s'])} | {f(c['speedup_on'])} | {f(c['speedup_forced'])} | "
            f"{f(m['on']['acceptance'])} ({f(m['forced']['acceptance'])}) | "
            f"{f(m['on']['mean_accepted_length'])} ({f(m['forced']['mean_accepted_length'])}) | "
            f"{m['on']['identical']}, {m['forced']['identical']} |"
        )
    draft = "propose_s" in r["step_costs"][0]
    lines += ["", "One step on idle slots (median of 7), K guesses a row:", "",
              "| batch | decode ms | verify ms | verify / decode |"
              + (" draft propose ms | (verify + propose) / decode |" if draft else ""),
              "|---|---|---|---|" + ("---|---|" if draft else "")]  # fmt: skip
    for s in r["step_costs"]:
        lines.append(
            f"| {s['batch']} | {f(1e3 * s['decode_s'])} | {f(1e3 * s['verify_s'])} | {f(s['ratio'])} |"
            + (f" {f(1e3 * s['propose_s'])} | {f(s['draft_ratio'])} |" if draft else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
