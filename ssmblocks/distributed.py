"""Scaling out with PyTorch's own engine (launch with torchrun; gloo on CPU, nccl on GPUs)."""

from __future__ import annotations

from torch import nn


def fully_shard_blocks(model: nn.Module, mesh=None) -> nn.Module:
    """FSDP2: shard every block of a CausalLM (one all-gather per block in forward and backward), then the
    rest (embedding, final norm, LM head). ``mesh``: a 1-D DeviceMesh, or None for the default process group.
    Gradients are averaged over ranks, as data parallelism over the ranks' batches expects. Returns the
    model, changed in place."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
