"""SwiGLU feed-forward layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeError, check_positive
from .linear import Linear


class SwiGLU(nn.Module):
    """y = down_proj(silu(gate_proj(x)) * up_proj(x)); x, y: (b, l, d_model). Stateless.

    Args:
        d_model: model width d.
        hidden_dim: hidden units of gate_proj and up_proj.
        bias: bias in the three projections.
        device, dtype: of the parameters.
    """

    def __init__(self, d_model: int, hidden_dim: int, bias: bool = False, device=None, dtype=None):
        """Build the layer; the arguments are described in the class docstring."""
        super().__init__()
        check_positive("SwiGLU", d_model=d_model, hidden_dim=hidden_dim)
        self.d_model, self.hidden_dim = d_model, hidden_dim
        kw = {"device": device, "dtype": dtype}
        self.gate_proj = Linear(d_model, hidden_dim, bias=bias, **kw)
        self.up_proj = Linear(d_model, hidden_dim, bias=bias, **kw)
        self.down_proj = Linear(hidden_dim, d_model, bias=bias, **kw)

    def init_state(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ShapeError(f"SwiGLU: input has last dimension {x.shape[-1]}, but d_model={self.d_model}")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
