"""Regenerate the Python code of serve/proto/xlaserve/v1/xlaserve.proto with grpcio-tools.

    python -m xlaserve.serve.proto.generate

The generated files are committed; tests/test_proto.py fails when they are stale.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parent  # holds xlaserve/v1/xlaserve.proto
PROTO = "xlaserve/v1/xlaserve.proto"
OUTPUTS = ("xlaserve_pb2.py", "xlaserve_pb2.pyi", "xlaserve_pb2_grpc.py")
# protoc writes the import the way the .proto path reads; our package lives under xlaserve.serve.proto.
IMPORT_AS_WRITTEN = "from xlaserve.v1 import xlaserve_pb2"
IMPORT_AS_INSTALLED = "from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2"


def generate(out: Path) -> list[Path]:
    """Write the generated files for PROTO under `out` (in out/xlaserve/v1/) and return them."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {ROOT / PROTO}")
    files = [out / "xlaserve" / "v1" / name for name in OUTPUTS]
    grpc_file = files[2]
    grpc_file.write_text(grpc_file.read_text().replace(IMPORT_AS_WRITTEN, IMPORT_AS_INSTALLED))
    return files


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for f in generate(Path(tmp)):
            target = ROOT / "xlaserve" / "v1" / f.name
            target.write_text(f.read_text())
            print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
