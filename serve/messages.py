"""Between protocol messages and the runtime's types: requests in (sampling parameters, prompts,
score items), deltas, finals, model info and server stats out. Every invalid field raises ValueError
whose message starts with the field's name in the request."""

from __future__ import annotations

import uuid

from xlaserve.runtime.request import Delta, FinishReason, Request
from xlaserve.runtime.sampling_params import SamplingParams
from xlaserve.runtime.scoring import ScoreResult
from xlaserve.runtime.stats import EngineStats
from xlaserve.serve.limits import MAX_REQUEST_ID
from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2 as pb

FINISH = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
}
SAMPLING_FIELDS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "seed",
    "max_tokens",
    "ignore_eos",
    "logprobs",
    "json_schema",
    "regex",
    "grammar",
    "speculative",
)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_ids(chosen: str, scope: str) -> tuple[str, str]:
    """(the engine's id, the id echoed to the client). An id the client chose is scoped by `scope`
    (its identity) so that one client's ids can never collide with another's; one the server
    assigns is unguessable (uuid4). The two cannot meet: a scoped id holds a newline, a uuid's hex
    does not, and neither a client's id nor a scope (metadata, a key id, a peer address) can."""
    if not chosen:
        rid = new_request_id()
        return rid, rid
    if len(chosen) > MAX_REQUEST_ID:
        raise ValueError(f"request_id has {len(chosen)} characters; the limit is {MAX_REQUEST_ID}")
    if not (chosen.isascii() and chosen.isprintable()):
        raise ValueError("request_id must be printable ASCII (0x20-0x7e)")
    return f"{scope}\n{chosen}", chosen


def sampling_params(msg: pb.SamplingParams, make=SamplingParams) -> SamplingParams:
    """Only the fields the client set; the rest keep SamplingParams' defaults. `make` builds them
    (`LLM.sampling_params`: checked against the engine's limits, e.g. max_logprobs)."""
    kwargs = {f: getattr(msg, f) for f in SAMPLING_FIELDS if msg.HasField(f)}
    if msg.stop:
        kwargs["stop"] = tuple(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    try:
        return make(**kwargs)
    except ValueError as e:
        raise ValueError(f"sampling.{e}") from None


def prompt_of(msg: pb.GenerateRequest):
    """(prompt, chat?) from the request's input oneof."""
    which = msg.WhichOneof("input")
    if which is None:
        raise ValueError("input is required: set text, tokens or chat")
    if which == "text":
        return msg.text, False
    if which == "tokens":
        if not msg.tokens.ids:
            raise ValueError("tokens.ids is empty")
        return list(msg.tokens.ids), False
    return [{"role": m.role, "content": m.content} for m in msg.chat.messages], True


def token_logprobs(delta: Delta, tokenizer) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, token=tokenizer.token_text(t), logprob=v) for t, v in lp.top],
        )
        for lp in delta.logprobs
    ]


def delta_message(delta: Delta, tokenizer, request_id: str = "", index: int = 0) -> pb.GenerateResponse:
    """A sample's first delta carries the request id; later ones leave it empty (see the proto)."""
    return pb.GenerateResponse(
        request_id=request_id,
        index=index,
        delta=pb.Delta(token_ids=delta.token_ids, text=delta.text, logprobs=token_logprobs(delta, tokenizer)),
    )


def final_message(req: Request, request_id: str, index: int = 0) -> pb.GenerateResponse:
    t = req.timings.as_dict(len(req.output_ids))
    final = pb.Final(
        finish_reason=FINISH.get(req.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_prompt_tokens=req.cached_tokens,
        ),
        timings=pb.Timings(**{k: v for k, v in t.items() if v is not None}),
    )
    if req.speculative is not None:
        final.speculative.CopyFrom(pb.Speculative(**req.speculative.as_dict()))
    if isinstance(req.stop_reason, str):
        final.stop_string = req.stop_reason
    elif req.stop_reason is not None:  # the stop token id, or which EOS token ended the output
        final.stop_token_id = int(req.stop_reason)
    return pb.GenerateResponse(request_id=request_id, final=final, index=index)


def score_item(item: pb.ScoreItem, i: int):
    """(tokens, start) or (context, continuation) for LLM.score_request."""
    which = item.WhichOneof("input")
    if which is None:
        raise ValueError(f"items[{i}].input is required: set tokens or pair")
    if which == "pair":
        if not item.pair.continuation:
            raise ValueError(f"items[{i}].pair.continuation is empty")
        return item.pair.context, item.pair.continuation
    return list(item.tokens.ids), item.start


def score_result(r: ScoreResult) -> pb.ScoreResult:
    return pb.ScoreResult(
        token_ids=r.token_ids,
        logprobs=r.logprobs,
        is_greedy=r.is_greedy,
        sum_logprob=r.sum_logprob,
        all_greedy=r.all_greedy,
    )


def model_info(llm, mesh: str, version: str) -> pb.ModelInfo:
    c, e = llm.config, llm.engine_config
    return pb.ModelInfo(
        name=c.name,
        architecture="llama",
        source=llm.model_path,
        vocab_size=c.vocab_size,
        context_length=e.max_model_len,
        max_position_embeddings=c.max_position_embeddings,
        hidden_size=c.hidden_size,
        num_layers=c.num_layers,
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        quantization=llm.quantization,
        dtype=e.dtype,
        mesh=mesh,
        max_slots=e.max_slots,
        page_size=e.page_size,
        eos_token_ids=list(c.eos_token_ids),
        has_chat_template=bool(llm.tokenizer.chat_template),
        version=version,
        max_logprobs=e.max_logprobs,
        bos_token_id=c.bos_token_id,
    )


def server_stats(stats: EngineStats, uptime_s: float) -> pb.ServerStats:
    return pb.ServerStats(
        slots_total=stats.slots_total,
        slots_busy=stats.slots_busy,
        queue_length=stats.queue_length,
        pages_total=stats.pages_total,
        pages_free=stats.pages_free,
        pages_used=stats.pages_used,
        pages_cached=stats.pages_cached,
        prefix_hit_rate=stats.prefix_hit_rate,
        prefill_tokens_saved=stats.prefill_tokens_saved,
        preemptions=stats.preemptions,
        requests_finished=stats.requests_finished,
        draining=stats.draining,
        uptime_s=uptime_s,
        moe_experts=len(stats.moe_routed[0]) if stats.moe_routed else 0,
        moe_routed_tokens=[n for layer in stats.moe_routed for n in layer],
        speculative_proposed_tokens=stats.speculative_proposed,
        speculative_accepted_tokens=stats.speculative_accepted,
        prompt_tokens=stats.prompt_tokens,
        prefill_tokens_computed=stats.prefill_tokens_computed,
        evictions=stats.evictions,
        mixed_steps=stats.mixed_steps,
    )
