"""Parameters split across ranks by tensor parallelism (ssmblocks.distributed) are DTensors; the layers
compute with the rank's own shard."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The rank's shard of a DTensor (differentiable); any other tensor, or None, as it is."""
    return t.to_local() if isinstance(t, DTensor) else t
