"""bench/spec.py without a model: its prompts hold what each kind claims, and its markdown table
renders a result's cells and step costs."""

from __future__ import annotations

from xlaserve.bench import spec


def test_prompts_of_each_kind():
    copy = spec.prompts("copy", 3)
    assert len(copy) == 3 and all(spec.TEXT in p[0]["content"] for p in copy)
    assert len({p[0]["content"] for p in copy}) == 3  # rows differ
    edit = spec.prompts("edit", 2)[1][0]["content"]
    assert "Rename the variable x to y" in edit and "def moving_average_1(x, window):" in edit
    assert spec.prompts("chat", 5)[4][0]["content"].startswith(spec.CHAT[0])


def test_markdown_renders_cells_and_step_costs():
    mode = lambda tok_s, acc, length: {
        "tok_s": tok_s, "acceptance": acc, "mean_accepted_length": length, "identical": True
    }  # fmt: skip
    result = {
        "k": 4,
        "model": "smollm2",
        "max_tokens": 128,
        "date": "2026-12-03T00:00:00+00:00",
        "device": {"kind": "x86_64"},
        "machine": {"cpus": 2, "loadavg": [(2.0, 2.0, 2.0), (2.5, 2.1, 2.0)]},
        "command": "python -m xlaserve.bench.spec",
        "policy": {"schedule": ((8, 4, 1.5),)},
        "cells": [
            {
                "batch": 1,
                "kind": "copy",
                "modes": {
                    "off": mode(30.0, None, None),
                    "on": mode(60.0, 0.9, 4.5),
                    "forced": mode(58.0, 0.9, 4.5),
                },
                "speedup_on": 2.0,
                "speedup_forced": 58 / 30,
            }
        ],
        "step_costs": [{"batch": 1, "decode_s": 0.02, "verify_s": 0.03, "ratio": 1.5}],
    }
    md = spec.markdown(result)
    assert "| 1 | copy | 30 | 60 | 58 | 2 | 1.93 | 0.9 (0.9) | 4.5 (4.5) | True, True |" in md
    assert "| 1 | 20 | 30 | 1.5 |" in md
    assert "load average before 2, 2, 2, after 2.5, 2.1, 2" in md


def test_markdown_names_the_draft_model_and_its_propose_cost():
    mode = {"tok_s": 2.0, "acceptance": 0.8, "mean_accepted_length": 3.5, "identical": True}
    result = {
        "k": 4,
        "model": "qwen2.5-coder-1.5b",
        "draft_model": "qwen2.5-coder-0.5b",
        "max_tokens": 64,
        "date": "2026-12-03T00:00:00+00:00",
        "device": {"kind": "x86_64"},
        "machine": {"cpus": 2, "loadavg": [(2.0, 2.0, 2.0), (2.5, 2.1, 2.0)]},
        "command": "python -m xlaserve.bench.spec --draft-model qwen2.5-coder-0.5b",
        "policy": {"schedule": ((1, 4, 1.5),)},
        "cells": [
            {
                "batch": 1,
                "kind": "edit",
                "modes": {"off": dict(mode, tok_s=1.0), "on": mode, "forced": mode},
                "speedup_on": 2.0,
                "speedup_forced": 2.0,
            }
        ],
        "step_costs": [
            {"batch": 1, "decode_s": 0.2, "verify_s": 0.3, "ratio": 1.5, "propose_s": 0.2, "draft_ratio": 2.5}
        ],
    }
    md = spec.markdown(result)
    assert md.startswith("# Speculative decoding (draft model qwen2.5-coder-0.5b, K=4): qwen2.5-coder-1.5b")
    assert "| 1 | 200 | 300 | 1.5 | 200 | 2.5 |" in md
