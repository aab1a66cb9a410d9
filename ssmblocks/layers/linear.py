"""nn.Linear whose product runs ``ssmblocks.ops.linear`` (a faster CPU path for decode's small batches)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import linear


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init, state dict keys; ``isinstance(m, nn.Linear)`` holds, so PEFT,
    torchao and the tensor-parallel plans treat it as one). x (..., in_features) -> (..., out_features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
