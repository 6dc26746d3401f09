"""Eval throughput: lm-evaluation-harness on a local multiple-choice task through the `xlaserve`
backend and through lm-eval's HF backend, same task, same run; log-likelihood requests per second.

    python -m xlaserve.bench.evals --copies 10       # 20 questions x 4 choices x 10 = 800 requests

The task is data/mc20.jsonl repeated --copies times (each copy's questions numbered so no
two requests are identical); accuracies are reported too and must agree between the backends.
Each repeat numbers its copies afresh (repeat 2 asks "(11) ..." where repeat 1 asked "(1) ..."),
so no run finds the questions in the prefix cache an earlier run left.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from xlaserve.bench import report
from xlaserve.data import MC20

FIXTURE = MC20


def write_task(root: Path, copies: int, first: int = 1) -> None:
    """The task's files under `root`: copies numbered first, first + 1, ..."""
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "mc.jsonl", "w") as f:
        for c in range(copies):
            for r in rows:
                f.write(json.dumps({**r, "question": f"({first + c}) {r['question']}"}) + "\n")
    (root / "mc.yaml").write_text(f"""task: xlaserve_bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")


def run(lm, root: Path) -> dict:
    """One evaluation, timed from simple_evaluate; the TaskManager (lm-eval indexing its thousands
    of task YAML files: seconds, the same for every backend) is built before the clock starts."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(root))
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=["xlaserve_bench_mc"], task_manager=tasks)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "acc": out["results"]["xlaserve_bench_mc"]["acc,none"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--max-slots", type=int, default=16)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import jax
    import torch
    from lm_eval.models.huggingface import HFLM

    from xlaserve import LLM
    from xlaserve.checkpoints import registry
    from xlaserve.evals.lm_eval_backend import XlaserveLM

    path = registry.resolve(args.model)
    requests = 20 * 4 * args.copies
    with tempfile.TemporaryDirectory() as tmp:
        roots = [Path(tmp) / str(r) for r in range(args.repeats)]
        for r, root in enumerate(roots):
            write_task(root, args.copies, first=1 + r * args.copies)
        ours = XlaserveLM(llm=LLM(str(path), max_slots=args.max_slots, max_model_len=512))
        hf = HFLM(
            pretrained=str(path.parent),
            gguf_file=path.name,
            batch_size=args.hf_batch_size,
            device="cpu",
            dtype=torch.float32,
        )
        runs = {"xlaserve": [], "hf": []}
        for root in roots:  # taking turns: a shared machine's speed drifts
            runs["xlaserve"].append(run(ours, root))
            runs["hf"].append(run(hf, root))
    rows = {}
    for name, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        rows[name] = {"wall_s": wall, "acc": rs[0]["acc"], "requests_per_s": requests / wall, "runs": rs}
    result = {
        "kind": "evals",
        "command": "python -m xlaserve.bench.evals " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": path.name,
        "task": f"mc20 x {args.copies} ({requests} loglikelihood requests)",
        "xlaserve": rows["xlaserve"] | {"max_slots": args.max_slots},
        "hf": rows["hf"] | {"batch_size": args.hf_batch_size},
        "speedup": rows["xlaserve"]["requests_per_s"] / rows["hf"]["requests_per_s"],
    }
    print(json.dumps(result, indent=2))
    report.write(result, report.result_path(args.out, "evals"))
    return result


if __name__ == "__main__":
    main()
