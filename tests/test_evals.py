"""Evals: log-likelihoods, greedy flags and rolling perplexity against HF transformers; lm-eval on
two local tasks (20 multiple-choice questions, a perplexity text) through our backend and through
lm-eval's own HF backend in the same test; the gRPC backend; `xlaserve eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import background
import numpy as np
import pytest
from helpers import LOGIT_ATOL, TEST_ENGINE, default_model, free_port, hf_logits

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from xlaserve.data import MC20
from xlaserve.evals.lm_eval_backend import XlaserveGrpcLM, XlaserveLM
from xlaserve.runtime.scoring import rolling_windows

FIXTURES = Path(__file__).parent / "fixtures"

MAX_LENGTH = 64  # small, so the perplexity text spans several windows (the last one partial)
PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " London"),
    ("Question: How many legs does a spider have?\nAnswer:", " Eight"),
    ("def add(a, b):\n    return", " a + b"),
    ("Le chat est sur la", " table."),
]


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_scores_match_hf(llm, hf_model):
    results = llm.score(PAIRS)
    for (context, continuation), r in zip(PAIRS, results, strict=True):
        ctx = llm.tokenizer.encode(context)
        ids = ctx + llm.tokenizer.encode(continuation, add_special_tokens=False)
        ref = log_softmax(hf_logits(hf_model, ids))
        want = [ref[len(ctx) - 1 + i, t] for i, t in enumerate(ids[len(ctx) :])]
        assert r.token_ids == ids[len(ctx) :]
        np.testing.assert_allclose(r.logprobs, want, atol=LOGIT_ATOL)
        assert r.is_greedy == [int(np.argmax(ref[len(ctx) - 1 + i])) == t for i, t in enumerate(r.token_ids)]
    assert results[0].all_greedy and results[0].sum_logprob > results[1].sum_logprob


def test_batched_scoring_with_a_shared_context_matches_hf(llm, hf_model):
    """Several continuations of one long context (several KV pages, shareable through the prefix
    cache) scored together: rows of one batched call, each equal to HF on its own sequence."""
    context = (
        "The river runs from the mountains through three valleys and a long plain before it reaches "
        "the sea, and along its banks stand old mills, bridges and towns. Its largest city is"
    )
    pairs = [(context, c) for c in (" Paris.", " a port with a cathedral.", " London.", " unknown.")]
    results = llm.score(pairs)
    ctx = llm.tokenizer.encode(context)
    assert len(ctx) > 2 * llm.engine_config.page_size
    for (_, continuation), r in zip(pairs, results, strict=True):
        ids = ctx + llm.tokenizer.encode(continuation, add_special_tokens=False)
        ref = log_softmax(hf_logits(hf_model, ids))
        want = [ref[len(ctx) - 1 + i, t] for i, t in enumerate(ids[len(ctx) :])]
        np.testing.assert_allclose(r.logprobs, want, atol=LOGIT_ATOL)


def test_rolling_windows_are_lm_evals():
    """`rolling_windows` (what LLM.score_rolling scores) cuts every length the way lm-eval's
    get_rolling_token_windows + make_disjoint_window do."""
    for window in range(1, 9):
        for n in range(0, 40):
            ids = list(range(100, 100 + n))
            want = [
                (ctx + cont, len(ctx))
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, 7, window, 1))
            ]
            assert rolling_windows(ids, window, 7) == want, (window, n)


def test_rolling_loglikelihood_matches_hf(llm, hf_model):
    text = json.loads((FIXTURES / "ppl.jsonl").read_text().splitlines()[0])["text"]
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 2 * MAX_LENGTH  # several windows
    (ours,) = llm.score_rolling([text], window=MAX_LENGTH)
    assert ours.token_ids == ids
    want = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, 1, MAX_LENGTH, 1)):
        ref = log_softmax(hf_logits(hf_model, ctx + cont))
        want += sum(ref[len(ctx) - 1 + i, t] for i, t in enumerate(cont))
    assert abs(ours.sum_logprob - want) < LOGIT_ATOL * len(ids)


def task_dir(tmp_path) -> Path:
    """The two local tasks, as lm-eval YAML with absolute data paths (no hub access)."""
    mc = f"""task: xlaserve_mc20
