"""The options of ``coolfusion distill train`` and their checks (torch-free: the CLI builds its
parser from these defaults without importing the trainer)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DEFAULT_CHUNK = 128  # positions per output-layer chunk (soft_loss.py)


class TrainError(ValueError):
    """Bad options or a target that cannot load: one line, exit 2 on the CLI."""


@dataclass(frozen=True)
class TrainOptions:
    prepared: str  # a `coolfusion distill prepare` output directory
    out: str  # the run directory
    target: str | None = None  # model spec; default: the prepared manifest's target
    lam: float = 0.9
    fusion: str = "minCE"
    k: int | None = None  # default: the prepared k
    lr: float = 1e-5
    warmup: int = 0  # optimizer steps of linear warm-up before the cosine decay
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    save_steps: int = 50
    save_total_limit: int = 2
    chunk: int = DEFAULT_CHUNK

    def checked(self) -> TrainOptions:
        if not (isinstance(self.lam, (int, float)) and 0.0 <= self.lam <= 1.0):
            raise TrainError(f"--lambda must be in [0, 1], got {self.lam}")
        for name, value, low in (
            ("--max-steps", self.max_steps, 1),
            ("--batch-size", self.batch_size, 1),
            ("--seq-len", self.seq_len, 2),
            ("--save-steps", self.save_steps, 1),
            ("--save-total-limit", self.save_total_limit, 1),
            ("--chunk", self.chunk, 1),
            ("--warmup", self.warmup, 0),
        ):
            if value < low:
                raise TrainError(f"{name} must be at least {low}, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"--lr must be a positive number, got {self.lr}")
        if self.k is not None and self.k < 1:
            raise TrainError(f"--k must be at least 1, got {self.k}")
        from .fusion import FusionError, method_name

        try:
            fusion = method_name(self.fusion)
        except FusionError as exc:
            raise TrainError(str(exc)) from None
        return TrainOptions(**{**asdict(self), "fusion": fusion})
