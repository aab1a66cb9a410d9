"""RMS norms, computed in float32 (or float64) and returned in the input's dtype.

One pass for the sums of squares (``vector_norm``) and, without autograd, scaling in place: fewer passes over
memory and fewer fresh buffers than ``F.rms_norm`` on CPU (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _normalise(v: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int, own: bool) -> torch.Tensor:
    """v / rms(v) * weight per group of ``group_size`` channels; v: (..., d) float. ``own``: v is a buffer of
    this function's caller, which may be overwritten when no gradient is needed."""
    d = v.shape[-1]
    groups = v.unflatten(-1, (d // group_size, group_size))
    inv_rms = (torch.linalg.vector_norm(groups, dim=-1, keepdim=True).square() / group_size + eps).rsqrt()
    weight = weight.to(v.dtype)
    if torch.is_grad_enabled() and (v.requires_grad or weight.requires_grad):
        return (groups * inv_rms).flatten(-2) * weight
    scaled = groups.mul_(inv_rms) if own else groups * inv_rms
    return scaled.flatten(-2).mul_(weight)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None) -> torch.Tensor:
    """x: (..., d); weight: (d,). Normalises each group of ``group_size`` channels (all d when None)."""
    wd = torch.promote_types(x.dtype, torch.float32)
    return _normalise(x.to(wd), weight, eps, group_size or x.shape[-1], own=x.dtype != wd).to(x.dtype)


def gated_rms_norm_torch(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Gated RMS norm. x, z: (..., d). norm_before_gate=False: norm(x * silu(z)); True: norm(x) * silu(z)."""
    group_size = group_size or x.shape[-1]
    wd = torch.promote_types(x.dtype, torch.float32)
    gate = F.silu(z.to(wd))
    if norm_before_gate:
        return (_normalise(x.to(wd), weight, eps, group_size, own=x.dtype != wd) * gate).to(x.dtype)
    return _normalise(x.to(wd) * gate, weight, eps, group_size, own=True).to(x.dtype)


def add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, then RMS norm: a pre-norm block's step from one mixer to the next. x: (..., d), the branch
    output; residual: (..., d), the residual stream (often float32); weight: (d,). Returns (y, summed):
    summed = residual + x in residual's dtype (the new stream), y = rms_norm(summed) in x's dtype (the next
    mixer's input)."""
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    summed = residual + x.to(residual.dtype)
    wd = torch.promote_types(summed.dtype, torch.float32)
    return _normalise(summed.to(wd), weight, eps, summed.shape[-1], own=summed.dtype != wd).to(x.dtype), summed