dataset_path: json
dataset_kwargs:
  data_files:
    test: {MC20}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    ppl = f"""task: xlaserve_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {FIXTURES / "ppl.jsonl"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "mc20.yaml").write_text(mc)
    (tmp_path / "ppl.yaml").write_text(ppl)
    return tmp_path


@pytest.fixture(scope="module")
def hf_lm(hf_model, hf_tokenizer):
    return HFLM(
        pretrained=hf_model, tokenizer=hf_tokenizer, max_length=MAX_LENGTH, batch_size=8, device="cpu"
    )


@pytest.fixture(scope="module")
def ours_lm(llm):
    return XlaserveLM(llm=llm, max_length=MAX_LENGTH)


def evaluate(lm, tmp_path):
    out = simple_evaluate(
        model=lm,
        tasks=["xlaserve_mc20", "xlaserve_ppl"],
        task_manager=TaskManager(include_path=str(task_dir(tmp_path))),
        log_samples=False,
    )
    return out["results"]


def test_lm_eval_tasks_score_as_the_hf_backend(ours_lm, hf_lm, tmp_path):
    ours, theirs = evaluate(ours_lm, tmp_path / "a"), evaluate(hf_lm, tmp_path / "b")
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["xlaserve_mc20"][metric] == theirs["xlaserve_mc20"][metric], metric
    assert 0 < ours["xlaserve_mc20"]["acc,none"] <= 1
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["xlaserve_ppl"][metric] == pytest.approx(theirs["xlaserve_ppl"][metric], rel=1e-4), metric


def requests(kind: str, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def test_generate_until_equals_the_hf_backend(ours_lm, hf_lm):
    reqs = requests(
        "generate_until",
        [
            ("Question: What is the capital of France?\nAnswer:", {"until": ["\n"], "max_gen_toks": 16}),
            ("List three colours:", {"until": ["."], "max_gen_toks": 24}),
            ("def square(x):\n", {"until": ["\n\n"], "max_gen_toks": 32}),
        ],
    )
    assert ours_lm.generate_until(reqs) == hf_lm.generate_until(reqs)


def test_grpc_backend_equals_the_in_process_one(llm, ours_lm):
    from xlaserve.serve.server import Server

    ll = requests("loglikelihood", PAIRS)
    rolling = requests("loglikelihood_rolling", [("The quick brown fox jumps over the lazy dog. " * 20,)])
    gen = requests("generate_until", [("Name a fruit:", {"until": ["\n"], "max_gen_toks": 8})])
    expected = (
        ours_lm.loglikelihood(ll),
        ours_lm.loglikelihood_rolling(rolling),
        ours_lm.generate_until(gen),
    )
    server = Server(port=0).start()
    server.attach(llm)
    try:
        remote = XlaserveGrpcLM(server=f"127.0.0.1:{server.port}", max_length=MAX_LENGTH, chunk=2)
        got = (remote.loglikelihood(ll), remote.loglikelihood_rolling(rolling), remote.generate_until(gen))
    finally:
        server.stop()
    for (a, ga), (b, gb) in zip(got[0], expected[0], strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert got[1][0] == pytest.approx(expected[1][0], abs=1e-3)
    assert got[2] == expected[2]


DP_WORKER = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from xlaserve.evals.lm_eval_backend import XlaserveLM

model, coordinator, rank, tasks, engine = sys.argv[1:]
lm = XlaserveLM(model=model, max_length=64, coordinator=coordinator, num_processes=2, process_id=int(rank),
                **json.loads(engine))
out = simple_evaluate(model=lm, tasks=["xlaserve_mc20", "xlaserve_ppl"],
                      task_manager=TaskManager(include_path=tasks), log_samples=False)
print("RESULT " + json.dumps({"rank": lm.rank, "done": lm.requests_done, "results": out and out["results"]}))
"""


def _ranks(folder: Path) -> list[list[str]]:
    tasks, coordinator, engine = task_dir(folder), f"127.0.0.1:{free_port()}", json.dumps(TEST_ENGINE)
    return [
        [sys.executable, "-c", DP_WORKER, default_model(), coordinator, str(r), str(tasks), engine]
        for r in (0, 1)
    ]


OFFLINE = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
# Subprocesses run in the background from the start of the session (tests/background.py).
RANKS = background.Job(_ranks, fixture="ranks", env=OFFLINE, timeout=900)
EVAL_COMMAND = background.Job(
    lambda folder: [
        *[sys.executable, "-m", "xlaserve.cli", "eval", "--model", "xlaserve"],
        *[
            "--model_args",
            f"model={default_model()},max_slots=4,max_model_len=512",
            "--tasks",
            "xlaserve_mc20",
        ],
        *["--include_path", str(task_dir(folder)), "--limit", "6"],
    ],
    fixture="eval_command",
    env=OFFLINE,
    timeout=900,
)


@pytest.fixture
def ranks():
    return RANKS.result()


@pytest.fixture
def eval_command():
    return EVAL_COMMAND.result()


def test_two_processes_split_a_task_through_lm_evals_rank_hooks(ours_lm, ranks, tmp_path):
    """Data-parallel evals over processes (hosts): each rank scores its share of the requests on
    its own engine; rank 0 reports the same metrics as one process scoring everything."""
    single = evaluate(ours_lm, tmp_path / "single")
    for p in ranks:
        assert p.returncode == 0, p.stderr[-3000:]
    rank0, rank1 = (
        json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[7:]) for p in ranks
    )
    assert rank1["results"] is None and rank0["rank"] == 0 and rank1["rank"] == 1
    total = 20 * 4 + 2  # 20 questions x 4 choices, 2 perplexity documents
    assert 0 < rank0["done"] < total and 0 < rank1["done"] < total and rank0["done"] + rank1["done"] >= total
    got = rank0["results"]
    for metric in ("acc,none", "acc_norm,none"):
        assert got["xlaserve_mc20"][metric] == single["xlaserve_mc20"][metric], metric
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert got["xlaserve_ppl"][metric] == pytest.approx(single["xlaserve_ppl"][metric], rel=1e-5), metric


def test_xlaserve_eval_command(eval_command):
    assert eval_command.returncode == 0, eval_command.stderr[-3000:]
    assert "xlaserve_mc20" in eval_command.stdout and "acc" in eval_command.stdout


def test_importing_xlaserve_evals_registers_ours_beside_lm_evals_own():
    """lm-eval fills its registry with its built-in models only while the registry is empty:
    registering ours first used to hide "hf" ("no model for this name found")."""
    code = (
        "import xlaserve.evals\n"
        "from lm_eval.api.registry import get_model\n"
        "from lm_eval.models.huggingface import HFLM\n"
        "assert get_model('hf') is HFLM\n"
        "assert get_model('xlaserve').__name__ == 'XlaserveLM'\n"
        "assert get_model('xlaserve-grpc').__name__ == 'XlaserveGrpcLM'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
