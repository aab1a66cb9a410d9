"""The matrix product of every projection: torch's, or for the few rows of decode a C++ kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_kernel import cpu_kernels_take, cpu_ops

SMALL_BATCH_ROWS = range(2, 17)  # rows (batch x tokens) for which the C++ kernel beats MKL's sgemm


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: x (..., k), weight (o, k), bias (o,) -> (..., o).

    Without autograd on the CPU, for 2..16 rows of plain float32/float64 tensors, the C++
    ``small_batch_linear`` runs instead: MKL's sgemm takes 2-3x as long for 8 rows as for one row of the
    same weights, where the C++ kernel streams the weights once (decode at batch 2-16). Tensor subclasses
    (quantized or distributed weights) always take ``F.linear``.
    """
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if rows in SMALL_BATCH_ROWS and cpu_kernels_take(x, weight, bias) and (ops := cpu_ops()) is not None:
        return ops.small_batch_linear(x.reshape(rows, k), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
