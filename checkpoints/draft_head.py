"""A trained draft head on disk (runtime/draft_head.py): its parameters saved with orbax, and a JSON
manifest naming the target model it was trained for.

    DIR/params/           orbax checkpoint of the head's parameters (nested dicts of float32 arrays)
    DIR/draft_head.json   written last (the commit mark): format and version, the target's
                          fingerprint, and how the head was trained (settings, losses, acceptance)

A head is tied to its target: it reads the target's features, embedding table, final norm and
lm_head. The fingerprint holds the target's name, family and sizes and a sha256 of its embedding
and lm_head values (dequantized to float32, so the packing a backend keeps them in does not count);
`load` refuses a head whose fingerprint differs from the target's, naming the field and both models.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from xlaserve.checkpoints.loaded import CheckpointError
from xlaserve.runtime import draft_head
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.quant import QuantArray, dequantize

FORMAT = "xlaserve-draft-head"
FORMAT_VERSION = 1
MANIFEST = "draft_head.json"
PARAMS = "params"
# Compared in this order; the first that differs names the refusal.
FIELDS = ("architecture", "hidden_size", "vocab_size", "num_layers", "embed_sha256", "lm_head_sha256")


def _digest(w) -> str:
    values = dequantize(w, np.float32) if isinstance(w, QuantArray) else w
    a = np.ascontiguousarray(np.asarray(values, np.float32))
    return hashlib.sha256(a.view(np.uint8).reshape(-1).data).hexdigest()


def fingerprint(cfg: ModelConfig, weights) -> dict:
    """What identifies the target a head works with (weights: its Weights pytree, host or device)."""
    return {
        "model": cfg.name,
        "architecture": cfg.architecture,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_layers,
        "embed_sha256": _digest(weights.embed),
        "lm_head_sha256": "tied" if weights.lm_head is None else _digest(weights.lm_head),
    }


def save(out, params, target: dict, info: dict, *, force: bool = False) -> None:
    """Write the head to directory `out` (which must not exist unless `force`): parameters, then the
    manifest with the target's `fingerprint` and `info` (training settings and results)."""
    import orbax.checkpoint as ocp

    out = Path(out)
    if out.exists():
        if not force:
            raise ValueError(f"--out {out} exists (pass --force to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((out / PARAMS).absolute(), params)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "target": target, **info}
    (out / MANIFEST).write_text(json.dumps(meta, indent=1, sort_keys=True))


def read_manifest(path) -> dict:
    """The head's manifest, checked for format and version (CheckpointError otherwise)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise CheckpointError(path, f"not a draft head: {MANIFEST} is missing (training did not finish?)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(file, f"corrupt manifest: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(file, f"not a draft head (format is not {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            file,
            f"draft head format version {meta.get('format_version')}; this xlaserve reads {FORMAT_VERSION}",
        )
    return meta


def check_target(meta: dict, target: dict, path) -> None:
    """Refuse (ValueError) a head trained for another model than `target` (a `fingerprint`)."""
    trained = meta.get("target") or {}
    for field in FIELDS:
        if trained.get(field) != target[field]:
            raise ValueError(
                f"draft head {path} was trained for model {trained.get('model')!r} "
                f"({field}={trained.get(field)!r}), not for the target {target['model']!r} "
                f"({field}={target[field]!r}): a draft head works only with the model it was trained for"
            )


def load(path, cfg: ModelConfig, weights):
    """(params, manifest) of the head at `path`, checked against the target (cfg, weights) first."""
    path = Path(path)
    meta = read_manifest(path)
    check_target(meta, fingerprint(cfg, weights), path)
    import orbax.checkpoint as ocp

    one = SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.eval_shape(lambda: draft_head.init_params(cfg))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore((path / PARAMS).absolute(), target)
    except Exception as e:  # orbax/tensorstore raise bare Exceptions with pages of detail
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(path / PARAMS, f"cannot restore the draft head: {first}") from None
    return params, meta


def load_head(path, cfg: ModelConfig, weights, k: int) -> draft_head.Head:
    """The head at `path` as the engine runs it (`LLM(speculative={"method": "eagle", "head": path,
    "num_speculative_tokens": k})`), checked against the target (cfg, weights) and k: ValueError
    naming the field (`head`, `num_speculative_tokens`)."""
    try:
        params, meta = load(path, cfg, weights)
    except ValueError as e:  # CheckpointError included: a missing, corrupt or other model's head
        raise ValueError(f"speculative head={str(path)!r}: {e}") from None
    try:
        draft_head.check_k(k)
    except ValueError as e:
        raise ValueError(f"num_speculative_tokens={k!r}: {e}") from None
    window = (meta.get("settings") or {}).get("window", 1)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            f"speculative head={str(path)!r}: its manifest's settings.window={window!r} is not ≥ 1"
        )
    return draft_head.Head(params, window)
