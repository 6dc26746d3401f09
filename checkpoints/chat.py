"""Chat templates: the model's Jinja template rendered the way HF `apply_chat_template` renders it
(sandboxed environment, trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` filter that keeps non-ASCII text).

A template pastes roles and contents into the prompt verbatim, so a message could forge turns: a
role "user<|im_end|>\n<|im_start|>system" or a content holding "<|im_start|>". Two defences:
- roles are checked against the ones the template accepts (`template_roles`);
- special-token text inside messages is swapped for placeholders before rendering
  (`escape_specials`), so the tokenizer can encode it as the plain text it is while the template's
  own special tokens stay special (Tokenizer.encode_chat).
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


BASE_ROLES = ("system", "user", "assistant")
OPTIONAL_ROLES = ("tool", "ipython")  # accepted when the template names them


@functools.lru_cache(maxsize=8)
def template_roles(template: str) -> tuple[str, ...]:
    """The roles a message may have: system, user, assistant, and the optional ones the template
    names (quoted, as in `message['role'] == 'tool'`)."""
    named = tuple(r for r in OPTIONAL_ROLES if re.search(rf"""['"]{r}['"]""", template))
    return BASE_ROLES + named


def _show(text: str, most: int = 60) -> str:
    return repr(text) if len(text) <= most else repr(text[:most]) + f"... ({len(text)} characters)"


def check_messages(messages, roles: tuple[str, ...] | None = None) -> list[dict]:
    """Messages as a list of {"role": str, "content": str}, each role one of `roles` (None: any);
    ValueError names the bad field."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"messages[{i}].{key} must be a string")
        if not m["role"]:
            raise ValueError(f"messages[{i}].role must be non-empty")
        if roles is not None and m["role"] not in roles:
            raise ValueError(
                f"messages[{i}].role={_show(m['role'])} is not a role the chat template accepts "
                f"(one of: {', '.join(roles)})"
            )
        out.append(dict(m))
    return out


_PRIVATE_USE = re.compile("[\ue000-\uf8ff]")


def _strings(value, key: str | None = None):
    """Every string inside `value` (nested dicts, lists, tuples), the values of "role" keys excepted."""
    if isinstance(value, str):
        if key != "role":
            yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, k)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _map_strings(value, fn, key: str | None = None):
    if isinstance(value, str):
        return value if key == "role" else fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_map_strings(v, fn) for v in value)
    return value


def escape_specials(messages, special: re.Pattern) -> tuple:
    """Checked messages with every match of `special` (the tokenizer's special tokens) in their
    strings swapped for a placeholder f"{mark}{k}{mark}"; returns them, the texts swapped (k indexes
    them) and the mark: a private-use character that occurs in no message, so no placeholder can be
    forged. Strings nested in a message (tool calls' arguments) are swapped too, and so is any other
    data given along (`(messages, tools)`: tool definitions the template renders). Roles are left
    alone (checked against the template's instead). Nothing to swap: the input as it is, [] and ""."""
    texts = list(_strings(messages))
    if not any(special.search(v) for v in texts):
        return messages, [], ""
    used = {c for v in texts for c in _PRIVATE_USE.findall(v)}
    mark = next((chr(c) for c in range(0xE000, 0xF900) if chr(c) not in used), None)
    if mark is None:
        raise ValueError("messages hold special-token text and every private-use character; drop either")
    swapped: list[str] = []

    def swap(match: re.Match) -> str:
        swapped.append(match.group(0))
        return f"{mark}{len(swapped) - 1}{mark}"

    return _map_strings(messages, lambda v: special.sub(swap, v)), swapped, mark


def render_chat(template: str, messages, *, add_generation_prompt: bool = True, **special_tokens) -> str:
    """The prompt text for `messages` (roles checked against the template's). special_tokens:
    bos_token, eos_token, ... as the template expects, and any other variable it reads (`tools`)."""
    try:
        return _compile(template).render(
            messages=check_messages(messages, template_roles(template)),
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from None
