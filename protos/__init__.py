"""gRPC API of coolfusion. The *_pb2 modules are generated: ``python -m coolfusion.protos.build``."""

from pathlib import Path as _Path

_here = _Path(__file__).parent
# A source checkout regenerates missing or stale modules on first import, so a fresh clone works
# without a separate step; an installed wheel already carries them (setup.py's build hook).
if any(
    not (_here / f"{p.stem}_pb2_grpc.py").exists()
    or (_here / f"{p.stem}_pb2_grpc.py").stat().st_mtime < p.stat().st_mtime
    for p in _here.glob("*.proto")
):
    from . import build as _build

    _build.generate()
