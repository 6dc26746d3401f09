"""Our tokenizer (built from GGUF metadata) against HF transformers' tokenizer of the same file, and
our chat template rendering against HF's apply_chat_template."""

from __future__ import annotations

import pytest
import regex

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
def ours(llm):
    return llm.tokenizer


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
        ref = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert ours.encode_chat(messages) == list(ref)


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
