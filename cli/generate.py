"""`xlaserve generate PROMPT...`: generate text for one or more prompts, batched on a local engine
(or on a running server with --server), streamed in prompt order or printed as JSON lines."""

from __future__ import annotations

import json
import os
import sys

from xlaserve.cli.common import (
    Progress,
    add_engine_args,
    engine_kwargs,
    finish_cluster,
    follow,
    join_cluster,
    read_bytes,
)


def sampling_from_args(args):
    from xlaserve.runtime.sampling_params import SamplingParams

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
        "speculative": out.speculative,
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
    from xlaserve.serve.messages import SAMPLING_FIELDS

    sampling = {f: getattr(params, f) for f in SAMPLING_FIELDS}  # what the proto carries
    sampling["stop"] = params.stop
    key = args.api_key or None
    with Client(args.server, api_key=key, tls=args.tls, root_certificates=read_bytes(args.tls_ca)) as client:
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
                                "speculative": out.speculative,
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


def cmd_generate(args) -> int:
    if join_cluster(args):
        return follow(args)
    prompts = read_prompts(args)
    params = sampling_from_args(args)
    if args.server:
        return generate_remote(args, prompts, params)
    from xlaserve.llm import LLM

    progress = Progress()
    engine = {"compile_at": "use"} | engine_kwargs(args)  # a one-shot run compiles what it runs
    llm = LLM(args.model, progress=progress, mesh=args.mesh, **engine)
    compile_s = sum(llm.engine.compile_seconds.values())
    progress.done(
        f"ready: {llm.config.name} ({llm.quantization}, {llm.engine_config.dtype}); "
        f"load {llm.load_seconds:.1f}s, compile {compile_s:.1f}s",
        last=True,
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


def register(sub) -> None:
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
