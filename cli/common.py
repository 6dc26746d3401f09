"""What several commands share: the engine flags and their `LLM` keyword arguments, the progress
line on stderr, reading key/certificate files, and joining a multi-host job (join_cluster, follow)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from xlaserve.checkpoints import registry

log = logging.getLogger("xlaserve")


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per message otherwise."""

    def __init__(self, stream=None):
        stream = stream or sys.stderr
        self.stream, self.tty, self.t0, self.n = stream, stream.isatty(), time.perf_counter(), 0
        self.closed = False

    def __call__(self, msg: str) -> None:
        if self.closed:  # the command's output follows: a status line would land inside it
            log.info(msg)
            return
        self.n += 1
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {msg}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, msg: str, last: bool = False) -> None:
        """Finish the status line with msg; last: later messages (a compile on first use while
        text streams) go to the log instead."""
        self(msg)
        if self.tty:
            self.stream.write("\n")
        self.closed = last


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
        help="alias (smollm2), a .gguf file, an HF directory or an xlaserve checkpoint directory "
        "(default: %(default)s)",
    )
    g.add_argument("--mesh", help="device mesh: tp=N shards the model, dp=M runs replicas (e.g. dp=2,tp=4)")
    g.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0's jax.distributed coordinator")
    g.add_argument("--num-processes", type=int, help="multi-host: processes in the job (one per host)")
    g.add_argument("--process-id", type=int, help="multi-host: this process (0 serves, the others follow)")
    g.add_argument("--max-slots", type=int, help="concurrent sequences (decode batch, per replica)")
    g.add_argument("--max-model-len", type=int, help="longest prompt + output, in tokens")
    g.add_argument("--page-size", type=int, help="tokens per KV page")
    g.add_argument(
        "--memory-fraction",
        type=float,
        help="share of each device's memory to plan weights, KV pages and activations into (default 0.9); "
        "sizes the page pool and, unless --max-slots is given, the slots",
    )
    g.add_argument("--decode-steps", type=int, help="decode steps per dispatch")
    g.add_argument("--prefill-buckets", type=_int_tuple, help="padded prompt-chunk lengths, e.g. 32,128,512")
    g.add_argument(
        "--mixed-batch",
        action=argparse.BooleanOptionalAction,
        help="a step that prefills prompts also decodes the running sequences in the same call (CPU with "
        "the native attention; greedy output may then vary with arrivals); default off",
    )
    g.add_argument(
        "--speculative",
        choices=["ngram", "draft", "eagle"],
        help="speculative decoding (greedy output unchanged, sampled output distributed as without): "
        "ngram (guesses by prompt lookup), draft (guesses by --draft-model) or eagle (guesses by the "
        "trained draft head --draft-head); default off",
    )
    g.add_argument(
        "--num-speculative-tokens",
        type=int,
        help="with --speculative: the most guesses checked per step (default 4)",
    )
    g.add_argument(
        "--draft-model",
        help="with --speculative draft: the draft model (as --model; with the model's tokenizer), e.g. "
        "qwen2.5-coder-0.5b for --model qwen2.5-coder-1.5b",
    )
    g.add_argument(
        "--draft-head",
        metavar="DIR",
        help="with --speculative eagle: a draft head trained for --model (xlaserve train-draft --out DIR)",
    )
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16 elsewhere",
    )
    g.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "int8", "fp8"],
        help="K/V cache storage: auto (in --dtype), int8 (any backend) or fp8 e4m3 (GPU/TPU), each with a "
        "scale per token and kv head; about half the bytes of bfloat16, so twice the slots fit",
    )
    g.add_argument(
        "--quantized",
        action=argparse.BooleanOptionalAction,
        help="keep GGUF-quantized weights quantized (default) or dequantize them at load",
    )
    g.add_argument("--compile-cache", help="JAX compilation cache directory ('' turns it off)")
    g.add_argument(
        "--compile-at",
        choices=["start", "use"],
        help="compile every program at start-up (serve's default: no request waits for a compile) or "
        "each on first use (generate's default: only the programs the run needs)",
    )
    g.add_argument(
        "--attention-impl",
        choices=["auto", "pallas", "xla", "native"],
        help="paged attention: our Pallas kernel, XLA, or our C++ CPU kernel (auto: Pallas on GPU/TPU; on "
        "CPU native where it builds, else XLA; a quantized KV cache takes XLA's path on CPU)",
    )
    g.add_argument(
        "--matmul-impl",
        choices=["auto", "pallas", "xla", "native"],
        help="quantized matmul: our Pallas kernel, XLA, or our C++ CPU kernel for decode (auto: Pallas on "
        "GPU/TPU; on CPU native where it builds (x86-64, AVX2, a C++ compiler), else XLA)",
    )


def engine_kwargs(args) -> dict:
    keys = (
        "max_slots",
        "max_model_len",
        "page_size",
        "memory_fraction",
        "decode_steps",
        "prefill_buckets",
        "mixed_batch",
        "dtype",
        "kv_cache_dtype",
        "quantized",
        "compile_cache",
        "compile_at",
        "max_queue",
        "max_per_client",
        "attention_impl",
        "matmul_impl",
    )
    kwargs = {k: getattr(args, k, None) for k in keys if getattr(args, k, None) is not None}
    method, k = getattr(args, "speculative", None), getattr(args, "num_speculative_tokens", None)
    draft, head = getattr(args, "draft_model", None), getattr(args, "draft_head", None)
    if (method == "draft") != (draft is not None):
        raise ValueError("--speculative draft and --draft-model M go together")
    if (method == "eagle") != (head is not None):
        raise ValueError("--speculative eagle and --draft-head DIR go together")
    if method is not None:
        spec = {"method": method, "num_speculative_tokens": 4 if k is None else k}
        kwargs["speculative"] = spec | ({"model": draft} if draft else {}) | ({"head": head} if head else {})
    elif k is not None:
        raise ValueError("--num-speculative-tokens needs --speculative ngram, draft or eagle")
    return kwargs


def read_bytes(path: str | None) -> bytes | None:
    """A key or certificate file's bytes; None when no path was given."""
    return None if not path else open(path, "rb").read()


def join_cluster(args) -> bool:
    """Multi-host: join jax.distributed. True when this process is a follower."""
    if args.coordinator is None:
        return False
    from xlaserve.sharding import multihost

    if args.num_processes is None or args.process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id")
    multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    return args.process_id != 0


def follow(args) -> int:
    """A follower: build the same engine, then replay process 0's calls until it stops."""
    from xlaserve.llm import LLM
    from xlaserve.runtime import leader

    progress = Progress()
    llm = LLM(args.model, progress=progress, mesh=args.mesh, **engine_kwargs(args))
    progress(f"process {args.process_id}: following process 0 on {llm.describe_mesh()}")
    calls = leader.follow(llm.engine)
    progress.done(f"process {args.process_id}: done after {calls} calls")
    return 0


def finish_cluster(llm) -> None:
    if hasattr(llm.engine, "stop"):  # multi-host leader: release the followers
        llm.engine.stop()
