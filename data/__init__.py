"""The evaluation data the project evaluates and distills on, shipped with the package.

ARC-Easy and ARC-Challenge (train, validation; CC BY-SA 4.0, ``arc/LICENSE``) and GSM8K (train,
test; MIT, ``gsm8k/LICENSE``). The ARC test splits are not shipped: they stay unseen for an
independent check. ``$COOLFUSION_DATA_DIR`` points every reader at another folder of the same
layout.
"""

from __future__ import annotations

from pathlib import Path

from .. import envs

PACKAGED = Path(__file__).resolve().parent


def data_dir() -> Path:
    """Where the task files are: ``$COOLFUSION_DATA_DIR``, else the packaged copy."""
    return Path(envs.read("COOLFUSION_DATA_DIR") or PACKAGED)
