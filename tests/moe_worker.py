"""The tiny MoE checkpoints (tests/tiny_moe.py) on 8 simulated CPU devices, in one process: each
checkpoint's logits over a teacher-forced sequence (a prefill pass, then one token per pass) with
the experts split over ep (ep=4; tp=2,ep=2 with the attention and expert ffn split over tp too;
ep=2 as the second replica of dp=2,ep=2 runs it, on devices 2-3; "<mesh> pallas": the prefill
pass's experts through the grouped matmul kernel, interpreted, under the shard_map). Writes `<out>/<name>.npz`
(one float32 [len(seq), V] array per mesh) and, for a spec with "hlo": true, `<out>/<name>.<mesh>.hlo`
(the compiled decode-shaped program).

Run by tests/test_moe.py: python moe_worker.py SPEC.json OUT, the spec a list of
{"path", "seq", "prefill", "meshes"[, "hlo"]}."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json
import sys
from pathlib import Path

import jax
import numpy as np
import tiny_moe

from xlaserve.checkpoints.load import load_model
from xlaserve.sharding.mesh import device_groups, parse_mesh

MESHES = {"ep=4": 0, "tp=2,ep=2": 0, "dp=2,ep=2": 1}  # mesh -> the dp replica that runs it
PALLAS = " pallas"  # a mesh named with this suffix runs the grouped matmul kernel (interpreted)


def main():
    assert jax.device_count() == 8, jax.devices()
    specs, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    for spec in specs:
        loaded = load_model(spec["path"], dequantize=False)
        name = Path(spec["path"]).name
        arrays = {}
        for mesh in spec["meshes"]:
            hlo = [] if spec.get("hlo") else None
            shape = mesh.removesuffix(PALLAS)
            group = device_groups(parse_mesh(shape))[MESHES[shape]]
            arrays[mesh] = tiny_moe.run_logits(
                loaded.config,
                loaded.weights,
                spec["seq"],
                mesh=group,
                prefill=spec["prefill"],
                matmul="pallas" if mesh.endswith(PALLAS) else "xla",
                hlo=hlo,
            )
            if hlo:
                (out / f"{name}.{mesh}.hlo").write_text(hlo[0])
        np.savez(out / f"{name}.npz", **arrays)
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
