"""`xlaserve train-draft --model M --data FILE --out DIR`: train an EAGLE-style draft head for M by
self-distillation, measure it, save it.

1. The target answers every prompt in FILE greedily, and each training prompt --samples more times
   sampled at --temperature (`LLM.generate`); a share of the prompts (--holdout) is kept out of
   training and answered greedily only.
2. Its features over prompt + answer are the data (runtime/draft_train.py).
3. The head trains with optax AdamW for --steps steps of --batch chains of --k steps.
4. With --eval (the default), the mean guesses accepted per verify step on the held-out prompts'
   generated text, the head's k-step chains against n-gram prompt lookup's k guesses at the same
   positions (runtime/draft_eval.py).
5. The head and a manifest naming the target are saved to DIR with orbax (checkpoints/draft_head.py).

FILE is a text file with one prompt per line (blank lines and lines starting with "#" are skipped),
or, when its name ends in .jsonl, one JSON object per line with a "prompt" string. Prompts are chat
messages (the model's chat template is applied) unless --no-chat. Default: the packaged
data/draft_prompts.txt (a few dozen chat and code prompts, written for SmolLM2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from xlaserve.cli.common import Progress, add_engine_args, engine_kwargs
from xlaserve.data import DRAFT_PROMPTS


def read_prompts(path: Path) -> list[str]:
    """The prompts of a .txt (one a line) or .jsonl ({"prompt": ...} a line) file."""
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or (path.suffix != ".jsonl" and line.startswith("#")):
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--data {path}:{n}: not JSON ({e})") from None
            prompt = item.get("prompt") if isinstance(item, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f'--data {path}:{n}: each line needs a non-empty "prompt" string')
            line = prompt
        prompts.append(line)
    if len(prompts) < 2:
        raise ValueError(
            f"--data {path}: {len(prompts)} prompt(s); at least 2 are needed (train and hold out)"
        )
    return prompts


def split(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) prompt indices: round(n * holdout) held out, at least 1 and at most n - 1."""
    import numpy as np

    if not 0 < holdout < 1:
        raise ValueError(f"--holdout {holdout} must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    held = min(max(1, round(n * holdout)), n - 1)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def generate(llm, prompts: list[str], train_idx: list[int], args, status):
    """The target's answers: every prompt greedily (sequence i: prompt i), then each training prompt
    `--samples` more times sampled at `--temperature` (more text from the same prompts; the held-out
    prompts are answered greedily only, as speculation decodes). Returns (prompt + answer token ids,
    prompt lengths, the sequences to train on)."""
    from xlaserve.runtime.sampling_params import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    sampled = [
        SamplingParams(
            temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed + j * 1000 + i
        )
        for j in range(args.samples)
        for i in train_idx
    ]
    which = list(range(len(prompts))) + [i for _ in range(args.samples) for i in train_idx]
    inputs = [[{"role": "user", "content": prompts[i]}] if args.chat else prompts[i] for i in which]
    status(
        f"generating up to {args.max_tokens} tokens for {len(prompts)} prompts, greedily, and "
        f"{args.samples} sampled answers to each of the {len(train_idx)} training prompts"
    )
    outs = llm.generate(inputs, [greedy] * len(prompts) + sampled, chat=args.chat)
    train_rows = sorted(train_idx) + list(range(len(prompts), len(outs)))
    return (
        [o.prompt_token_ids + o.token_ids for o in outs],
        [len(o.prompt_token_ids) for o in outs],
        train_rows,
    )


def cmd_train_draft(args) -> int:
    from xlaserve.checkpoints import draft_head as head_files
    from xlaserve.llm import LLM
    from xlaserve.runtime import draft_eval, draft_train

    settings = draft_train.TrainSettings(
        k=args.k,
        window=args.window,
        steps=args.steps,
        lr=args.lr,
        batch=args.batch,
        ce_weight=args.ce_weight,
        seed=args.seed,
    )
    settings.check()
    if args.samples < 0 or not 0 < args.temperature <= 2:
        raise ValueError(
            f"--samples {args.samples} must be >= 0 and --temperature {args.temperature} in (0, 2]"
        )
    if args.max_tokens < settings.k + 2:
        raise ValueError(f"--max-tokens {args.max_tokens} must be at least k + 2 = {settings.k + 2}")
    if args.out.exists() and not args.force:
        raise ValueError(f"--out {args.out} exists (pass --force to replace it)")
    prompts = read_prompts(args.data)
    train_idx, held_idx = split(len(prompts), args.holdout, args.seed)
    status = Progress()
    # train-draft only generates: no scoring programs to compile
    llm = LLM(args.model, progress=status, **{**engine_kwargs(args), "scoring": False})
    cfg, target = llm.config, llm.engine.weights
    sequences, prompt_lengths, train_rows = generate(llm, prompts, train_idx, args, status)
    corpus = draft_train.build_corpus(target, cfg, sequences, prompt_lengths, status)
    every = args.log_every or max(1, settings.steps // 20)

    def progress(step: int, m) -> None:
        if step % every == 0 or step == settings.steps:
            status(
                f"step {step}/{settings.steps}: loss {m[0]:.4f} (smooth-L1 {m[1]:.4f}, "
                f"cross-entropy {m[2]:.3f}), top-1 agreement {m[3]:.3f}"
            )

    tokens = int(corpus.lengths[train_rows].sum())
    status(f"training on {len(train_rows)} answers to {len(train_idx)} prompts ({tokens} tokens)")
    head, final = draft_train.train(target, cfg, corpus.subset(train_rows), settings, progress=progress)
    summary = {
        "source": llm.model_path,
        "settings": dataclasses.asdict(settings),
        "data": {
            "file": str(args.data),
            "chat": args.chat,
            "max_tokens": args.max_tokens,
            "samples": args.samples,
            "temperature": args.temperature,
            "train_prompts": len(train_idx),
            "heldout_prompts": len(held_idx),
            "train_tokens": tokens,
            "heldout_tokens": int(corpus.lengths[held_idx].sum()),
        },
        "feature_scale": corpus.scale,
        "final": dict(zip(("loss", "smooth_l1", "cross_entropy", "top1"), map(float, final), strict=True)),
    }
    if args.eval:
        status("measuring acceptance on the held-out prompts")
        acc = draft_eval.acceptance(head, target, cfg, corpus.subset(held_idx), settings.k, settings.window)
        summary["acceptance"] = acc.as_dict()
    head_files.save(args.out, head, head_files.fingerprint(cfg, target), summary, force=args.force)
    status.done(f"wrote {args.out}")
    if args.eval:
        print(acc.describe())
    if args.output == "json":
        print(json.dumps({"out": str(args.out), **summary}))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train-draft",
        help="train an EAGLE-style draft head for a model on text it generates itself",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_engine_args(p)
    p.add_argument("--data", type=Path, default=DRAFT_PROMPTS, help="prompts: .txt one a line, or .jsonl")
    p.add_argument("--out", type=Path, required=True, help="directory to write the head to")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="prompts are plain text, not chat")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated per answer (default 256)")
    p.add_argument(
        "--samples", type=int, default=4, help="sampled answers per training prompt, beside the greedy one"
    )
    p.add_argument("--temperature", type=float, default=0.8, help="temperature of the sampled answers")
    p.add_argument("--k", type=int, default=4, help="chain length: guesses per proposal (default 4)")
    p.add_argument("--window", type=int, default=1, help="context positions the head attends to (default 1)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--batch", type=int, default=32, help="chains per training step (default 32)")
    p.add_argument("--ce-weight", type=float, default=0.1, help="weight of the cross-entropy (default 0.1)")
    p.add_argument("--holdout", type=float, default=0.15, help="share of prompts kept out for --eval")
    p.add_argument("--seed", type=int, default=0, help="initialisation, batches and the hold-out split")
    p.add_argument("--log-every", type=int, help="progress every N steps (default: 20 lines in all)")
    p.add_argument(
        "--eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure acceptance against n-gram lookup on the held-out prompts",
    )
    p.add_argument("--output", choices=("text", "json"), default="text", help="also print a JSON summary")
    p.set_defaults(func=cmd_train_draft)
