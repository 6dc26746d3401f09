"""The `xlaserve` command line: pull, generate, serve, convert, eval, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from xlaserve import __version__
from xlaserve.checkpoints import registry


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per message otherwise."""

    def __init__(self, stream=None):
        stream = stream or sys.stderr
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
    g.add_argument(
        "--attention-impl",
        choices=["auto", "pallas", "xla"],
        help="paged attention: our Pallas kernel or XLA (auto: Pallas on GPU/TPU, XLA on CPU)",
    )
    g.add_argument(
        "--matmul-impl",
        choices=["auto", "pallas", "xla"],
        help="quantized matmul: our Pallas kernel or XLA (auto: Pallas on GPU/TPU, XLA on CPU)",
    )


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
        "max_queue",
        "max_per_client",
        "attention_impl",
        "matmul_impl",
    )
    return {k: getattr(args, k, None) for k in keys if getattr(args, k, None) is not None}


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


def cmd_eval(lm_eval_args: list[str]) -> int:
    """Everything after `eval` goes to lm_eval's own parser."""
    try:
        from xlaserve.evals import lm_eval_backend
    except ImportError as e:
        print(
            f"xlaserve: error: `xlaserve eval` needs lm-evaluation-harness: pip install 'xlaserve[eval]' "
            f"({e})",
            file=sys.stderr,
        )
        return 2
    lm_eval_backend.main(lm_eval_args)
    return 0


