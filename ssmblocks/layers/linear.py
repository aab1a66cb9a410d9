"""nn.Linear whose product runs the op ``ssmblocks.ops.linear`` (on the CPU, a C++ kernel for decode's few rows)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import linear


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init, state dict keys; ``isinstance(m, nn.Linear)`` holds, so PEFT,
    torchao and the tensor-parallel plans treat it as one). x (..., in_features) -> (..., out_features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
