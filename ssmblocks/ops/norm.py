"""RMS norms, computed in float32 (or float64) and returned in the input's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None) -> torch.Tensor:
    """x: (..., d); weight: (d,). Normalises each group of ``group_size`` channels (all d when None).

    Computed in float32 (float64 stays float64) by torch's fused rms_norm, then cast back to x's dtype.
    """
    d = x.shape[-1]
    group_size = group_size or d
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (d // group_size, group_size))
    normed = F.rms_norm(xf, (group_size,), eps=eps).flatten(-2)
    return (normed * weight.to(normed.dtype)).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Gated RMS norm. x, z: (..., d). norm_before_gate=False: norm(x * silu(z)); True: norm(x) * silu(z)."""
    wd = torch.promote_types(x.dtype, torch.float32)
    gate = F.silu(z.to(wd))
    if norm_before_gate:
        return (rms_norm(x.to(wd), weight, eps, group_size) * gate).to(x.dtype)
    return rms_norm(x.to(wd) * gate, weight, eps, group_size).to(x.dtype)
