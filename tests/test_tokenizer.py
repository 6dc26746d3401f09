"""Our tokenizers (built from GGUF metadata) against HF transformers' tokenizer of the same file
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), and our chat template rendering against HF's
apply_chat_template:
- SmolLM2 and Qwen2.5-Coder (byte-level BPE): the real files;
- SentencePiece vocabularies under Gemma 2/3, Llama-2/Mistral and Phi-3 rules: small GGUF files made
  by spm_vocab.py (no such file can be pulled here).
Nothing is compiled: the tokenizers are built from the files' metadata."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import jinja2
import pytest
import regex
import spm_vocab

from xlaserve.checkpoints.gguf import open_reader, read_metadata
from xlaserve.checkpoints.loaded import CheckpointError
from xlaserve.checkpoints.tokenizer import tokenizer_from_gguf
from xlaserve.checkpoints.vocab import PRE_TOKENIZERS


def from_gguf(path: Path):
    return tokenizer_from_gguf(read_metadata(open_reader(path)), path)


def hf_from_gguf(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def hf_chat_ids(hf, messages) -> list[int]:
    ref = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref)


CORPUS = [
    "Hello world!",
    "  leading spaces",
    "tabs\tand\nnewlines\r\n",
    "trailing   ",
    "naïve café über Straße",
    "日本語のテキストと中文",
    "emoji 🤖🎉 ok 👩‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>raw special in text<|endoftext|>",
    "price: $1,234.56 (3rd of 42)",
    "x\u00a0y non-breaking",
    "multiple\n\n\nnewlines\n \n",
    "don't I'll we've THEY'RE",
    "κόσμε Ελληνικά العربية עברית",
    "\u200bzero width and a\u0301 combining",
    "    def f(x):\n        return x ** 2  # four spaces",
    "1234567890",
    "",
]


@pytest.fixture(scope="module")
def ours(model_path):
    return from_gguf(model_path)


@pytest.mark.parametrize("text", CORPUS)
def test_ids_and_text_equal_hf(ours, hf_tokenizer, text):
    ids = ours.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def llama_cpp_smollm_split(text: str) -> list[str]:
    """llama.cpp's pre-tokenization for `tokenizer.ggml.pre = smollm` (llama-vocab.cpp): each digit
    on its own, then the GPT-2 pattern over the rest."""
    pieces = []
    for part in regex.split(r"(\p{N})", text):
        if part:
            pieces += [part] if regex.fullmatch(r"\p{N}", part) else regex.findall(GPT2_SPLIT, part)
    return pieces


@pytest.mark.parametrize("text", ["a  12 b", "x\t\t7", "total:   2024"])
def test_spaces_before_digits_follow_llama_cpp(ours, hf_tokenizer, text):
    """The one place we differ from transformers' GGUF tokenizer: it drops SmolLM's "digits apart"
    rule, so a run of spaces before a digit splits differently. We follow llama.cpp (and SmolLM2's
    own tokenizer.json); the expected ids come from an independent statement of that rule."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model = hf_tokenizer.backend_tokenizer.model
    expected = []
    for piece in llama_cpp_smollm_split(text):
        ((spelled, _),) = byte_level.pre_tokenize_str(piece)
        expected += [t.id for t in model.tokenize(spelled)]
    assert ours.encode(text) == expected
    assert ours.encode(text) != hf_tokenizer.encode(text)


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in français: «vert»?"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_hf(ours, hf_tokenizer, messages, add_generation_prompt):
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if add_generation_prompt:
        assert ours.encode_chat(messages) == hf_chat_ids(hf_tokenizer, messages)


@pytest.mark.parametrize(
    "messages, field",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], "messages[1].role"),
        ([{"role": "", "content": "a"}], "messages[0].role"),
        ([["user", "a"]], "messages[0]"),
    ],
)
def test_bad_messages_name_the_field(ours, messages, field):
    with pytest.raises(ValueError, match=regex.escape(field)):
        ours.apply_chat_template(messages)


# -- Qwen2.5 (byte-level BPE, tokenizer.ggml.pre = qwen2) ------------------------------------------

# Texts that NFC changes: Qwen2's tokenizer.json normalizes to NFC, but neither llama.cpp nor
# transformers' GGUF tokenizer does, so these must come out as HF's, unnormalized.
NFC_CHANGES = [
    "cafe\u0301 vs café",  # e + combining acute -> é (3 bytes -> 2)
    "\u212b\u2126 Angstrom and Ohm signs",  # singletons -> Å, Ω
    "\u1112\u1161\u11ab\u1100\u1173\u11af jamo",  # conjoining jamo -> 한글
    "\u0344\u0958",  # decompose on NFC: 2 bytes -> 4 and 3 -> 6
]
QWEN_CORPUS = [
    *CORPUS,
    *NFC_CHANGES,
    "def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(x)]\n\treturn None\n",
    "class A:\n    def __init__(self):\n        self.x = {'a': 1}  # comment\n",
    "3.14159 1e-9 0x1F 2024-01-01 12345678901234567890 -42",
    "a \t \n\n\n   b     c\r\n\r\n\t\t",
    "IT'S ME'LL 'Ve",
    "한국어 텍스트, русский текст, Tiếng Việt, हिन्दी",
    "🤖🤖🤖 👍🏽 🇫🇷 e\u0301\u0301",
    '<tool_call>\n{"name": "f"}\n</tool_call>',
    "<|fim_prefix|>def f():\n    <|fim_suffix|>\n<|fim_middle|>",
    "<|im_start|><|im_end|><|endoftext|>",
]
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def qwen(qwen_path):
    return from_gguf(qwen_path)


