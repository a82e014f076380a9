"""The worker service: one model behind next-text, scoring and session RPCs."""
