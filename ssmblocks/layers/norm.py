"""RMSNorm and GatedRMSNorm (the gated, optionally grouped norm of Mamba2)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ShapeError, check_positive
from ..ops import gated_rms_norm, rms_norm
from ._local import local


def _check_last_dim(x: torch.Tensor, dim: int, layer: str) -> None:
    if x.shape[-1] != dim:
        raise ShapeError(f"{layer}: input has last dimension {x.shape[-1]}, but the norm was built with dim={dim}")


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dimension; x: (..., dim). Stateless.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square.
        device, dtype: of the weight.
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        """Build the layer; the arguments are described in the class docstring."""
        super().__init__()
        check_positive("RMSNorm", dim=dim)
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def init_state(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim(x, self.dim, type(self).__name__)
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """Gated RMS norm over groups of ``group_size`` channels; x, z: (..., dim).

    norm_before_gate=False (Mamba2's default): y = norm(x * silu(z)) * weight.
    norm_before_gate=True: y = norm(x) * weight * silu(z).
    group_size defaults to dim (one group); Mamba2 uses dim / n_groups.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square.
        group_size: channels per normalised group (must divide dim); None = dim.
        norm_before_gate: see above.
        device, dtype: of the weight.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = False,
        device=None,
        dtype=None,
    ):
        """Build the layer; the arguments are described in the class docstring."""
        super().__init__()
        check_positive("GatedRMSNorm", dim=dim)
        group_size = dim if group_size is None else group_size
        if group_size <= 0 or dim % group_size:
            raise ValueError(f"GatedRMSNorm: group_size={group_size} must divide dim={dim}")
        self.dim, self.eps, self.group_size, self.norm_before_gate = dim, eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def init_state(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None) -> None:
        return None

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _check_last_dim(x, local(self.weight).shape[0], name)  # under tensor parallelism, the rank's share
        if z.shape != x.shape:
            raise ShapeError(f"{name}: gate z has shape {tuple(z.shape)}, x has {tuple(x.shape)}; they must match")
        return gated_rms_norm(x, z, local(self.weight), self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, group_size={self.group_size}, norm_before_gate={self.norm_before_gate}"
