"""xlaserve's own checkpoint: the weights pytree saved with orbax, restored straight onto a mesh.

A checkpoint directory holds

    weights/              orbax (OCDBT) checkpoint of the weights as nested dicts of arrays
    weights.files.json    every file under weights/: size and sha256 (integrity, checked at load)
    tokenizer.json        the HF `tokenizers` tokenizer (BOS handling in its post-processor)
    tokenizer_config.json bos/eos tokens and the chat template
    xlaserve.json         written last: format version, model config, quantization scheme, source
                          hash, xlaserve version, and every tensor's kind, shape and sha256

`xlaserve.json` is deterministic (no timestamps, no file names): converting the same source twice
gives the same file. orbax names its data files at random, so the directories differ in names only.

Quantized matrices are saved packed (GGUF's layout; `runtime/quant.py`), whatever the backend: the
engine unpacks them for XLA:CPU after restore, on device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from xlaserve.checkpoints.base import CheckpointError, Loaded
from xlaserve.checkpoints.tokenizer import tokenizer_from_hf_dir
from xlaserve.runtime.config import ModelConfig, RopeConfig
from xlaserve.runtime.llama import Layer, Weights
from xlaserve.runtime.quant import QuantArray, dequantize, quantize

log = logging.getLogger("xlaserve")

FORMAT = "xlaserve-orbax"
FORMAT_VERSION = 1
META = "xlaserve.json"
WEIGHTS = "weights"
FILES = "weights.files.json"

# --quant/--scheme -> (QuantArray kind for `quantize`, per-channel?)
SCHEMES = {
    ("int8", "sym"): ("q8_0", True),
    ("int8", "asym"): ("q8_1", True),
    ("int4", "sym"): ("q4_0", False),
    ("int4", "asym"): ("q4_1", False),
}
QUANTS = ("keep", "none", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
DTYPES = {"f32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


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


def _entries(weights: Weights):
    """(name, leaf) for every weight, a leaf being an array or a QuantArray; "layers.wq", ..."""
    for f in dataclasses.fields(Weights):
        value = getattr(weights, f.name)
        if f.name == "layers":
            for g in dataclasses.fields(Layer):
                yield f"layers.{g.name}", getattr(value, g.name)
        elif value is not None:
            yield f.name, value


def _parts(leaf) -> dict:
    """A leaf's stored arrays by name."""
    if isinstance(leaf, QuantArray):
        return {"data": leaf.data, "scale": leaf.scale} | ({} if leaf.min is None else {"min": leaf.min})
    return {"value": leaf}


def to_tree(weights: Weights) -> dict:
    """{"layers": {"wq": {"data": ..., "scale": ...}, ...}, "embed": {...}, ...}"""
    tree: dict = {}
    for name, leaf in _entries(weights):
        node = tree
        for key in name.split(".")[:-1]:
            node = node.setdefault(key, {})
        node[name.split(".")[-1]] = _parts(leaf)
    return tree


def from_tree(tree: dict, tensors: dict) -> Weights:
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

    return _rebuild({name: leaf(name) for name in tensors})


def _describe(weights: Weights) -> dict:
    """name -> {kind, block, shape, arrays: {part: {shape, dtype, sha256}}} (host numpy weights)."""
    out = {}
    for name, leaf in _entries(weights):
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


# -- model config <-> JSON ---------------------------------------------------------------------------


