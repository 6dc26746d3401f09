"""Chat templates: the model's Jinja template rendered the way HF `apply_chat_template` renders it
(sandboxed environment, trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` filter that keeps non-ASCII text)."""

from __future__ import annotations

import functools
import json
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


def check_messages(messages) -> list[dict]:
    """Messages as a list of {"role": str, "content": str}; ValueError names the bad field."""
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
        out.append(dict(m))
    return out


def render_chat(template: str, messages, *, add_generation_prompt: bool = True, **special_tokens) -> str:
    """The prompt text for `messages`. special_tokens: bos_token, eos_token, ... as the template expects."""
    try:
        return _compile(template).render(
            messages=check_messages(messages), add_generation_prompt=add_generation_prompt, **special_tokens
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from None
