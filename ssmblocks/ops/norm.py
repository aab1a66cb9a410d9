"""RMS norms, computed in float32 and returned in the input's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None) -> torch.Tensor:
    """x: (..., d); weight: (d,). Normalises each group of ``group_size`` channels (all d when None)."""
    xf = x.float()
    if group_size is not None and group_size != x.shape[-1]:
        xf = xf.unflatten(-1, (-1, group_size))
        xf = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    else:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Gated RMS norm. x, z: (..., d). norm_before_gate=False: norm(x * silu(z)); True: norm(x) * silu(z)."""
    gate = F.silu(z.float())
    if norm_before_gate:
        return (rms_norm(x.float(), weight, eps, group_size) * gate).to(x.dtype)
    return rms_norm(x.float() * gate, weight, eps, group_size).to(x.dtype)
