"""Masks and packed sequences, handled the same way by every layer.

Packed input (batch 1, sequences laid end to end, boundaries in ``cu_seqlens``) is unpacked into a
right-padded batch, run through the layer's ordinary path, and packed back. Every mixer is causal, so
right padding never reaches a real position and each sequence starts from a fresh state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ShapeError


def check_cu_seqlens(cu_seqlens: torch.Tensor, x: torch.Tensor, layer: str) -> None:
    """cu_seqlens: (n + 1,) integer, starts at 0, strictly increasing, ends at x.shape[1]; x batch 1."""
    if (
        not isinstance(cu_seqlens, torch.Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.is_floating_point()
        or cu_seqlens.dtype == torch.bool
    ):
        raise ShapeError(f"{layer}: cu_seqlens must be a 1-D integer tensor (n_seqs + 1,)")
    if x.shape[0] != 1:
        raise ShapeError(f"{layer}: packed input (cu_seqlens) must have batch size 1, got {x.shape[0]}")
    if cu_seqlens.numel() < 2:
        raise ShapeError(f"{layer}: cu_seqlens needs at least 2 entries (0 and the total length)")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != x.shape[1]:
        raise ShapeError(
            f"{layer}: cu_seqlens must run from 0 to the packed length {x.shape[1]}, got {bounds[0]} .. {bounds[-1]}"
        )
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if min(lengths) <= 0:
        i = next(i for i, n in enumerate(lengths) if n <= 0)
        raise ShapeError(f"{layer}: cu_seqlens must be strictly increasing; sequence {i} has length {lengths[i]}")


def check_attention_mask(mask: torch.Tensor, x: torch.Tensor, layer: str) -> torch.Tensor:
    """Validate a left-padding mask (b, l), 1 = real token; return it as bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{layer}: attention_mask must be a tensor (batch, seqlen), got {type(mask).__name__}")
    if mask.shape != x.shape[:2]:
        raise ShapeError(
            f"{layer}: attention_mask has shape {tuple(mask.shape)}, expected (batch, seqlen) = {tuple(x.shape[:2])}"
        )
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ShapeError(f"{layer}: attention_mask must hold only 0 (padding) and 1 (real token)")
    mask = mask.to(device=x.device, dtype=torch.bool)
    if (mask[:, :-1] & ~mask[:, 1:]).any():
        raise ShapeError(
            f"{layer}: attention_mask must be left-padded (zeros, then ones, in every row); "
            "a real token is followed by padding"
        )
    return mask


def unpack_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed sequences, the (row, column) of every packed token in a right-padded batch.

    Returns rows, cols: (total,) int64.
    """
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    cols = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][rows]
    return rows, cols


def sequence_starts(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the position where each packed token's sequence starts."""
    cu = cu_seqlens.to(torch.int64)
    seq = torch.searchsorted(cu, torch.arange(total, device=cu.device), right=True) - 1
    return cu[seq.clamp_(0, cu.numel() - 2)]


class Unpacked:
    """Packed tensors (1, t, ...) as a right-padded batch (n, max_len, ...) and back, for one ``cu_seqlens``."""

    def __init__(self, cu_seqlens: torch.Tensor, device: torch.device):
        self.rows, self.cols = unpack_index(cu_seqlens.to(device))
        self.n, self.max_len = cu_seqlens.numel() - 1, int(self.cols.max()) + 1

    def pad(self, t: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor | None:
        """(1, t, ...) -> (n, max_len, ...), ``fill`` after each sequence (differentiable)."""
        if t is None:
            return None
        return t.new_full((self.n, self.max_len, *t.shape[2:]), fill).index_put((self.rows, self.cols), t[0])

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(n, max_len, ...) -> (1, t, ...): the real positions only."""
        return t[self.rows, self.cols].unsqueeze(0)


def run_packed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Apply a causal ``fn(padded (n, max_len, d)) -> (n, max_len, d_out)`` to packed ``x (1, t, d)``."""
    batch = Unpacked(cu_seqlens, x.device)
    return batch.pack(fn(batch.pad(x)))
