"""Pre-packed weights for the multi-row matrix products of a CPU worker.

A decode step multiplies one row by each weight matrix: MKL's matrix-vector product reads the
weight once and is as fast as the memory allows. A forward of several rows (a verify chunk of
draft tokens, a batch of scored candidates, the batched decode step of several sessions, a
prompt) goes through MKL's general GEMM, which repacks the whole weight on every call: Gemma-3's
262k x 640 output layer costs 47 ms for one row but 100 ms for four and 160 ms for eight.

``pack_linears`` gives each ``nn.Linear`` a copy of its weight in oneDNN's blocked layout, made
once at load time; products of ``PACK_MIN_ROWS`` rows or more use that copy (four rows of the
output layer: 47 ms, eight: 58 ms). Fewer rows take the plain ``F.linear`` path (MKL is faster
there), so a lone decode step is bitwise the step ``generate`` takes with the same model object.
The cost is memory: the packed copy is as large as the weight (Gemma-3 output layer: +0.6 GB).
``mode``: "all" linears, only the output "head", or "none".
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PACK_MODES = ("all", "head", "none")
# The row count oneDNN picks its blocking for: packed for 8, the output layer was faster than
# packed for 1 at every row count from 2 to 32, and as fast at 1 row.
PACK_ROWS_HINT = 8
# Below this many rows MKL's own kernels win (docs/performance.md, *Constants*).
PACK_MIN_ROWS = 4


def packing_supported(model: nn.Module) -> bool:
    """oneDNN packing is a CPU, float32 matter; CUDA and bf16 models keep their own kernels."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return False
    return (
        param.device.type == "cpu"
        and param.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """``nn.Linear`` whose multi-row products use a oneDNN-packed copy of the weight.

    ``weight`` and ``bias`` are the original parameters (tied weights stay tied, ``state_dict``
    is unchanged); the packed copy is a plain attribute, not a buffer, so it is never saved."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Few rows (a decode step: bitwise what nn.Linear gives) or autograd: the plain path.
        if (
            x.numel() < PACK_MIN_ROWS * x.shape[-1]
            or torch.is_grad_enabled()
            and (x.requires_grad or self.weight.requires_grad)
        ):
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def pack_linears(model: nn.Module, mode: str = "all") -> int:
    """Replace the model's ``nn.Linear`` modules (all, or only the output layer) by
    ``PackedLinear``; returns how many were replaced. A no-op off CPU/float32; idempotent."""
    if mode not in PACK_MODES:
        raise ValueError(f"pack mode {mode!r}: expected one of {', '.join(PACK_MODES)}")
    if mode == "none" or not packing_supported(model):
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and (mode == "all" or module is head)
    ]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(module))
    if targets:
        log.info("packed %d linear weights for multi-row products (%s)", len(targets), mode)
    return len(targets)
