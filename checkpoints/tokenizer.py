"""Tokenizers: HF `tokenizers` built from GGUF metadata (vocab.py), or loaded from an HF
`tokenizer.json`.

`max_token_bytes` is the most bytes of text one token can stand for, where that is bounded; None
where it is not. A text of more than n × max_token_bytes bytes then has more than n tokens, which
lets a prompt be refused by its size before it is tokenized. It must stay a true upper bound:
- byte-level BPE with no normalizer: the longest vocabulary entry, each byte of text landing in
  exactly one token. (A byte missing from the vocabulary is dropped, as HF's tokenizer drops it:
  SmolLM2 lacks six ASCII control characters. Only a text made mostly of such bytes could be
  refused and still fit, and the model would never see it.) Qwen2's GGUF vocabulary is of this kind:
  its tokenizer.json normalizes to NFC, which can shrink text (e + U+0301 -> é, 3 bytes -> 2), but
  llama.cpp and transformers' GGUF tokenizer do not normalize, and neither do we.
- SentencePiece BPE with all 256 byte tokens: the longest entry in UTF-8 (vocab.py says why).
- None where text can shrink on its way to tokens (a normalizer such as NFC, unknown-token
  fallbacks that fuse unknown text into one token).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import tokenizers
from tokenizers import decoders

from xlaserve.checkpoints.chat import check_messages, escape_specials, render_chat
from xlaserve.checkpoints.loaded import CheckpointError
from xlaserve.checkpoints.vocab import backend_from_gguf


class Tokenizer:
    """Text <-> ids, the model's special tokens and its chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        source: str,
        max_token_bytes: int | None = None,
    ):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.source = source
        self.max_token_bytes = max_token_bytes
        specials = {i: tok.content for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        self.special_ids = frozenset(specials)
        self._special_id = {text: i for i, text in specials.items()}
        # Special-token texts, longest first (the tokenizer matches the longest at a position).
        alternatives = "|".join(re.escape(t) for t in sorted(self._special_id, key=len, reverse=True))
        self._special = re.compile(f"({alternatives})") if alternatives else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None) -> str:
        """tools: OpenAI-style tool definitions, passed to the template as `tools` (as HF does) when
        given; a template that does not read them ignores them."""
        if not self.chat_template:
            raise ValueError(f"{self.source}: the model has no chat template; pass plain prompts instead")
        extra = {} if tools is None else {"tools": tools}
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra,
        )

    def encode_chat(self, messages, allow_special_tokens: bool = False, tools=None) -> list[int]:
        """Ids of the rendered chat; the template writes any BOS itself, so none is added.

        Special-token text inside a message ("<|im_start|>" in a content) is encoded as the plain
        text it is, so a message cannot forge a turn or a control token (what OpenAI's tokenizer
        does); allow_special_tokens=True encodes it as the special token. A chat without such text
        is encoded exactly as before: the rendered prompt in one call. Strings nested in messages
        (tool calls) and in `tools` (apply_chat_template) are escaped the same way."""
        if allow_special_tokens or self._special is None:
            return self.encode(self.apply_chat_template(messages, tools=tools), add_special_tokens=False)
        (escaped, tools), swapped, mark = escape_specials((check_messages(messages), tools), self._special)
        text = self.apply_chat_template(escaped, tools=tools)
        if not swapped:
            return self.encode(text, add_special_tokens=False)
        # The tokenizer splits text at special tokens and encodes the pieces between them on their
        # own; so do that here with the template's special tokens (all that are left), and encode
        # each piece, its swapped texts put back, with special tokens not recognised.
        unswap = re.compile(f"{mark}(\\d+){mark}")
        ids = []
        for i, piece in enumerate(self._special.split(text)):
            if i % 2:
                ids.append(self._special_id[piece])
            elif piece:
                plain = unswap.sub(lambda m: swapped[int(m.group(1))], piece)
                ids += self._plain.encode(plain, add_special_tokens=False).ids
        return ids

    @functools.cached_property
    def _plain(self) -> tokenizers.Tokenizer:
        """The backend with special tokens encoded as text (a copy: the setting is per tokenizer)."""
        plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain


def tokenizer_from_gguf(meta: dict, path) -> Tokenizer:
    built = backend_from_gguf(meta, path)
    return Tokenizer(
        built.tokenizer,
        bos_token=built.bos_token,
        eos_token=built.eos_token,
        chat_template=meta.get("tokenizer.chat_template"),
        source=str(path),
        max_token_bytes=built.max_token_bytes,
    )


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_from_hf_dir(directory: Path) -> Tokenizer:
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(file, "tokenizer file is missing (xlaserve needs tokenizer.json)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:
        raise CheckpointError(file, f"cannot read tokenizer: {e}") from None
    config = {}
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(config_file, f"invalid JSON: {e}") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja_file = directory / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    return Tokenizer(
        backend,
        bos_token=_token_content(config.get("bos_token")),
        eos_token=_token_content(config.get("eos_token")),
        chat_template=template,
        source=str(directory),
        max_token_bytes=_byte_level_bound(backend),
    )


def _byte_level_bound(backend: tokenizers.Tokenizer) -> int | None:
    """max_token_bytes of a tokenizer.json: for byte-level BPE with no normalizer, the longest
    entry's UTF-8 length (an upper bound: a spelled character stands for one byte but may take two
    in UTF-8); None otherwise."""
    if backend.normalizer is not None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    return max(len(t.encode("utf-8")) for t in backend.get_vocab(with_added_tokens=True))
