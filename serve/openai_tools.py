"""Chat messages and tool calls between OpenAI's API and a model's chat template.

In: OpenAI messages (content as a string or text parts, assistant turns with `tool_calls`, `tool`
turns answering them) become the dicts a chat template reads, the way HF and vLLM pass them
(a call's arguments as a dict, so `arguments | tojson` renders JSON once). A template that reads
`tools` (Qwen2.5's) renders the definitions and the calls itself. For one that does not (SmolLM2's
plain ChatML) the same Hermes format is written into the messages: the tool definitions into the
system turn, past calls as `<tool_call>` blocks in the assistant's text, results as
`<tool_response>` blocks in a user turn.

Out: the model answers in that format, one block per call:
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
tool_choice "required" or a named function constrains the output to such blocks with a Lark grammar
(llguidance's dialect embeds each function's JSON schema with %json); "auto" leaves the model free
and the blocks are parsed out of its text afterwards (`parse_tool_calls`). Streamed
(`ToolCallStream`), constrained calls go out piece by piece as OpenAI streams them; free output is
held back from where a block starts and its calls go out whole.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid

from xlaserve.checkpoints.chat import template_roles
from xlaserve.serve.openai_schemas import ApiError, Message, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_ARGS = re.compile(r'"arguments"\s*:\s*')
# A block's start up to its arguments, as tool_grammar makes the model write it.
_HEAD = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


def reads_tools(template: str) -> bool:
    return re.search(r"\btools\b", template) is not None


def _text(content, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(
                400,
                f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                "supported",
                f"messages[{i}].content[{j}]",
                "unsupported_content",
            )
        parts.append(part["text"])
    return "\n".join(parts)


def _arguments(arguments, i: int, k: int) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        value = e
    if not isinstance(value, dict):
        param = f"messages[{i}].tool_calls[{k}].function.arguments"
        raise ApiError(400, f"{param} must be a JSON object (as a string)", param, "invalid_value")
    return value


def _call_block(name: str, arguments: dict) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def tools_prompt(tools: list[Tool]) -> str:
    """The tool definitions in Hermes' words (what Qwen2.5's template writes)."""
    lines = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{lines}\n"
        "</tools>\n\nFor each function call, return a json object with function name and arguments "
        f'within {OPEN}{CLOSE} XML tags:\n{OPEN}\n{{"name": <function-name>, "arguments": '
        f"<args-json-object>}}\n{CLOSE}"
    )


def chat_messages(
    messages: list[Message], template: str, tools: list[Tool] | None
) -> tuple[list[dict], list | None]:
    """(messages for the template, tools for the template or None). `tools` are the ones the model
    may call (None: none, or tool_choice "none")."""
    native = reads_tools(template)
    tool_role = "tool" in template_roles(template)
    out: list[dict] = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        msg = {"role": role, "content": _text(m.content, i)}
        if m.name is not None:
            msg["name"] = m.name
        if role == "assistant" and m.tool_calls:
            calls = [(c, _arguments(c.function.arguments, i, k)) for k, c in enumerate(m.tool_calls)]
            if native:
                msg["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": a}}
                    for c, a in calls
                ]
            else:
                blocks = [_call_block(c.function.name, a) for c, a in calls]
                msg["content"] = "\n".join([msg["content"], *blocks] if msg["content"] else blocks)
        elif role == "tool":
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if not tool_role:
                response = f"<tool_response>\n{msg['content']}\n</tool_response>"
                if out and out[-1].get("tool_responses"):  # consecutive results share one user turn
                    out[-1]["content"] += "\n" + response
                    continue
                msg = {"role": "user", "content": response, "tool_responses": True}
        out.append(msg)
    for msg in out:
        msg.pop("tool_responses", None)
    if not tools:
        return out, None
    definitions = [t.model_dump(exclude_none=True) for t in tools]
    if native:
        return out, definitions
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{tools_prompt(tools)}".lstrip()}
    else:
        out.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return out, None


def tool_grammar(tools: list[Tool], name: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) for output that is only tool calls: one call of `name`,
    or one or more (just one unless `parallel`) of any of `tools`, each with arguments its JSON
    schema accepts, written as the template writes them."""
    chosen = [t for t in tools if name is None or t.function.name == name]
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = dict(options[0]) if len(options) == 1 else {"anyOf": options}
    # The template's own spelling, json.dumps': ", " and ": ", no other whitespace (with free
    # whitespace a small model can spend its max_tokens on newlines inside the call).
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    repeat = ' ("\\n" call)*' if parallel and name is None else ""
    return (
        f"start: call{repeat}\n"
        f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n'
        f"body: %json {json.dumps(schema, ensure_ascii=False)}\n"
    )


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def object_end(text: str, start: int) -> int | None:
    """The index just past the JSON object opening at text[start] ("{"), or None while it is open
    (strings and their escapes skipped; the text is assumed to be JSON, as a grammar makes it)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _raw_arguments(body: str, args: dict) -> str:
    """A call's arguments as the model wrote them (what a stream sent), else re-serialized."""
    m = _ARGS.search(body)
    end = object_end(body, m.end()) if m and body[m.end() : m.end() + 1] == "{" else None
    if end is not None:
        raw = body[m.end() : end]
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(raw) == args:
                return raw
    return json.dumps(args, ensure_ascii=False)


