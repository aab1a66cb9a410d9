"""Packed sequences as the scan kernels take them: ``cu_seqlens`` (int32, (s + 1,)), the first token of each of
s sequences laid end to end in a batch of one."""

import torch

from ssmblocks.ops import packing


def sequence_count(cu_seqlens: torch.Tensor | None, batch: int) -> int:
    """The sequences a scan's initial and final states are for: the batch's rows, or the packed ones."""
    if cu_seqlens is None:
        return batch
    if batch != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be int32 of shape (s + 1,), s >= 1")
    return cu_seqlens.numel() - 1


def token_sequences(cu_seqlens: torch.Tensor | None, l: int) -> torch.Tensor | None:
    """(l,) int32: the packed sequence each token belongs to, or None without cu_seqlens."""
    return None if cu_seqlens is None else packing.token_sequences(cu_seqlens, l).to(torch.int32)
