"""Packed sequences as the scan kernels take them: ``cu_seqlens`` (int32, (s + 1,)), the first token of each of
s sequences laid end to end in a batch of one."""

import torch


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
    if cu_seqlens is None:
        return None
    tokens = torch.arange(l, device=cu_seqlens.device, dtype=torch.int32)
    seq = torch.searchsorted(cu_seqlens, tokens, right=True) - 1
    return seq.clamp_(0, cu_seqlens.numel() - 2).to(torch.int32)  # tokens past cu_seqlens[-1]: the last one's
