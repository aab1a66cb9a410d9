"""Parameters split across ranks by tensor parallelism (ssmblocks.distributed) are DTensors; the layers
compute with the rank's own shard.

``torch.distributed.tensor`` takes about a second to import, so it is never imported here: a DTensor can
only exist once that module has been imported (by ssmblocks.distributed or the user), and until then no
tensor is one."""

from __future__ import annotations

import sys

import torch


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``, without importing that module."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The rank's shard of a DTensor (differentiable); any other tensor, or None, as it is."""
    return t.to_local() if is_dtensor(t) else t
