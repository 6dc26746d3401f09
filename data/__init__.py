"""Text files that non-test code reads (the convert-time perplexity report, the eval benchmark),
shipped inside the package so that a non-editable install has them."""

from pathlib import Path

DIR = Path(__file__).resolve().parent
TWO_CITIES = DIR / "two_cities.txt"  # public domain: Dickens, A Tale of Two Cities, chapter 1
MC20 = DIR / "mc20.jsonl"  # a 20-question multiple-choice task (lm-eval's jsonl format)
DRAFT_PROMPTS = DIR / "draft_prompts.txt"  # chat and code prompts: `xlaserve train-draft`'s default data
