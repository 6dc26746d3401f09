"""xlaserve's own checkpoint format: the weights pytree saved with orbax, restored straight onto a mesh.

A checkpoint directory holds

    weights/              orbax (OCDBT) checkpoint of the weights as nested dicts of arrays
    weights.files.json    every file under weights/: size and sha256 (integrity, checked at load)
    tokenizer.json        the HF `tokenizers` tokenizer (BOS handling in its post-processor)
    tokenizer_config.json bos/eos tokens and the chat template
    xlaserve.json         written last: format version, model config, quantization scheme, source
                          hash, xlaserve version, and every tensor's kind, shape and sha256

`xlaserve.json` is deterministic (no timestamps, no file names): converting the same source twice
gives the same file. orbax names its data files at random, so the directories differ in names only.
Weights are stored under their declared names ("layers.wq" -> {"layers": {"wq": ...}}), so the
format knows no family: the config's `architecture` picks the declarations to rebuild them with.

Quantized matrices are saved packed (GGUF's layout; `runtime/quant.py`), whatever the backend: the
engine unpacks them for XLA:CPU after restore, on device. Writing one from a GGUF or HF source,
with convert-time quantization, is `checkpoints/convert.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from xlaserve.checkpoints.loaded import CheckpointError, Loaded
from xlaserve.checkpoints.tokenizer import tokenizer_from_hf_dir
from xlaserve.runtime import models, placement
from xlaserve.runtime.config import ModelConfig, RopeConfig
from xlaserve.runtime.models.params import from_named, named
from xlaserve.runtime.quant import QuantArray, dequantize

log = logging.getLogger("xlaserve")

FORMAT = "xlaserve-orbax"
FORMAT_VERSION = 1
META = "xlaserve.json"
WEIGHTS = "weights"
FILES = "weights.files.json"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("xlaserve")
    except PackageNotFoundError:
        return "0+unknown"


def is_checkpoint(path) -> bool:
    """An xlaserve checkpoint directory (possibly a partial one: `open` says what is missing)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return (path / META).exists() or ((path / WEIGHTS).exists() and not (path / "config.json").exists())


# -- the weights pytree <-> nested dicts of arrays -------------------------------------------------


def _parts(leaf) -> dict:
    """A leaf's stored arrays by name."""
    if isinstance(leaf, QuantArray):
        return {"data": leaf.data, "scale": leaf.scale} | ({} if leaf.min is None else {"min": leaf.min})
    return {"value": leaf}


def to_tree(weights) -> dict:
    """{"layers": {"wq": {"data": ..., "scale": ...}, ...}, "embed": {...}, ...}"""
    tree: dict = {}
    for name, leaf in named(weights).items():
        node = tree
        for key in name.split(".")[:-1]:
            node = node.setdefault(key, {})
        node[name.split(".")[-1]] = _parts(leaf)
    return tree


def from_tree(tree: dict, tensors: dict, cfg: ModelConfig):
    """Inverse of `to_tree`, using the recorded kinds in `tensors` (name -> description)."""

    def leaf(name: str):
        node = tree
        for key in name.split("."):
            node = node[key]
        t = tensors[name]
        if t["kind"] == "dense":
            return node["value"]
        return QuantArray(
            data=node["data"], scale=node["scale"], min=node.get("min"), kind=t["kind"], block=t["block"]
        )

    return from_named(models.declare(cfg), {name: leaf(name) for name in tensors})


def describe(weights) -> dict:
    """name -> {kind, block, shape, arrays: {part: {shape, dtype, sha256}}} (host numpy weights)."""
    out = {}
    for name, leaf in named(weights).items():
        arrays = {
            part: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _digest(a)}
            for part, a in _parts(leaf).items()
        }
        quantized = isinstance(leaf, QuantArray)
        out[name] = {
            "kind": leaf.kind if quantized else "dense",
            "block": leaf.block if quantized else None,
            "shape": list(leaf.shape),
            "arrays": arrays,
        }
    return out


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.view(np.uint8).reshape(-1).data).hexdigest()


def config_to_json(cfg: ModelConfig) -> dict:
    """The config as JSON types (tuples become lists; RoPE configs dicts)."""
    d = dataclasses.asdict(cfg)
    for key in ("rope", "rope_local"):
        if d[key] is not None and d[key]["freq_factors"] is not None:
            d[key]["freq_factors"] = [float(x) for x in d[key]["freq_factors"]]
    d["eos_token_ids"] = list(d["eos_token_ids"])
    if d["layer_types"] is not None:
        d["layer_types"] = list(d["layer_types"])
    return d


def _rope(d: dict | None) -> RopeConfig | None:
    if d is None:
        return None
    d = dict(d)
    if d.get("freq_factors") is not None:
        d["freq_factors"] = tuple(d["freq_factors"])
    return RopeConfig(**d)


def config_from_json(d: dict, path) -> ModelConfig:
    try:
        fields = {
            **d,
            "rope": _rope(d["rope"]),
            "rope_local": _rope(d.get("rope_local")),
            "eos_token_ids": tuple(d["eos_token_ids"]),
            "layer_types": None if d.get("layer_types") is None else tuple(d["layer_types"]),
        }
        return ModelConfig(**fields)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid model config in {META}: {e}") from None


def save(out: Path, weights, tokenizer, meta: dict) -> None:
    """Write a checkpoint directory at `out` (which must not exist): weights, file manifest,
    tokenizer, and `meta` (with the tensors' descriptions added) last, as the commit mark."""
    import orbax.checkpoint as ocp

    meta = {**meta, "tensors": describe(weights)}
    out.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((out / WEIGHTS).absolute(), to_tree(weights))
    (out / FILES).write_text(json.dumps(_file_manifest(out / WEIGHTS), indent=1, sort_keys=True))
    tokenizer.backend.save(str(out / "tokenizer.json"))
    tok_config = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "chat_template": tokenizer.chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1, sort_keys=True))
    (out / META).write_text(json.dumps(meta, indent=1, sort_keys=True))


