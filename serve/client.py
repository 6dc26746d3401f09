"""Clients for the xlaserve gRPC API, synchronous and asyncio.

    with Client("127.0.0.1:50051") as c:
        print(c.generate("The capital of France is", max_tokens=16, temperature=0).text)
        for msg in c.generate_stream(messages=[{"role": "user", "content": "Hi"}]):
            ...

Sampling keywords are the fields of `SamplingParams` (temperature, top_k, top_p, min_p,
repetition_penalty, seed, max_tokens, stop, stop_token_ids, ignore_eos, logprobs, json_schema, regex,
grammar); unset ones take the server's defaults. `generate_n(prompt, n)` asks for n samples of one
prompt in one request (they share the prompt's pages) and returns a Completion for each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2 as pb
from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2_grpc as pb_grpc

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # pb.TokenLogprob
    finish_reason: str = ""
    stop_reason: str | int | None = None
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    speculative: dict | None = None  # {"proposed", "accepted"}; None when the server does not speculate

    def add(self, msg: pb.GenerateResponse) -> None:
        self.request_id = msg.request_id or self.request_id  # set on the first and the final message
        if msg.HasField("delta"):
            self.text += msg.delta.text
            self.token_ids += list(msg.delta.token_ids)
            self.logprobs += list(msg.delta.logprobs)
        elif msg.HasField("final"):
            f = msg.final
            self.finish_reason = FINISH_NAMES[f.finish_reason]
            which = f.WhichOneof("stop_reason")
            self.stop_reason = None if which is None else getattr(f, which)
            self.usage = {
                k: getattr(f.usage, k) for k in ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")
            }
            self.timings = {
                k: getattr(f.timings, k) for k in ("queue_s", "ttft_s", "total_s", "decode_tokens_per_s")
            }
            if f.HasField("speculative"):
                self.speculative = {"proposed": f.speculative.proposed, "accepted": f.speculative.accepted}


def generate_request(
    prompt=None,
    *,
    tokens=None,
    messages=None,
    request_id: str = "",
    priority: int = 0,
    model: str = "",
    n: int = 0,
    **sampling,
) -> pb.GenerateRequest:
    stop, stop_ids = sampling.pop("stop", ()), sampling.pop("stop_token_ids", ())
    params = pb.SamplingParams(
        **{k: v for k, v in sampling.items() if v is not None},
        stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=list(stop_ids),
    )
    req = pb.GenerateRequest(model=model, request_id=request_id, priority=priority, sampling=params, n=n)
    if prompt is not None:
        req.text = prompt
    elif tokens is not None:
        req.tokens.ids.extend(tokens)
    elif messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    return req


def samples(n: int) -> tuple[list[Completion], callable]:
    """n Completions and the function that files each response message under its sample."""
    outs = [Completion() for _ in range(max(n, 1))]
    return outs, lambda msg: outs[msg.index].add(msg)


def score_request(items, model: str = "") -> pb.ScoreRequest:
    out = pb.ScoreRequest(model=model)
    for first, second in items:
        if isinstance(first, str):
            out.items.add(pair=pb.ContextContinuation(context=first, continuation=second))
        else:
            out.items.add(tokens=pb.TokenIds(ids=list(first)), start=second)
    return out


def _channel_args(target, api_key, root_certificates, tls, client_id):
    metadata = []
    if api_key:
        metadata.append(("authorization", f"Bearer {api_key}"))
    if client_id:
        metadata.append(("x-client-id", client_id))
    creds = grpc.ssl_channel_credentials(root_certificates) if (tls or root_certificates) else None
    options = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.max_receive_message_length", 64 << 20),
        # A client is one connection of its own (grpc would share one between channels to the same
        # target): without API keys the server scopes request ids by connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return metadata, creds, options


class Client:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        tls: bool = False,
        client_id: str | None = None,
    ):
        self.metadata, creds, options = _channel_args(target, api_key, root_certificates, tls, client_id)
        self.channel = (
            grpc.secure_channel(target, creds, options) if creds else grpc.insecure_channel(target, options)
        )
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate_stream(self, prompt=None, *, timeout: float | None = None, **kw):
        """The response stream (deltas, then a final message). Cancel it with `.cancel()`."""
        return self.stub.Generate(generate_request(prompt, **kw), timeout=timeout, metadata=self.metadata)

    def generate(self, prompt=None, *, timeout: float | None = None, **kw) -> Completion:
        out = Completion()
        for msg in self.generate_stream(prompt, timeout=timeout, **kw):
            out.add(msg)
        return out

    def generate_n(self, prompt=None, n: int = 1, *, timeout: float | None = None, **kw) -> list[Completion]:
        outs, add = samples(n)
        for msg in self.generate_stream(prompt, timeout=timeout, n=n, **kw):
            add(msg)
        return outs

    def score(self, items, *, timeout: float | None = None, model: str = "") -> list[pb.ScoreResult]:
        return list(
            self.stub.Score(score_request(items, model), timeout=timeout, metadata=self.metadata).results
        )

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        msg = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self.stub.Tokenize(msg, metadata=self.metadata).token_ids)

    def detokenize(self, ids, skip_special_tokens: bool = True) -> str:
        msg = pb.DetokenizeRequest(token_ids=list(ids), skip_special_tokens=skip_special_tokens)
        return self.stub.Detokenize(msg, metadata=self.metadata).text

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    def stats(self) -> pb.ServerStats:
        return self.stub.GetServerStats(pb.GetServerStatsRequest(), metadata=self.metadata)

    def health(self, service: str = "") -> str:
        status = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


class AsyncClient:
    """The same API over grpc.aio; use inside an event loop."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        tls: bool = False,
        client_id: str | None = None,
    ):
        self.metadata, creds, options = _channel_args(target, api_key, root_certificates, tls, client_id)
        self.channel = (
            grpc.aio.secure_channel(target, creds, options)
            if creds
            else grpc.aio.insecure_channel(target, options)
        )
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def generate_stream(self, prompt=None, *, timeout: float | None = None, **kw):
        return self.stub.Generate(generate_request(prompt, **kw), timeout=timeout, metadata=self.metadata)

    async def generate(self, prompt=None, *, timeout: float | None = None, **kw) -> Completion:
        out = Completion()
        async for msg in self.generate_stream(prompt, timeout=timeout, **kw):
            out.add(msg)
        return out

    async def generate_n(
        self, prompt=None, n: int = 1, *, timeout: float | None = None, **kw
    ) -> list[Completion]:
        outs, add = samples(n)
        async for msg in self.generate_stream(prompt, timeout=timeout, n=n, **kw):
            add(msg)
        return outs

    async def score(self, items, *, timeout: float | None = None, model: str = "") -> list[pb.ScoreResult]:
        return list(
            (
                await self.stub.Score(score_request(items, model), timeout=timeout, metadata=self.metadata)
            ).results
        )

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    async def stats(self) -> pb.ServerStats:
        return await self.stub.GetServerStats(pb.GetServerStatsRequest(), metadata=self.metadata)

    async def health(self, service: str = "") -> str:
        status = (
            await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        ).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
