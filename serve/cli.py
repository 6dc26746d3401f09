"""The `xlaserve` command line: pull, generate."""

from __future__ import annotations

import argparse
import json
import sys
import time

from xlaserve import __version__
from xlaserve.checkpoints import registry


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per message otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.tty, self.t0, self.n = stream, stream.isatty(), time.perf_counter(), 0

    def __call__(self, msg: str) -> None:
        self.n += 1
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {msg}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, msg: str) -> None:
        self(msg)
        if self.tty:
            self.stream.write("\n")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=registry.DEFAULT_MODEL,
        help="alias (smollm2), a .gguf file or an HF directory (default: %(default)s)",
    )
    g.add_argument("--max-slots", type=int, help="concurrent sequences (decode batch)")
    g.add_argument("--max-model-len", type=int, help="longest prompt + output, in tokens")
    g.add_argument("--page-size", type=int, help="tokens per KV page")
    g.add_argument("--decode-steps", type=int, help="decode steps per dispatch")
    g.add_argument("--prefill-buckets", type=_int_tuple, help="padded prompt-chunk lengths, e.g. 32,128,512")
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16 elsewhere",
    )
    g.add_argument(
        "--quantized",
        action=argparse.BooleanOptionalAction,
        help="keep GGUF-quantized weights quantized (default) or dequantize them at load",
    )
    g.add_argument("--compile-cache", help="JAX compilation cache directory ('' turns it off)")


def engine_kwargs(args) -> dict:
    keys = (
        "max_slots",
        "max_model_len",
        "page_size",
        "decode_steps",
        "prefill_buckets",
        "dtype",
        "quantized",
        "compile_cache",
    )
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def sampling_from_args(args):
    from xlaserve.runtime.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )


def cmd_pull(args) -> int:
    print(registry.pull(args.alias))
    return 0


def _json_output(llm, prompt, out) -> dict:
    tok = llm.tokenizer
    lp = None
    if out.logprobs is not None:
        lp = [
            {
                "token_id": x.token_id,
                "token": tok.token_text(x.token_id),
                "logprob": x.logprob,
                "top": [{"token_id": t, "token": tok.token_text(t), "logprob": v} for t, v in x.top],
            }
            for x in out.logprobs
        ]
    return {
        "prompt": prompt,
        "text": out.text,
        "token_ids": out.token_ids,
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,
        "logprobs": lp,
        "usage": {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids)},
        "timings": out.timings,
    }


class OrderedStream:
    """Streams prompt 0's text as it arrives; later prompts are buffered until every earlier one has
    been printed, so outputs never interleave while all prompts run batched."""

    def __init__(self, n: int, out=sys.stdout):
        self.n, self.out, self.head = n, out, 0
        self.buffers: list[list[str]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.started = [False] * n

    def __call__(self, i: int, delta) -> None:
        self.buffers[i].append(delta.text)
        self.done[i] = self.done[i] or delta.request.finished
        while self.head < self.n:
            h = self.head
            if not self.started[h]:
                self.started[h] = True
                if self.n > 1:
                    self.out.write(f"{chr(10) if h else ''}--- [{h + 1}/{self.n}] ---\n")
            self.out.write("".join(self.buffers[h]))
            self.buffers[h].clear()
            if not self.done[h]:
                break
            self.head += 1
        self.out.flush()


def cmd_generate(args) -> int:
    from xlaserve.runtime.llm import LLM

    prompts = list(args.prompt)
    if not prompts or prompts == ["-"]:
        if sys.stdin.isatty():
            raise ValueError("give at least one PROMPT (or '-' to read one from stdin)")
        prompts = [sys.stdin.read()]
    params = sampling_from_args(args)
    progress = Progress()
    llm = LLM(args.model, progress=progress, **engine_kwargs(args))
    compile_s = sum(llm.engine.compile_seconds.values())
    progress.done(
        f"ready: {llm.config.name} ({llm.quantization}, {llm.engine_config.dtype}); "
        f"load {llm.load_seconds:.1f}s, compile {compile_s:.1f}s"
    )
    inputs = [[{"role": "user", "content": p}] for p in prompts] if args.chat else prompts
    if args.output == "json":
        outs = llm.generate(inputs, params, chat=args.chat)
        for prompt, out in zip(prompts, outs, strict=True):
            print(json.dumps(_json_output(llm, prompt, out), ensure_ascii=False))
    else:
        llm.generate(inputs, params, chat=args.chat, on_delta=OrderedStream(len(prompts)))
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlaserve", description="JAX/XLA-compiled LLM inference")
    parser.add_argument("--version", action="version", version=f"xlaserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log compile and engine details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch a model into the model cache")
    p.add_argument("alias", nargs="?", default=registry.DEFAULT_MODEL, choices=sorted(registry.ALIASES))
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="generate text for one or more prompts (streams as it goes)")
    p.add_argument("prompt", nargs="*", help="prompt text; '-' or none reads one prompt from stdin")
    p.add_argument(
        "--chat", action="store_true", help="wrap each prompt as a user message in the chat template"
    )
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, help="return log-probs with N alternatives (json output)")
    p.add_argument("--output", choices=["text", "json"], default="text")
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv=None) -> int:
    import logging

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("xlaserve").setLevel(logging.INFO if args.verbose else logging.WARNING)
    from xlaserve.checkpoints.base import CheckpointError

    try:
        return args.func(args)
    except (ValueError, CheckpointError, registry.PullError) as e:
        print(f"xlaserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
