"""`xlaserve train-draft` end to end on a tiny random Llama saved as an xlaserve checkpoint: it
generates, trains a couple of steps, measures acceptance, saves a head that loads for that model;
and its prompt files (.txt, .jsonl) and bad input are read as documented."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from serving import mock_tokenizer

from xlaserve import cli
from xlaserve.checkpoints import draft_head as head_files
from xlaserve.checkpoints import orbax
from xlaserve.cli.train_draft import read_prompts, split
from xlaserve.runtime import models
from xlaserve.runtime.models import params
from xlaserve.runtime.models.presets import PRESETS

CFG = PRESETS["tiny"]
ENGINE_ARGS = ["--max-slots", "2", "--max-model-len", "64", "--prefill-buckets", "32", "--compile-cache", ""]


def save_tiny_checkpoint(path):
    """The tiny preset with random weights and a word-level tokenizer ("w0".."w511")."""
    weights = jax.tree.map(np.asarray, params.random_weights(models.declare(CFG), seed=1, dtype=np.float32))
    meta = {
        "format": orbax.FORMAT,
        "format_version": orbax.FORMAT_VERSION,
        "xlaserve_version": orbax.version(),
        "config": orbax.config_to_json(CFG),
        "dtype": "float32",
        "quantization": {"method": "none", "scheme": None, "group_size": None, "kinds": []},
        "source": {"name": "tiny", "sha256": "", "quantization": "none"},
    }
    orbax.save(path, weights, mock_tokenizer(CFG.vocab_size), meta)
    return weights


@pytest.mark.slow  # compiles a whole engine (~1 min on 2 cores), as the house rule puts in the slow lane
def test_train_draft_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    weights = save_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "w5 w9 w100 w7"}, {"prompt": "w42 w17 w17 w400"}, {"prompt": "w88 w12 w5 w61 w3"}]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "head"
    argv = ["train-draft", "--model", str(tmp_path / "tiny"), "--data", str(data), "--out", str(out)]
    run = [*argv, *ENGINE_ARGS, "--steps", "2", "--k", "2", "--window", "3", "--max-tokens", "12"]
    run += ["--holdout", "0.34", "--samples", "1"]
    assert cli.main([*run, "--output", "json"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("acceptance over") and "draft head" in printed[1] and "n-gram" in printed[2]
    summary = json.loads(printed[-1])
    assert summary["settings"]["k"] == 2 and summary["settings"]["steps"] == 2
    assert summary["settings"]["window"] == 3
    data_ = summary["data"]
    assert data_["train_prompts"] == 2 and data_["heldout_prompts"] == 1 and data_["samples"] == 1
    # the two training prompts answered greedily and sampled once: 4 answers of 12 tokens + prompts
    assert data_["train_tokens"] > 4 * 12 and 12 < data_["heldout_tokens"] < 2 * 12 + 12
    acc = summary["acceptance"]
    # one held-out prompt, 12 generated tokens: positions p = prompt end - 1 .. with 2 tokens after
    assert acc["positions"] == 12 - 2 and 0 <= acc["head_accepted"] <= 2 and 0 <= acc["ngram_accepted"] <= 2
    loaded, meta = head_files.load(out, CFG, weights)
    assert meta["acceptance"] == acc and meta["target"]["model"] == CFG.name
    assert jax.tree.leaves(loaded)
    # a second run does not overwrite the head unless told to
    assert cli.main(run) == 2
    assert f"--out {out} exists" in capsys.readouterr().err


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\nfirst prompt\n\n  second prompt  \n")
    assert read_prompts(txt) == ["first prompt", "second prompt"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert read_prompts(jsonl) == ["a", "b"]
    jsonl.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r'p\.jsonl:2: each line needs a non-empty "prompt" string'):
        read_prompts(jsonl)
    jsonl.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not JSON"):
        read_prompts(jsonl)
    txt.write_text("only one\n")
    with pytest.raises(ValueError, match=r"1 prompt\(s\); at least 2"):
        read_prompts(txt)
    with pytest.raises(ValueError, match="no such file"):
        read_prompts(tmp_path / "missing.txt")


def test_holdout_split():
    train, held = split(10, 0.2, seed=0)
    assert len(held) == 2 and sorted(train + held) == list(range(10))
    assert split(2, 0.9, seed=0)[0]  # at least one prompt stays for training
    with pytest.raises(ValueError, match=r"--holdout 1.5 must be in \(0, 1\)"):
        split(10, 1.5, seed=0)


def test_bad_settings_are_refused_naming_the_flag(tmp_path, capsys):
    argv = ["train-draft", "--out", str(tmp_path / "h"), "--data", str(tmp_path / "none.txt")]
    assert cli.main([*argv, "--k", "0"]) == 2
    assert "k=0" in capsys.readouterr().err
    assert cli.main([*argv, "--steps", "0"]) == 2
    assert "steps=0 must be an integer >= 1" in capsys.readouterr().err
    assert cli.main([*argv, "--max-tokens", "3"]) == 2
    assert "--max-tokens 3 must be at least k + 2 = 6" in capsys.readouterr().err
