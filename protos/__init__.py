"""gRPC API of coolfusion. The *_pb2 modules are generated, never at import time:
``python -m coolfusion.protos.build`` (``make protos``; ``scripts/install.sh`` runs it, and a wheel
build runs it through setup.py's hook)."""