def _file_manifest(root: Path) -> dict:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(_file_sha256, files))
    return {
        f.relative_to(root).as_posix(): {"size": f.stat().st_size, "sha256": d}
        for f, d in zip(files, digests, strict=True)
    }


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- open and restore --------------------------------------------------------------------------------


def read_meta(path) -> dict:
    """The checkpoint's metadata, checked for format and version. Raises CheckpointError."""
    path = Path(path)
    file = path / META
    if not file.is_file():
        raise CheckpointError(path, f"partial checkpoint: {META} is missing (the conversion did not finish?)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(file, f"corrupt metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(file, f"not an xlaserve checkpoint (format is not {FORMAT!r})")
    v = meta.get("format_version")
    if v != FORMAT_VERSION:
        raise CheckpointError(
            file,
            f"checkpoint format version {v} (written by xlaserve {meta.get('xlaserve_version')}); "
            f"this xlaserve {version()} reads version {FORMAT_VERSION}: convert the source again",
        )
    return meta


def verify_files(path, full: bool = True) -> None:
    """Every file orbax wrote is present with its size (and, when `full`, its sha256): catches a
    partial copy, a truncated file and flipped bits, which orbax itself would restore silently."""
    path = Path(path)
    manifest_file = path / FILES
    if not manifest_file.is_file():
        raise CheckpointError(path, f"partial checkpoint: {FILES} is missing")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(manifest_file, f"corrupt manifest: {e}") from None
    root = path / WEIGHTS
    for name, entry in manifest.items():
        file = root / name
        if not file.is_file():
            raise CheckpointError(file, "partial checkpoint: this weights file is missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(file, f"truncated or altered: {size} bytes, expected {entry['size']}")
    if full:
        names = sorted(manifest)
        with ThreadPoolExecutor(8) as pool:
            digests = list(pool.map(_file_sha256, [root / n for n in names]))
        for name, digest in zip(names, digests, strict=True):
            if digest != manifest[name]["sha256"]:
                raise CheckpointError(root / name, "corrupt: sha256 differs from the manifest")


def _abstract(meta: dict, cfg: ModelConfig):
    """Weights whose leaves are ShapeDtypeStructs (QuantArrays of them for quantized matrices)."""
    by_name = {}
    for name, t in meta["tensors"].items():
        sds = {
            part: jax.ShapeDtypeStruct(tuple(a["shape"]), jnp.dtype(a["dtype"]))
            for part, a in t["arrays"].items()
        }
        if t["kind"] == "dense":
            by_name[name] = sds["value"]
        else:
            by_name[name] = QuantArray(
                data=sds["data"], scale=sds["scale"], min=sds.get("min"), kind=t["kind"], block=t["block"]
            )
    return from_named(models.declare(cfg), by_name)


def restore_weights(path, meta: dict, cfg: ModelConfig, *, mesh=None, dtype=None, dequant: bool = False):
    """The weights as jax arrays placed for `mesh` (None: the default device): each device reads only
    its own slice of each array (orbax/tensorstore, parallel reads). Dense floating weights are cast
    to `dtype`; quantized ones are dequantized to it when `dequant`."""
    import orbax.checkpoint as ocp

    path = Path(path)
    abstract = _abstract(meta, cfg)
    if mesh is None:
        one = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        shardings = placement.weight_shardings(cfg, abstract, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore((path / WEIGHTS).absolute(), to_tree(target))
    except Exception as e:  # orbax/tensorstore raise bare Exceptions with pages of detail
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(path / WEIGHTS, f"cannot restore weights: {first}") from None
    weights = from_tree(tree, meta["tensors"], cfg)
    dtype = jnp.dtype(dtype or meta["dtype"])

    def finish(leaf):
        if isinstance(leaf, QuantArray):
            return jax.jit(lambda w: dequantize(w, dtype))(leaf) if dequant else leaf
        return leaf if leaf.dtype == dtype else leaf.astype(dtype)

    return jax.tree.map(finish, weights, is_leaf=lambda x: isinstance(x, QuantArray))


def load_checkpoint(
    path, *, mesh=None, dtype=None, dequantize: bool = False, verify: bool | None = None
) -> Loaded:
    """Open, verify and restore an xlaserve checkpoint. `verify` (default: the environment variable
    XLASERVE_VERIFY_CHECKPOINT, "1" unless set to "0") checks every file's sha256; sizes are
    always checked. `Loaded.restore(mesh)` restores another copy (dp replicas)."""
    path = Path(path)
    t0 = time.perf_counter()
    meta = read_meta(path)
    if verify is None:
        verify = os.environ.get("XLASERVE_VERIFY_CHECKPOINT", "1") != "0"
    verify_files(path, full=verify)
    cfg = config_from_json(meta["config"], path / META)
    tokenizer = tokenizer_from_hf_dir(path)
    restore = lambda m: restore_weights(path, meta, cfg, mesh=m, dtype=dtype, dequant=dequantize)
    weights = restore(mesh)
    log.info("restored %s in %.2fs", path, time.perf_counter() - t0)
    q = meta["quantization"]
    kinds = q.get("kinds") or []
    return Loaded(
        config=cfg,
        weights=weights,
        tokenizer=tokenizer,
        source=str(path),
        quantization="none" if dequantize or not kinds else ",".join(kinds),
        info={"checkpoint": meta},
        restore=restore,
    )
