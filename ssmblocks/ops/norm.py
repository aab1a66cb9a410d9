"""RMS norms, computed in float32 (or float64) and returned in the input's dtype.

One pass for the sums of squares (``vector_norm``) and, without autograd, scaling in place: fewer passes over
memory and fewer fresh buffers than ``F.rms_norm`` on CPU (81 -> 25 ms for 4 x 2048 x 1536, docs/benchmarks.md).
Without autograd on the CPU, float32 and float64 inputs take the C++ ``rms_norm`` (backends/cpp/norm.cpp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_kernel import cpu_kernels_take, cpu_ops


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


def _cpu_norm(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps, group_size, norm_before_gate):
    """The C++ ``rms_norm`` (one pass to gate and sum, one to scale) where it may run: x, z and weight plain
    float32/float64 tensors of one dtype on the CPU, without autograd. Else None."""
    if not cpu_kernels_take(x, z, weight) or (ops := cpu_ops()) is None:
        return None
    d = x.shape[-1]
    rows = (None if t is None else t.reshape(-1, d) for t in (x, z))
    return ops.rms_norm(*rows, weight, eps, group_size, norm_before_gate).view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None) -> torch.Tensor:
    """x: (..., d); weight: (d,). Normalises each group of ``group_size`` channels (all d when None)."""
    if (y := _cpu_norm(x, None, weight, eps, group_size or x.shape[-1], False)) is not None:
        return y
    wd = torch.promote_types(x.dtype, torch.float32)
    return _normalise(x.to(wd), weight, eps, group_size or x.shape[-1], own=x.dtype != wd).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Gated RMS norm. x, z: (..., d). norm_before_gate=False: norm(x * silu(z)); True: norm(x) * silu(z)."""
    group_size = group_size or x.shape[-1]
    if (y := _cpu_norm(x, z, weight, eps, group_size, norm_before_gate)) is not None:
        return y
    wd = torch.promote_types(x.dtype, torch.float32)
    gate = F.silu(z.to(wd))
    if norm_before_gate:
        return (_normalise(x.to(wd), weight, eps, group_size, own=x.dtype != wd) * gate).to(x.dtype)
    return _normalise(x.to(wd) * gate, weight, eps, group_size, own=True).to(x.dtype)