@pytest.fixture(scope="module")
def qwen_hf(qwen_path):
    return hf_from_gguf(qwen_path)


@pytest.mark.parametrize("text", QWEN_CORPUS)
def test_qwen_ids_and_text_equal_hf(qwen, qwen_hf, text):
    ids = qwen.encode(text)
    assert ids == qwen_hf.encode(text, add_special_tokens=True)
    assert (
        qwen.decode(ids, skip_special_tokens=False) == qwen_hf.decode(ids, skip_special_tokens=False) == text
    )
    assert qwen.decode(ids) == qwen_hf.decode(ids, skip_special_tokens=True)
    assert len(text.encode()) <= len(ids) * qwen.max_token_bytes


def test_qwen_does_not_normalize_and_the_byte_bound_holds(qwen, qwen_hf):
    """No NFC: a text and its NFC form are different token sequences, each decoding to itself; so
    max_token_bytes stays the longest vocabulary entry (a spelled character is one byte)."""
    for text in NFC_CHANGES:
        nfc = unicodedata.normalize("NFC", text)
        assert nfc != text and qwen.encode(text) != qwen.encode(nfc)
        assert qwen.decode(qwen.encode(nfc)) == nfc
    assert qwen.backend.normalizer is None
    assert qwen.max_token_bytes == max(map(len, qwen_hf.backend_tokenizer.get_vocab()))


def test_qwen_special_tokens_bos_and_eos(qwen, qwen_hf):
    for text in QWEN_SPECIALS:
        (i,) = qwen.encode(text)
        assert i == qwen_hf.convert_tokens_to_ids(text)
        assert i in qwen.special_ids and qwen.token_text(i) == text
        assert qwen.decode([i]) == qwen_hf.decode([i], skip_special_tokens=True) == ""
    assert (
        (qwen.bos_token, qwen.eos_token)
        == (qwen_hf.bos_token, qwen_hf.eos_token)
        == ("<|endoftext|>", "<|im_end|>")
    )
    assert qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)  # add_bos_token false
    assert qwen.vocab_size == len(qwen_hf)
    assert qwen.special_ids == {i for i, t in qwen_hf.added_tokens_decoder.items() if t.special}


def test_qwen_token_text_equals_hf(qwen, qwen_hf):
    ids = [*range(0, qwen.vocab_size, 997), *qwen.special_ids, 151657, 151665]
    assert [qwen.token_text(i) for i in ids] == [qwen_hf.decode([i], skip_special_tokens=False) for i in ids]


QWEN_CONVERSATIONS = [
    *CONVERSATIONS,
    [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Sort a list.\n\tIn place?"},
        {"role": "assistant", "content": "```python\nxs.sort()\n```"},
        {"role": "user", "content": "日本語で説明して 🤖"},
    ],
]


