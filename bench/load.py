"""Load-to-first-token: the same model from an xlaserve (orbax) checkpoint, from the GGUF file and
from an HF directory, measured in the same run.

    python -m xlaserve.bench.load --repeats 3

Each measurement is a fresh Python process (what a restarted server or eval job pays): from just
before it starts to its first generated token, and inside it, the checkpoint read alone
(`LLM.load_seconds`: file -> weights on the device). Formats take turns (gguf, hf, orbax, ...) and
medians are reported, because a shared machine's speed drifts. One untimed round first fills the
persistent compilation cache for every format, so compile time is not what is compared.

Pairs that hold the same weights: `gguf` vs `orbax` (Q4_1/Q8_0 blocks kept) and `hf` vs
`orbax-dense` (float32). The HF directory is written from the GGUF by transformers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xlaserve.bench import report

ENGINE = dict(max_slots=2, prefill_buckets=(32,), max_model_len=256)
PROMPT = "The capital of France is"

CHILD = """
import json, sys, time
from xlaserve import LLM, SamplingParams
llm = LLM(sys.argv[1], **json.loads(sys.argv[2]))
out = llm.generate([sys.argv[3]], SamplingParams(temperature=0.0, max_tokens=1))[0]
print("RESULT " + json.dumps({"first_token_at": time.time(), "load_s": llm.load_seconds,
      "token": out.token_ids[0], "compile_s": sum(llm.engine.compile_seconds.values())}))
"""


def measure(path: Path) -> dict:
    t0 = time.time()
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), json.dumps(ENGINE), PROMPT],
        capture_output=True,
        text=True,
        env=os.environ | {"XLASERVE_VERIFY_CHECKPOINT": os.environ.get("XLASERVE_VERIFY_CHECKPOINT", "1")},
    )
    if run.returncode:
        raise RuntimeError(f"loading {path} failed:\n{run.stderr[-3000:]}")
    res = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))[7:])
    return {"to_first_token_s": res.pop("first_token_at") - t0, **res}


def write_hf_dir(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    # a GGUF-loaded model refuses save_pretrained; a plain copy of its (dequantized) weights saves
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw).save_pretrained(out)


def dir_bytes(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    )


def main(argv=None) -> dict:
    from xlaserve.checkpoints import convert, registry

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=registry.DEFAULT_MODEL, help="alias or .gguf file")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    gguf_path = registry.resolve(args.model, log=lambda m: None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        formats = {"gguf": gguf_path, "hf": tmp / "hf", "orbax": tmp / "orbax", "orbax-dense": tmp / "dense"}
        write_hf_dir(gguf_path, formats["hf"])
        convert.convert(gguf_path, formats["orbax"], quant="keep")
        convert.convert(gguf_path, formats["orbax-dense"], quant="none")
        tokens = {name: measure(path)["token"] for name, path in formats.items()}  # warm the caches
        runs: dict[str, list[dict]] = {name: [] for name in formats}
        for _ in range(args.repeats):
            for name, path in formats.items():
                runs[name].append(measure(path))
                print(name, json.dumps(runs[name][-1]), flush=True)
        sizes = {name: dir_bytes(path) for name, path in formats.items()}
    import jax

    med = lambda name, key: statistics.median(r[key] for r in runs[name])
    summary = {
        name: {
            "to_first_token_s": med(name, "to_first_token_s"),
            "load_s": med(name, "load_s"),
            "bytes_on_disk": sizes[name],
            "first_token": tokens[name],
        }
        for name in formats
    }
    result = {
        "kind": "load",
        "command": "python -m xlaserve.bench.load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "device": report.device_info(),
        "jax_version": jax.__version__,
        "model": gguf_path.name,
        "engine": ENGINE,
        "verify_checksums": os.environ.get("XLASERVE_VERIFY_CHECKPOINT", "1") != "0",
        "summary": summary,
        "ratios": {
            "gguf/orbax to_first_token": summary["gguf"]["to_first_token_s"]
            / summary["orbax"]["to_first_token_s"],
            "gguf/orbax load": summary["gguf"]["load_s"] / summary["orbax"]["load_s"],
            "hf/orbax-dense to_first_token": summary["hf"]["to_first_token_s"]
            / summary["orbax-dense"]["to_first_token_s"],
            "hf/orbax-dense load": summary["hf"]["load_s"] / summary["orbax-dense"]["load_s"],
        },
        "runs": runs,
    }
    print(format_table(result))
    report.write(result, report.result_path(args.out, "load"), markdown=format_table(result))
    return result


def format_table(result: dict) -> str:
    rows = ["| format | load (s) | to first token (s) | on disk (MiB) |", "|---|---|---|---|"]
    for name, s in result["summary"].items():
        rows.append(
            f"| {name} | {s['load_s']:.2f} | {s['to_first_token_s']:.2f} | {s['bytes_on_disk'] / 2**20:.0f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
