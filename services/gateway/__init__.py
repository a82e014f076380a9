"""OpenAI-compatible HTTP gateway: a thin HTTP client of the Fusion gRPC service (imports no torch)."""