def config_to_json(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    if d["rope"]["freq_factors"] is not None:
        d["rope"]["freq_factors"] = [float(x) for x in d["rope"]["freq_factors"]]
    d["eos_token_ids"] = list(d["eos_token_ids"])
    return d


def config_from_json(d: dict, path) -> ModelConfig:
    try:
        rope = dict(d["rope"])
        if rope.get("freq_factors") is not None:
            rope["freq_factors"] = tuple(rope["freq_factors"])
        return ModelConfig(**{**d, "rope": RopeConfig(**rope), "eos_token_ids": tuple(d["eos_token_ids"])})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid model config in {META}: {e}") from None


# -- convert ---------------------------------------------------------------------------------------


def source_digest(src: Path) -> str:
    """sha256 of a GGUF file, or of an HF directory's files (names and contents, sorted)."""
    if src.is_file():
        with open(src, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            h.update(file.relative_to(src).as_posix().encode() + b"\0")
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def quantize_weights(
    weights: Weights, quant: str, scheme: str, group_size: int, dtype, progress: Callable | None = None
) -> Weights:
    """Every matrix quantized (`int8`: per output channel; `int4`: groups of `group_size` along the
    input axis), round-to-nearest; vectors (norms) cast to `dtype`. Host numpy in and out."""
    kind, per_channel = SCHEMES[quant, scheme]
    entries = list(_entries(weights))
    done = {}
    for i, (name, leaf) in enumerate(entries):
        if progress:
            progress(i, len(entries), name)
        w = dequantize(leaf) if isinstance(leaf, QuantArray) else np.asarray(leaf, np.float32)
        if name.endswith("norm"):
            done[name] = w.astype(dtype)
            continue
        block = w.shape[-1] if per_channel else group_block(name, w.shape[-1], group_size)
        done[name] = quantize(w, kind, block, np.float32 if per_channel else np.float16)
    if progress:
        progress(len(entries), len(entries), "done")
    return _rebuild(done)


def group_block(name: str, k: int, group_size: int) -> int:
    """`group_size`, or the largest smaller supported group that divides the input size `k` (as
    llama.cpp falls back for tensors its block does not fit: SmolLM2's 576 takes 64 for 128)."""
    for g in sorted((g for g in GROUP_SIZES if g <= group_size), reverse=True):
        if k % g == 0:
            if g != group_size:
                log.warning(
                    "%s: input size %d is not a multiple of %d; using groups of %d", name, k, group_size, g
                )
            return g
    raise ValueError(f"{name}: input size {k} is not a multiple of any group size <= {group_size}")


def _rebuild(by_name: dict) -> Weights:
    """Weights from {"embed": ..., "layers.wq": ..., ...} (lm_head absent when tied)."""
    layers = Layer(**{g.name: by_name[f"layers.{g.name}"] for g in dataclasses.fields(Layer)})
    return Weights(
        embed=by_name["embed"],
        layers=layers,
        final_norm=by_name["final_norm"],
        lm_head=by_name.get("lm_head"),
    )


def _cast_dense(weights: Weights, dtype) -> Weights:
    return _rebuild(
        {
            name: leaf if isinstance(leaf, QuantArray) else np.asarray(leaf).astype(dtype)
            for name, leaf in _entries(weights)
        },
    )


def convert(
    src,
    out,
    *,
    quant: str = "keep",
    scheme: str = "sym",
    group_size: int = 32,
    dtype: str = "f32",
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """A GGUF file or HF directory -> an xlaserve checkpoint at `out`; returns its metadata.

    quant: "keep" (as the source stores it: GGUF-quantized matrices stay in their blocks), "none"
    (every matrix dense in `dtype`), "int8" (per output channel) or "int4" (groups of
    `group_size`); scheme "sym" or "asym". Written to a temporary directory and renamed, so `out`
    is either complete or absent."""
    from xlaserve.checkpoints.load import load_model

    src, out = Path(src), Path(out)
    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r} must be one of {', '.join(QUANTS)}")
    if (quant, scheme) not in SCHEMES and quant in ("int8", "int4"):
        raise ValueError(f"scheme={scheme!r} must be sym or asym")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} must be one of {', '.join(map(str, GROUP_SIZES))}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be bf16 or f32")
    if out.exists() and not force:
        raise ValueError(f"out={out} already exists (pass force=True / --force to replace it)")
    np_dtype = jnp.dtype(DTYPES[dtype])
    step = progress or (lambda i, n, what: None)
    step(0, 1, f"reading {src.name}")
    loaded = load_model(src, dequantize=quant == "none", dtype=np_dtype)
    if quant in ("int8", "int4"):
        weights = quantize_weights(loaded.weights, quant, scheme, group_size, np_dtype, progress)
    else:
        weights = _cast_dense(loaded.weights, np_dtype)
    quantized = [leaf for _, leaf in _entries(weights) if isinstance(leaf, QuantArray)]
    kinds = sorted({leaf.kind for leaf in quantized})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "xlaserve_version": version(),
        "config": config_to_json(loaded.config),
        "dtype": DTYPES[dtype],
        "quantization": {
            "method": quant,
            "scheme": scheme if quant in ("int8", "int4") else None,
            "group_size": group_size if quant == "int4" else None,
            "kinds": kinds,
            "group_sizes_used": sorted({leaf.block for leaf in quantized}) if quant == "int4" else None,
        },
        "source": {"name": src.name, "sha256": source_digest(src), "quantization": loaded.quantization},
        "tensors": None,
    }
    step(0, 1, "hashing tensors")
    meta["tensors"] = _describe(weights)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        import orbax.checkpoint as ocp

        step(0, 1, "saving weights")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / WEIGHTS).absolute(), to_tree(weights))
        step(1, 1, "writing manifest and tokenizer")
        (tmp / FILES).write_text(json.dumps(_file_manifest(tmp / WEIGHTS), indent=1, sort_keys=True))
        loaded.tokenizer.backend.save(str(tmp / "tokenizer.json"))
        tok = loaded.tokenizer
        tok_config = {
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "chat_template": tok.chat_template,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1, sort_keys=True))
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))  # last: the commit mark
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


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


def _abstract(meta: dict, cfg: ModelConfig) -> Weights:
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
    return _rebuild(by_name)


def restore_weights(
    path, meta: dict, cfg: ModelConfig, *, mesh=None, dtype=None, dequant: bool = False
) -> Weights:
    """The weights as jax arrays placed for `mesh` (None: the default device): each device reads only
    its own slice of each array (orbax/tensorstore, parallel reads). Dense floating weights are cast
    to `dtype`; quantized ones are dequantized to it when `dequant`."""
    import orbax.checkpoint as ocp

    from xlaserve.sharding import rules

    path = Path(path)
    abstract = _abstract(meta, cfg)
    if mesh is None:
        one = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        shardings = rules.weight_shardings(cfg, abstract, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore((path / WEIGHTS).absolute(), to_tree(target))
    except Exception as e:  # orbax/tensorstore raise bare Exceptions with pages of detail
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(path / WEIGHTS, f"cannot restore weights: {first}") from None
    weights = from_tree(tree, meta["tensors"])
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