def parse_tool_calls(text: str, parallel: bool = True) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a model's text: every `<tool_call>` block that holds JSON with a
    name and arguments becomes an OpenAI tool call; the text around the blocks stays content (None
    when empty). Text with a block that does not parse is all content, no calls."""
    if OPEN not in text:
        return text, []
    calls = []
    for body in _BLOCK.findall(text):
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return text, []
        args = value.get("arguments", value.get("parameters", {}))
        arguments = args if isinstance(args, str) else _raw_arguments(body, args)
        calls.append(
            {
                "id": new_call_id(),
                "type": "function",
                "function": {"name": value["name"], "arguments": arguments},
            }
        )
    content = _BLOCK.sub("", text).strip() or None
    return content, calls if parallel else calls[:1]


class ToolCallStream:
    """Streams a model's text with tool calls in it. `feed` and `finish` return (content to send,
    tool-call deltas to send) in OpenAI's chunk format.

    Free output (tool_choice "auto"): text before the first `<tool_call>` goes out as it comes (less
    a tail that could be the start of one); from there on it is held, and `finish` parses it, the
    calls going out whole (a block may yet fail to parse, and then it was content).
    Constrained output (`incremental`: "required" or a named function; the grammar guarantees
    `<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>` blocks): each call goes out as
    OpenAI streams one: its id, type and name once the name is complete, then its arguments' text
    piece by piece as the model writes it. Concatenated, the pieces equal the non-streamed call's
    arguments."""

    def __init__(self, parallel: bool = True, incremental: bool = False):
        self.parallel, self.incremental = parallel, incremental
        self.held, self.calling = "", False
        self.calls = 0  # calls started (incremental)
        self.args_at: int | None = None  # where the open call's arguments start in held
        self.sent = 0  # held[args_at:sent] has gone out

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.held += text
        if self.calling:
            return "", self._advance() if self.incremental else []
        at = self.held.find(OPEN)
        if at >= 0:
            self.calling = True
            out, self.held = self.held[:at], self.held[at:]
            return out, self._advance() if self.incremental else []
        keep = max((k for k in range(1, len(OPEN)) if self.held.endswith(OPEN[:k])), default=0)
        out, self.held = (self.held[:-keep], self.held[-keep:]) if keep else (self.held, "")
        return out, []

    def finish(self) -> tuple[str, list[dict], bool]:
        """(content still to send, tool-call deltas still to send, whether the output called tools)."""
        if self.incremental and self.calling:
            return "", self._advance(), self.calls > 0
        held, self.held = self.held, ""
        if not self.calling:
            return held, [], False
        content, calls = parse_tool_calls(held, self.parallel)
        if not calls:
            return held, [], False
        return content or "", [{"index": k, **c} for k, c in enumerate(calls)], True

    def _advance(self) -> list[dict]:
        """Deltas for what `held` (which starts at a block) now adds: a call's head, arguments."""
        out = []
        while True:
            if self.args_at is None:
                at = self.held.find(OPEN)
                if at < 0:  # between blocks: keep only what could begin the next one
                    self.held = self.held[-(len(OPEN) - 1) :]
                    return out
                self.held = self.held[at:]
                m = _HEAD.match(self.held)
                if m is None:
                    return out
                self.args_at = m.end()
                name = json.loads(f'"{m.group(1)}"')
                head = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
                out.append({"index": self.calls, **head})
                self.calls += 1
                self.sent = self.args_at
            end = object_end(self.held, self.args_at)
            upto = len(self.held) if end is None else end
            if upto > self.sent:
                piece = self.held[self.sent : upto]
                out.append({"index": self.calls - 1, "function": {"arguments": piece}})
                self.sent = upto
            if end is None:
                return out
            self.held, self.args_at, self.sent = self.held[end:], None, 0
