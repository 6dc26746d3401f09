"""An OpenAI request -> the engine's requests: prompts encoded, `SamplingParams` built and checked
against the engine's limits, one `Request` per choice (n per prompt). Runs on the worker pool:
it tokenizes. Every refusal is an ApiError(400) naming the parameter as the client spelled it.

Field by field: max_tokens / max_completion_tokens -> max_tokens (default: chat, the room left in
the context; completions, 16 as OpenAI's); temperature, top_p, seed, stop, and the extensions
top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, regex, grammar, speculative -> the
same names; presence_penalty / frequency_penalty -> the same names once SamplingParams has them,
until then 0 only; chat logprobs + top_logprobs, completions logprobs -> logprobs (how many alternatives);
response_format json_object / json_schema -> json_schema; tool_choice "required" or a named
function -> grammar (openai_tools.py). Choice j of n samples with seed + j, so a seeded request
reproduces every choice and no two choices are the same sample.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from dataclasses import dataclass, field

from xlaserve.runtime.admission import RequestTooLarge
from xlaserve.runtime.request import Request
from xlaserve.runtime.sampling_params import MAX_SEED, SamplingParams
from xlaserve.serve import openai_tools as tools_
from xlaserve.serve.limits import MAX_CHOICES, most_choices
from xlaserve.serve.openai_schemas import ApiError, ChatRequest, CompletionRequest

PENALTIES = ("presence_penalty", "frequency_penalty")
PASSED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "regex",
    "grammar",
    "speculative",
)


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None  # what echo shows (None: decode the ids)
    score: Request | None = None  # echo with logprobs: the prompt's own log-probs


@dataclass
class Plan:
    """What to run for one API request and how to answer it."""

    chat: bool
    model: str
    prompts: list[Prompt]
    requests: list[Request]  # choice i is requests[i], for prompt i // n
    n: int
    top_logprobs: int | None  # None: no log-probs
    echo: bool = False
    tool_calls: bool = False  # parse tool calls out of the output
    tool_grammar: bool = False  # the output is constrained to tool calls (required / named)
    parallel_tool_calls: bool = True
    names: dict = field(default_factory=dict)  # SamplingParams field -> the request's parameter


def _invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def _field_error(e: ValueError, names: dict, default: str) -> ApiError:
    """A ValueError from SamplingParams / the LLM (its message starts with the field's name) as an
    ApiError naming the request's parameter."""
    message = str(e)
    m = re.match(r"(\w+)", message)
    name = m.group(1) if m else ""
    if name in names:
        param = names[name]
        return _invalid(param + message[len(name) :] if param != name else message, param)
    m = re.match(r"(messages\[\d+\](?:\.\w+)?)", message)
    return _invalid(message, m.group(1) if m else default)


def _too_large(e: RequestTooLarge, names: dict, prompt_param: str) -> ApiError:
    if e.limit == "max_new_tokens" or (e.limit == "max_model_len" and "max_tokens" in names):
        return _invalid(str(e), names.get("max_tokens", "max_tokens"), "context_length_exceeded")
    return _invalid(str(e), prompt_param, "context_length_exceeded")


def _common(body, names: dict) -> dict:
    """SamplingParams fields from the parameters both endpoints share."""
    kwargs = {f: getattr(body, f) for f in PASSED if getattr(body, f) is not None}
    names.update({f: f for f in (*PASSED, "seed")})
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    for p in PENALTIES:
        value = getattr(body, p)
        if p in known and value is not None:
            kwargs[p], names[p] = value, p
        elif value not in (None, 0):
            raise _invalid(f"{p}={value} is not supported (only 0)", p, "unsupported_parameter")
    if body.stop is not None:
        kwargs["stop"], names["stop"] = (
            (body.stop,) if isinstance(body.stop, str) else tuple(body.stop),
            "stop",
        )
    if body.stop_token_ids is not None:
        kwargs["stop_token_ids"], names["stop_token_ids"] = tuple(body.stop_token_ids), "stop_token_ids"
    if body.logit_bias:
        raise _invalid("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    if not 1 <= body.n <= MAX_CHOICES:
        raise _invalid(f"n={body.n} must be an integer in [1, {MAX_CHOICES}]", "n")
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_object":
            schema = {"type": "object"}
        elif fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise _invalid(
                "response_format.json_schema.schema is required for type json_schema",
                "response_format.json_schema.schema",
            )
        else:
            schema = fmt.json_schema.schema_
        kwargs["json_schema"], names["json_schema"] = schema, "response_format"
    given = [names[f] for f in ("json_schema", "regex", "grammar") if f in kwargs]
    if len(given) > 1:
        raise _invalid(f"{' and '.join(given)} are exclusive: give at most one", given[1])
    return kwargs


def _max_tokens(llm, given: int | None, default: int | None, n_prompt: int) -> int:
    if given is not None:
        return given
    limits = llm.runner.scheduler.limits
    room = min(limits.max_new_tokens, llm.engine_config.max_model_len - n_prompt)
    return max(1, room if default is None else min(default, room))


def _requests(llm, plan: Plan, kwargs: dict, max_tokens, default, seed, client, prompt_param) -> None:
    """One request per (prompt, choice); checks every field against the engine's limits."""
    base = uuid.uuid4().hex
    for p, prompt in enumerate(plan.prompts):
        for j in range(plan.n):
            fields = dict(kwargs, max_tokens=_max_tokens(llm, max_tokens, default, len(prompt.ids)))
            if seed is not None:
                fields["seed"] = (seed + j) & MAX_SEED
            if plan.top_logprobs is not None:
                fields["logprobs"] = plan.top_logprobs
            try:
                params = llm.sampling_params(**fields)
                req = llm.make_request(prompt.ids, params, request_id=f"{base}-{p}-{j}", client_id=client)
            except RequestTooLarge as e:
                raise _too_large(e, plan.names, prompt_param) from None
            except ValueError as e:
                raise _field_error(e, plan.names, prompt_param) from None
            plan.requests.append(req)


def _capacity(llm, choices: int, param: str) -> None:
    most = most_choices(llm.engine_config.max_slots, llm.engine_config.max_queue)
    if choices > most:
        raise _invalid(f"{choices} choices requested; at most {most} run at once here", param)


def chat_plan(llm, body: ChatRequest, model: str, client: str | None) -> Plan:
    names: dict = {}
    kwargs = _common(body, names)
    if body.functions:
        raise _invalid(
            "functions is deprecated and not supported: use tools", "functions", "unsupported_parameter"
        )
    tools, choice = body.tools or [], body.tool_choice
    if len({t.function.name for t in tools}) != len(tools):
        raise _invalid("tools: function names must be unique", "tools")
    choice = choice if choice is not None else ("auto" if tools else "none")
    named = None if isinstance(choice, str) else choice.function.name
    if choice != "none" and not tools:
        raise _invalid("tool_choice needs tools", "tool_choice")
    if named is not None and named not in {t.function.name for t in tools}:
        raise _invalid(f"tool_choice names function {named!r}, which is not in tools", "tool_choice")
    parallel = body.parallel_tool_calls is not False
    if choice == "required" or named is not None:
        if {"json_schema", "regex", "grammar"} & set(kwargs):
            other = next(names[f] for f in ("json_schema", "regex", "grammar") if f in kwargs)
            raise _invalid(f"{other} and tool_choice={choice!r} are exclusive", "tool_choice")
        kwargs["grammar"], names["grammar"] = tools_.tool_grammar(tools, named, parallel), "tool_choice"
    if body.top_logprobs is not None and not body.logprobs:
        raise _invalid("top_logprobs requires logprobs: true", "top_logprobs")
    top = (body.top_logprobs or 0) if body.logprobs else None
    names["logprobs"] = "top_logprobs"
    given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if given is not None:
        names["max_tokens"] = (
            "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        )
    _capacity(llm, body.n, "n")
    tok = llm.tokenizer
    if not tok.chat_template:
        raise _invalid("the model has no chat template; use /v1/completions", "messages")
    on = choice != "none"
    messages, template_tools = tools_.chat_messages(body.messages, tok.chat_template, tools if on else None)
    try:
        llm.check_prompt_size(messages, chat=True)
        ids = tok.encode_chat(messages, tools=template_tools)
    except RequestTooLarge as e:
        raise _too_large(e, names, "messages") from None
    except ValueError as e:
        raise _field_error(e, {}, "messages") from None
    plan = Plan(True, model, [Prompt(ids)], [], body.n, top, tool_calls=on, parallel_tool_calls=parallel)
    plan.tool_grammar = names.get("grammar") == "tool_choice"
    plan.names = names
    _requests(llm, plan, kwargs, given, None, body.seed, client, "messages")
    return plan


def _prompts(llm, prompt) -> list[Prompt]:
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise _invalid("prompt is empty", "prompt")
    out = []
    for i, p in enumerate(prompts):
        try:
            ids = llm.encode(p)
        except RequestTooLarge as e:
            raise _invalid(
                f"prompt[{i}]: {e}" if len(prompts) > 1 else str(e), "prompt", "context_length_exceeded"
            ) from None
        except ValueError as e:
            raise _invalid(f"prompt[{i}]: {e}" if len(prompts) > 1 else str(e), "prompt") from None
        out.append(Prompt(ids, p if isinstance(p, str) else None))
    return out


def completion_plan(llm, body: CompletionRequest, model: str, client: str | None) -> Plan:
    names: dict = {"logprobs": "logprobs"}
    kwargs = _common(body, names)
    if body.suffix:
        raise _invalid("suffix is not supported", "suffix", "unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise _invalid(
            "best_of is not supported (only best_of equal to n)", "best_of", "unsupported_parameter"
        )
    if body.max_tokens is not None:
        names["max_tokens"] = "max_tokens"
    prompts = _prompts(llm, body.prompt)
    _capacity(llm, body.n * len(prompts), "n" if len(prompts) == 1 else "prompt")
    plan = Plan(False, model, prompts, [], body.n, body.logprobs, echo=body.echo, names=names)
    _requests(llm, plan, kwargs, body.max_tokens, 16, body.seed, client, "prompt")
    if body.echo and body.logprobs is not None:
        for i, prompt in enumerate(prompts):
            if len(prompt.ids) > 1:
                prompt.score = llm.score_request(
                    (prompt.ids, 1), request_id=f"{plan.requests[0].request_id}-echo{i}"
                )
                prompt.score.client_id = client
    return plan
