"""The OpenAI-compatible API's request bodies (pydantic): what each field may hold, nothing more.

Parsing is strict about types (a string is not a number) and lenient about everything else, as
OpenAI is: unknown fields are ignored, ranges are left to `SamplingParams` and the engine's limits
(openai_params.py), whose messages name the field. `parse` turns a body into a request or raises
`ApiError` (400, naming the parameter); every error of the API is an `ApiError`, rendered as
OpenAI's error object by openai_api.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {
            400: "invalid_request_error",
            401: "invalid_request_error",
            404: "invalid_request_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class FunctionCall(_Body):
    name: str
    arguments: str | dict = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: str
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedTool(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchema(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields both endpoints take; top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
    regex and grammar are extensions (vLLM's names); speculative (false: the request never guesses
    when the server speculates) is xlaserve's."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: dict | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    regex: str | None = None
    grammar: str | None = None
    speculative: bool | None = None


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None  # the deprecated spelling of tools: refused, naming tools


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# Names pydantic puts in an error's location for the member of a union that failed: not fields.
_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal", "function-after"}
_MODELS = {c.__name__ for c in (FunctionCall, ToolCall, Message, Tool, NamedTool, JsonSchema, ResponseFormat)}


def param_of(loc) -> str:
    """A pydantic error location as OpenAI names a parameter: messages[0].content."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS or part in _MODELS or not part.isidentifier():
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def parse(body: bytes, model: type[_Body]):
    """The request in `body` (JSON) or ApiError(400) naming the first bad parameter."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = param_of(err["loc"])
        if err["type"] == "json_invalid" or param is None:
            raise ApiError(
                400, f"the body is not a JSON object: {err['msg']}", None, "invalid_json"
            ) from None
        if err["type"] == "missing":
            raise ApiError(400, f"{param} is required", param, "missing_required_parameter") from None
        raise ApiError(400, f"{param}: {err['msg']}", param, "invalid_value") from None
