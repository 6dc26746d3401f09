"""Test material: a small SentencePiece-style vocabulary in a tokenizer-only GGUF file.

No SentencePiece GGUF (Gemma, Llama-2, Mistral, Phi-3) can be pulled here, so we make one the way
llama.cpp's converter writes such files: `tokenizer.ggml.model = "llama"`, the pieces spelled with
"▁" for a space, a score per piece, token types (normal, unknown, control, user-defined, unused,
byte) and the 256 byte tokens `<0x00>`..`<0xFF>` for byte fallback. No merges: a reader derives
them from the scores (or, for Gemma, from the order of the pieces).

The pieces are learned by BPE (HF `tokenizers`) on Dickens (data/two_cities.txt): each merge's
result, then the characters of the text, scored by that order (-rank) as SentencePiece scores its
BPE pieces. Gemma files get scores that do NOT follow that order (all zero), as Gemma's do not: only
the position of a piece in the file gives its merge order there. Gemma files also store pieces of
two or more spaces as real spaces ("  "), as Gemma GGUFs do.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from xlaserve.data import TWO_CITIES

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Gemma 3's chat template (no system role: a system message is put before the first user turn).
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Mistral-7B-Instruct's template (Llama-2 style [INST] turns).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def learned_pieces(vocab_size: int = 600) -> list[str]:
    """SentencePiece-style pieces learned on Dickens: merge results in merge order, then the
    characters ("▁" for a space)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    text = TWO_CITIES.read_text()
    bpe.train_from_iterator(text.splitlines(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merged = ["".join(m) for m in model["merges"]]
    chars = [t for t in model["vocab"] if len(t) == 1]
    return list(dict.fromkeys([*merged, *chars, "\n", "\t"]))


def _specials(arch: str) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """The tokens before the learned pieces, with their types, and the special token ids."""
    if arch.startswith("gemma"):
        head = [
            ("<pad>", CONTROL),
            ("<eos>", CONTROL),
            ("<bos>", CONTROL),
            ("<unk>", UNKNOWN),
            ("<mask>", USER_DEFINED),
            ("<unused0>", UNUSED),
            ("<start_of_turn>", CONTROL),
            ("<end_of_turn>", CONTROL),
            ("<think>", USER_DEFINED),
            ("  ", USER_DEFINED),  # Gemma files store space runs as spaces
            ("   ", NORMAL),
        ]
        ids = {"bos": 2, "eos": 1, "unknown": 3, "padding": 0}
    else:
        head = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)]
        ids = {"bos": 1, "eos": 2, "unknown": 0}
    return head, ids


def write(path: Path, arch: str = "gemma3", add_bos: bool | None = True) -> Path:
    """A tokenizer-only GGUF of architecture `arch` ("gemma2", "gemma3", "llama", "phi3") at path.
    add_bos None leaves `tokenizer.ggml.add_bos_token` out (older files: readers default to True)."""
    head, ids = _specials(arch)
    gemma = arch.startswith("gemma")
    byte_tokens = [(f"<0x{b:02X}>", BYTE) for b in range(256)]
    learned = learned_pieces()
    if not gemma:  # Llama-2 puts the bytes right after the three specials, Gemma after its pieces
        entries = head + byte_tokens + [(p, NORMAL) for p in learned]
    else:
        entries = head + [(p, NORMAL) for p in learned] + byte_tokens
    tokens = [t for t, _ in entries]
    types = [ty for _, ty in entries]
    rank = {p: i for i, p in enumerate(learned)}
    scores = [0.0 if gemma or t not in rank else -float(rank[t]) for t in tokens]

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    writer.add_unk_token_id(ids["unknown"])
    if "padding" in ids:
        writer.add_pad_token_id(ids["padding"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    writer.add_chat_template(GEMMA_TEMPLATE if gemma else MISTRAL_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
