"""Generate the protobuf and gRPC Python modules: ``python -m coolfusion.protos.build``.

The .proto files are mapped to the virtual path ``coolfusion/protos`` so the generated modules
import each other as ``coolfusion.protos.x_pb2``; output lands next to the .proto files (or in
``target``). Generated files are git-ignored and never edited by hand.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = sorted(p.name for p in PROTO_DIR.glob("*.proto"))


def generate(target: Path | None = None) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency

    target = Path(target) if target else PROTO_DIR
    target.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{well_known}",
            f"-Icoolfusion/protos={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[f"coolfusion/protos/{name}" for name in PROTOS],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        written = []
        for path in sorted((Path(tmp) / "coolfusion" / "protos").iterdir()):
            shutil.copy(path, target / path.name)
            written.append(target / path.name)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else None):
        print(path)