def cmd_convert(args) -> int:
    from xlaserve.checkpoints import orbax, quality

    src = registry.resolve(args.src, log=lambda m: print(m, file=sys.stderr))
    status = Progress()

    def bar(i: int, n: int, name: str) -> None:
        filled = 30 * i // max(n, 1)
        status(f"[{'#' * filled}{'.' * (30 - filled)}] {i}/{n} {name}")

    status(f"reading {src}")
    t0 = time.perf_counter()
    meta = orbax.convert(
        src,
        args.out,
        quant=args.quant,
        scheme=args.scheme,
        group_size=args.group_size,
        dtype=args.dtype,
        force=args.force,
        progress=bar,
    )
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    q = meta["quantization"]
    scheme = "/".join(str(x) for x in (q["method"], q["scheme"], q["group_size"]) if x)
    status.done(
        f"wrote {args.out} ({size / 2**20:.1f} MiB, {scheme}, kinds {','.join(q['kinds']) or 'dense'}) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    if args.report:
        report = quality.quality_report(src, args.out, args.report_text)
        print(quality.format_report(report))
        if args.output == "json":
            print(json.dumps({"checkpoint": str(args.out), "quantization": q, "quality": report}))
    return 0


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
        self.done[i] = self.done[i] or delta.finished
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


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if not prompts or prompts == ["-"]:
        if sys.stdin.isatty():
            raise ValueError("give at least one PROMPT (or '-' to read one from stdin)")
        prompts = [sys.stdin.read()]
    return prompts


def generate_remote(args, prompts: list[str], params) -> int:
    """`generate --server HOST:PORT`: the same output, produced by a running server."""
    import grpc

    from xlaserve.serve.client import Client

    sampling = {
        f: getattr(params, f)
        for f in (
            "max_tokens",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "seed",
            "ignore_eos",
            "logprobs",
        )
    }
    sampling["stop"] = params.stop
    key = args.api_key or None
    with Client(args.server, api_key=key, tls=args.tls, root_certificates=_read(args.tls_ca)) as client:
        for i, prompt in enumerate(prompts):
            kw = {"messages": [{"role": "user", "content": prompt}]} if args.chat else {"prompt": prompt}
            try:
                if args.output == "json":
                    out = client.generate(**kw, **sampling)
                    print(
                        json.dumps(
                            {
                                "prompt": prompt,
                                "text": out.text,
                                "token_ids": out.token_ids,
                                "finish_reason": out.finish_reason,
                                "stop_reason": out.stop_reason,
                                "usage": out.usage,
                                "timings": out.timings,
                            },
                            ensure_ascii=False,
                        )
                    )
                    continue
                if len(prompts) > 1:
                    print(f"{chr(10) if i else ''}--- [{i + 1}/{len(prompts)}] ---")
                for msg in client.generate_stream(**kw, **sampling):
                    if msg.HasField("delta"):
                        sys.stdout.write(msg.delta.text)
                        sys.stdout.flush()
            except grpc.RpcError as e:
                raise ValueError(f"server {args.server}: {e.code().name}: {e.details()}") from None
        if args.output == "text":
            print()
    return 0


def _read(path: str | None) -> bytes | None:
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
    from xlaserve.runtime.llm import LLM
    from xlaserve.sharding import multihost

    progress = Progress()
    llm = LLM(args.model, progress=progress, mesh=args.mesh, **engine_kwargs(args))
    progress(f"process {args.process_id}: following process 0 on {llm.describe_mesh()}")
    calls = multihost.follow(llm.engine)
    progress.done(f"process {args.process_id}: done after {calls} calls")
    return 0


def finish_cluster(llm) -> None:
    if hasattr(llm.engine, "stop"):  # multi-host leader: release the followers
        llm.engine.stop()


def cmd_generate(args) -> int:
    if join_cluster(args):
        return follow(args)
    prompts = read_prompts(args)
    params = sampling_from_args(args)
    if args.server:
        return generate_remote(args, prompts, params)
    from xlaserve.runtime.llm import LLM

    progress = Progress()
    llm = LLM(args.model, progress=progress, mesh=args.mesh, **engine_kwargs(args))
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
    finish_cluster(llm)
    return 0


def cmd_serve(args) -> int:
    import signal
    import threading

    from xlaserve.runtime import llama
    from xlaserve.runtime.llm import LLM
    from xlaserve.serve.auth import load_keys
    from xlaserve.serve.server import Server

    if join_cluster(args):
        return follow(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    tls = (_read(args.tls_key), _read(args.tls_cert)) if args.tls_cert else None
    keys = load_keys(args.api_key_file, args.api_keys_env)
    progress = Progress()
    names = (args.model, registry.DEFAULT_MODEL) if args.model == registry.DEFAULT_MODEL else (args.model,)
    server = Server(
        host=args.host,
        port=args.port,
        tls=tls,
        api_keys=keys,
        max_workers=args.max_workers,
        max_message_bytes=args.max_message_bytes,
        model_names=names,
    ).start()
    progress(
        f"listening on {args.host}:{server.port} ({'TLS' if tls else 'plaintext'}"
        f"{', API keys required' if keys else ''}); health NOT_SERVING until the model is compiled"
    )
    if args.metrics_port is not None:
        server.metrics.serve(args.metrics_port, args.host)
        progress(f"Prometheus metrics on http://{args.host}:{args.metrics_port}/metrics")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    llm = LLM(args.model, progress=progress, mesh=args.mesh, **engine_kwargs(args))
    server.service.model_names = (*names, llm.config.name)
    server.service.mesh = llm.describe_mesh()
    server.attach(llm)
    e, ecfg = llm.engine, llm.engine_config
    weights_mb = llama.weight_bytes(e.weights) / 2**20
    kv_mb = 2 * e.cache.k.nbytes / 2**20
    compile_s = sum(e.compile_seconds.values())
    progress.done(
        f"SERVING {llm.config.name} ({llm.quantization}, {ecfg.dtype}) on {llm.describe_mesh()}; "
        f"{ecfg.max_slots} slots x {ecfg.max_model_len} tokens; weights {weights_mb:.0f} MiB, "
        f"KV cache {kv_mb:.0f} MiB; load {llm.load_seconds:.1f}s, compile {compile_s:.1f}s"
    )
    stop.wait()
    server.begin_drain()
    progress(f"draining: no new requests; {args.grace_period:.0f}s for running streams")
    finished = server.drain(args.grace_period)
    finish_cluster(llm)
    progress.done("stopped" + ("" if finished else " (grace period over: remaining streams cancelled)"))
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
    p.add_argument("--server", help="HOST:PORT of a running `xlaserve serve` (instead of a local engine)")
    p.add_argument(
        "--api-key", default=os.environ.get("XLASERVE_API_KEY"), help="with --server (env XLASERVE_API_KEY)"
    )
    p.add_argument("--tls", action="store_true", help="with --server: connect over TLS")
    p.add_argument("--tls-ca", help="with --server: CA certificate (PEM) to trust")
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve the model over gRPC (xlaserve.v1.Generation, health, reflection)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--api-key-file", help="file of accepted API keys, one per line")
    p.add_argument(
        "--api-keys-env", default="XLASERVE_API_KEYS", help="env var with comma-separated API keys"
    )
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds running streams get on SIGTERM")
    p.add_argument("--max-workers", type=int, default=256, help="concurrent RPCs (threads)")
    p.add_argument("--max-message-bytes", type=int, default=16 << 20)
    p.add_argument("--max-queue", type=int, help="requests waiting for a slot before RESOURCE_EXHAUSTED")
    p.add_argument(
        "--max-per-client", type=int, help="requests in flight per client (x-client-id or API key)"
    )
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "convert",
        help="convert a GGUF file or an HF directory to an xlaserve (orbax) checkpoint, optionally quantized",
    )
    p.add_argument("src", help="alias (smollm2), a .gguf file or an HF checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument(
        "--quant",
        choices=("keep", "none", "int8", "int4"),
        default="keep",
        help="keep: as the source stores it (GGUF blocks stay); none: dense; int8: per output channel; "
        "int4: groups along the input axis (default: %(default)s)",
    )
    p.add_argument("--scheme", choices=("sym", "asym"), default="sym", help="int8/int4 rounding scheme")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=32, help="int4 group size")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="f32", help="dense weights' dtype")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the perplexity report")
    p.add_argument(
        "--report-text", help="text for the perplexity report (default: tests/fixtures/two_cities.txt)"
    )
    p.add_argument("--output", choices=("text", "json"), default="text", help="also print the report as JSON")
    p.set_defaults(func=cmd_convert)

    sub.add_parser(
        "eval",
        help="lm-evaluation-harness's command line with the xlaserve backends registered "
        "(xlaserve eval --model xlaserve --model_args model=smollm2 --tasks ...)",
    )

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from xlaserve.bench import decode, serve_load

    p = bench.add_parser("serve", help="load-test a server over gRPC (TTFT, ITL, e2e percentiles, tok/s)")
    serve_load.add_arguments(p)
    p.set_defaults(func=lambda a: serve_load.run(a) and 0)
    p = bench.add_parser(
        "decode", help="decode/prefill roofline: step time, tok/s, %% of memory bandwidth, TTFT, compile time"
    )
    decode.add_arguments(p)
    p.set_defaults(func=lambda a: decode.run(a) and 0)
    return parser


def main(argv=None) -> int:
    import logging

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # lm_eval parses its own flags
        return cmd_eval(argv[1:])
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
