"""A safetensors reader over numpy memory maps (bf16 via ml_dtypes), with clear errors.

Format: an 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}} (offsets relative to the end of the header), then the data.
Tensors are views of the mapped file: nothing is read until used, and a reader that wants only a
slice (a shard) touches only those bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from xlaserve.checkpoints.loaded import CheckpointError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(path, f"truncated safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(
                path, f"truncated or corrupt safetensors file (header claims {n} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(path, f"corrupt safetensors header ({e})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise CheckpointError(path, f"tensor {name} has dtype {info.get('dtype')!r}, not supported")
        dtype = np.dtype(DTYPES[info["dtype"]])
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(
                path, f"tensor {name}: {end - begin} bytes do not hold shape {shape} of {info['dtype']}"
            )
        if end > data.size:
            raise CheckpointError(
                path, f"truncated safetensors file: tensor {name} ends at byte {end}, data has {data.size}"
            )
        out[name] = data[begin:end].view(dtype).reshape(shape)
    return out
