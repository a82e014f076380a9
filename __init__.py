"""coolfusion: fuse LLMs with different tokenizers without training (Cool-Fusion), over gRPC.

The repository root is this package (see pyproject's package-dir): ``coolfusion.services`` is
``services/``, ``coolfusion.orchestrator`` is ``orchestrator/`` and so on.
"""

__version__ = "0.1.0"