@pytest.mark.parametrize("messages", QWEN_CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen_chat_template_equals_hf(qwen, qwen_hf, messages, add_generation_prompt):
    """Qwen's template has a `tools` branch; without tools it renders as HF renders it (with Qwen's
    default system message when there is none)."""
    assert "if tools" in qwen.chat_template
    text = qwen.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == qwen_hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if add_generation_prompt:
        assert qwen.encode_chat(messages) == hf_chat_ids(qwen_hf, messages)


def test_pre_tokenizers_match_transformers():
    """Every pre-tokenizer name transformers' GGUF reader also knows splits as it does (smollm is
    not among them: it follows llama.cpp, see test_spaces_before_digits_follow_llama_cpp)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    both = PRE_TOKENIZERS.keys() & GGUF_PRE_TOKENIZER_SPLITS.keys()
    assert {"qwen2", "deepseek-r1-qwen", "qwen35", "llama3", "llama-bpe"} <= both
    for name in both:
        hf = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[name]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        assert json.loads(PRE_TOKENIZERS[name]().__getstate__()) == json.loads(hf.__getstate__()), name


# -- SentencePiece vocabularies (spm_vocab.py) -----------------------------------------------------

SPM_ARCHS = ["gemma3", "gemma2", "llama", "phi3"]
SPM_CORPUS = [
    "It was the best of times, it was the worst of times.",
    "Hello world!",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple   spaces  inside    here",
    "line one\nline two\n\n\nafter blank lines\n",
    "\ttabs\tand\r\nCRLF",
    " ",
    "  ",
    "",
    "日本語のテキスト 🤖🎉 naïve ß € Ω",  # not in the vocabulary: byte fallback
    "x\u00a0y\u200bz e\u0301",
    "a literal ▁ and ▁▁ in the text",
    "<0x41> is text, not a byte token",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after bos<eos>",
    "<s>[INST] hi [/INST] ok</s>",
    "<unk> <pad> <mask> <think> <unused0>",
    "spaces before a special  <end_of_turn>  and after",
    "1234567890 3.14",
]


@pytest.fixture(scope="module", params=SPM_ARCHS)
def spm(request, tmp_path_factory):
    """(ours, HF's) for a SentencePiece GGUF under the architecture's rules."""
    path = spm_vocab.write(tmp_path_factory.mktemp("spm") / f"{request.param}.gguf", request.param)
    return from_gguf(path), hf_from_gguf(path)


@pytest.mark.parametrize("text", SPM_CORPUS)
def test_spm_ids_and_text_equal_hf(spm, text):
    ours, hf = spm
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert len(text.encode()) <= len(ids) * ours.max_token_bytes


def test_spm_merges_and_pipeline_equal_transformers(spm):
    """The merges we derive from the scores (Gemma: from the token order) are transformers' own, and
    so are the normalizer, pre-tokenizer and decoder around them."""
    ours, hf = spm
    mine, theirs = json.loads(ours.backend.to_str()), json.loads(hf.backend_tokenizer.to_str())
    assert len(mine["model"]["merges"]) > 500
    for key in ("model", "normalizer", "pre_tokenizer", "decoder"):
        assert mine[key] == theirs[key], key


def test_spm_special_tokens_and_bos(spm):
    ours, hf = spm
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token)
    assert ours.encode("x")[0] == hf.bos_token_id  # add_bos_token true
    assert ours.encode("x", add_special_tokens=False) == hf.encode("x", add_special_tokens=False)
    for i in hf.added_tokens_decoder:  # control, user-defined and the named special tokens
        assert ours.token_text(i) == hf.decode([i], skip_special_tokens=False)
        assert ours.decode([i]) == hf.decode([i], skip_special_tokens=True)
    assert ours.vocab_size == len(hf)


@pytest.mark.parametrize("add_bos", [None, False])
def test_spm_add_bos_follows_the_file_and_defaults_to_true(tmp_path, add_bos):
    path = spm_vocab.write(tmp_path / "llama.gguf", "llama", add_bos=add_bos)
    ours, hf = from_gguf(path), hf_from_gguf(path)
    assert ours.encode("a b") == hf.encode("a b")
    assert (ours.encode("a b")[0] == hf.bos_token_id) == (add_bos is None)


def test_spm_without_every_byte_token_has_no_byte_bound(tmp_path):
    """A character missing from the vocabulary and from the byte tokens becomes the unknown token, and
    a run of them one token: no number of bytes per token is an upper bound any more."""
    path = spm_vocab.write(tmp_path / "gemma3.gguf", "gemma3")
    meta = read_metadata(open_reader(path))
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[tokens.index("<0xE6>")] = "<no byte>"
    tok = tokenizer_from_gguf({**meta, "tokenizer.ggml.tokens": tokens}, path)
    assert tok.max_token_bytes is None
    assert tok.encode("日本日本日本", add_special_tokens=False) == [tokens.index("<unk>")]


SPM_CONVERSATIONS = [
    *CONVERSATIONS,
    [
        {"role": "user", "content": "  padded question \n"},
        {"role": "assistant", "content": "An answer."},
        {"role": "user", "content": "日本語? 🤖"},
        {"role": "assistant", "content": "はい"},
    ],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],  # not alternating: refused
]


@pytest.mark.parametrize("messages", SPM_CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_spm_chat_template_equals_hf(spm, messages, add_generation_prompt):
    """Gemma 3's template (Gemma files) and Mistral's (the others); a conversation a template
    refuses is refused by both."""
    ours, hf = spm
    try:
        ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as e:
        with pytest.raises(ValueError, match=regex.escape(str(e))):
            ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == ref
    if add_generation_prompt:
        assert ours.encode_chat(messages) == hf_chat_ids(hf, messages)


# -- unsupported vocabularies ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "t5", "gemma4", None])
def test_unsupported_tokenizer_model_is_named(kind):
    meta = {"tokenizer.ggml.model": kind, "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(CheckpointError) as e:
        tokenizer_from_gguf(meta, Path("/models/x.gguf"))
    assert str(e.value) == (
        f"/models/x.gguf: tokenizer model {kind!r} is not supported "
        "(supported: gpt2 (byte-level BPE), llama (SentencePiece BPE))"
    )


def test_unsupported_pre_tokenizer_is_named():
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "deepseek-llm",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
    }
    with pytest.raises(CheckpointError, match=r"^/models/x\.gguf: pre-tokenizer 'deepseek-llm' is not") as e:
        tokenizer_from_gguf(meta, Path("/models/x.gguf"))
    assert "(supported: " in str(e.value) and "qwen2" in str(e.value) and "smollm" in str(e.value)
