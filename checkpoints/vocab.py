"""A GGUF file's vocabulary as an HF `tokenizers` backend, built the way transformers builds it from
the same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, transformers/integrations/gguf),
which is the reference our tests compare against.

Two kinds of vocabulary (`tokenizer.ggml.model`):

- "gpt2", byte-level BPE: the tokens spelled in GPT-2's byte alphabet, the file's merges, and the
  text split before BPE by the regex llama.cpp uses for the file's `tokenizer.ggml.pre`
  (llama-vocab.cpp). No normalizer: Qwen2's own tokenizer.json has NFC, but neither llama.cpp nor
  transformers' GGUF tokenizer applies it, so text is tokenized as it comes.
- "llama", SentencePiece BPE (Llama-2, Mistral, Gemma 2/3, Phi-3): "▁" stands for a space, unknown
  characters fall back to the byte tokens <0x00>..<0xFF>, and the file has no merges: they are
  derived from the vocabulary (`spm_merges`). How spaces become "▁" depends on the architecture:
    llama (and any other):  pre-tokenizer Metaspace, "▁" put before the text (not after a special
                            token); the decoder strips the one leading space that adds
    phi3:                   a normalizer puts "▁" before every piece of text (after special tokens
                            too) and turns spaces into "▁"; decoded as llama
    gemma, gemma2, gemma3:  spaces become "▁", nothing is put before the text, nothing stripped;
                            tokens of 2+ spaces, stored as spaces, are respelled "▁▁"..; the merge
                            order is the order of the tokens in the file, not their scores.

Control tokens (type 3) and the tokens the file names as BOS, EOS, unknown and padding become
special added tokens; user-defined ones (type 4) plain added tokens, matched whole in the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from xlaserve.checkpoints.loaded import CheckpointError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's tokenizer.json (llama.cpp spells the case-insensitive contractions out as [sS] etc.).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5's: combining marks (\p{M}) stay with the letters they follow.
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(pattern: str):
    def build():
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


# tokenizer.ggml.pre -> pre-tokenizer, following llama.cpp's llama-vocab.cpp. Names llama.cpp maps
# to one of these regexes but transformers' GGUF reader does not (stablelm2, hunyuan, solar-open)
# are left out: there is no reference to test them against.
PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), _gpt2),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), _digits_then_gpt2
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx", "pixtral"),
        _split_then_bytes(_LLAMA3_SPLIT),
    ),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _split_then_bytes(_QWEN2_SPLIT)
    ),
    "qwen35": _split_then_bytes(_QWEN35_SPLIT),
}

GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
KINDS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def spm_merges(tokens: list[str], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies (transformers' `generate_merges`): every
    split of a token into two tokens, best score first, then the longer left piece, then the longer
    right one; equal keys keep vocabulary order (token by token, splits by the ids of the pieces)."""
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in scores.items():
        splits = [
            (token[:k], token[k:], score)
            for k in range(1, len(token))
            if token[:k] in ids and token[k:] in ids
        ]
        merges += sorted(splits, key=lambda m: (ids[m[0]], ids[m[1]]))
    merges = sorted(merges, key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


@dataclass(frozen=True)
class Backend:
    """A GGUF vocabulary built: the backend with its special tokens and BOS/EOS rule; the BOS and EOS
    token texts; the most bytes of text one token can stand for (None: no bound)."""

    tokenizer: tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    max_token_bytes: int | None


def _byte_level(meta: dict, tokens: list[str], path) -> tuple[tokenizers.Tokenizer, list[str]]:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            path, f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise CheckpointError(path, "the BPE tokenizer has no merges (tokenizer.ggml.merges is missing)")
    alphabet = bytes_to_unicode()
    letters = set(alphabet.values())
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode()) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _sentencepiece(meta: dict, tokens: list[str], path) -> tuple[tokenizers.Tokenizer, list[str]]:
    arch = meta.get("general.architecture")
    if arch in GEMMA_ARCHS:
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = {t: -i for i, t in enumerate(tokens)}
    else:
        values = meta.get("tokenizer.ggml.scores")
        if values is None or len(values) < len(tokens):
            raise CheckpointError(
                path, "the SentencePiece tokenizer has no score per token (tokenizer.ggml.scores)"
            )
        scores = dict(zip(tokens, values, strict=False))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = spm_merges(tokens, scores)
    unk = "<unk>" if arch in GEMMA_ARCHS and "<unk>" in vocab else None
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    spaces = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if arch in GEMMA_ARCHS:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence(spaces)
        return backend, tokens
    if arch == "phi3":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([*spaces, decoders.Strip(" ", 1, 0)])
    return backend, tokens


def backend_from_gguf(meta: dict, path) -> Backend:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(path, "the file has no tokenizer (tokenizer.ggml.tokens is missing)")
    if kind not in KINDS:
        supported = ", ".join(f"{k} ({v})" for k, v in KINDS.items())
        raise CheckpointError(path, f"tokenizer model {kind!r} is not supported (supported: {supported})")
    build = _byte_level if kind == "gpt2" else _sentencepiece
    backend, spelled = build(meta, list(tokens), path)
    vocab = backend.get_vocab()

    def index(key: str) -> int | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return i if isinstance(i, int) and 0 <= i < len(spelled) else None

    def token(key: str) -> str | None:
        i = index(key)
        return None if i is None else spelled[i]

    # A byte-level token that had to be respelled is not in the byte alphabet, so it cannot be a
    # real token (llama.cpp mislabels some as control): transformers leaves those out, and so do we.
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    named = [index(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")]
    chosen = [i for i, ty in enumerate(types) if ty == CONTROL] + [i for i in named if i is not None]
    special = list(dict.fromkeys(spelled[i] for i in chosen if spelled[i] == tokens[i]))
    if meta.get("general.architecture") in GEMMA_ARCHS and "<mask>" in vocab and "<mask>" not in special:
        special.append("<mask>")  # transformers' GemmaTokenizer always has it as its mask token
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == USER_DEFINED and t in vocab]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user if t not in special])

    bos, eos = token("bos_token_id"), token("eos_token_id")
    # llama.cpp and transformers add BOS to a SentencePiece vocabulary that does not say otherwise.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and eos is not None
    if add_bos or add_eos:
        pieces = ([bos] if add_bos else []) + ["$A"] + ([eos] if add_eos else [])
        ids = [(t, vocab[t]) for t in dict.fromkeys(p for p in pieces if p != "$A")]
        backend.post_processor = processors.TemplateProcessing(single=" ".join(pieces), special_tokens=ids)
    return Backend(backend, bos, eos, _max_token_bytes(kind, backend, spelled))


def _max_token_bytes(kind: str, backend: tokenizers.Tokenizer, spelled: list[str]) -> int | None:
    """An added token (special, user-defined) stands for its own text. Otherwise:
    byte-level: each spelled character is one byte of text, and each byte of text lands in exactly
    one token, so the longest token;
    SentencePiece: the longest token in UTF-8, when all 256 byte tokens are there. A token's text is
    the text it stands for, except that "▁" (3 bytes) stands for a space or for nothing (the "▁" put
    before the text); a character outside the vocabulary becomes byte tokens, one per byte, so no
    text is dropped. Without every byte token, unknown text is fused into one unknown token: no
    bound."""
    added = [len(t.content.encode()) for t in backend.get_added_tokens_decoder().values()]
    if kind == "gpt2":
        return max([*map(len, spelled), *added])
    vocab = backend.get_vocab(with_added_tokens=True)
    if any(f"<0x{b:02X}>" not in vocab for b in range(256)):
        return None
    return max(len(t.encode()) for t in vocab)
